"""Stage 1 of RecLLM-R1: supervised fine-tuning on prompt + target, loss on the target only.

A plain torch loop rather than `Trainer`/`SFTTrainer`: the model is small, the data is a list in
memory, and the only non-standard part (masking the prompt) is three lines here, while the
trainers bring dataset preprocessing, accelerate state and defaults (bf16, checkpointing) that all
need turning off on CPU.

Prompt and target are tokenized separately and concatenated. That is exactly what happens at
generation time (TRL and vLLM tokenize the prompt alone and the model continues it), so the model
never trains on a token boundary it will not see when serving.
"""

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Literal, NamedTuple

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from trainer.device import accelerated_bf16
from trainer.examples import Example
from trainer.presets import SftSettings

logger = logging.getLogger(__name__)
IGNORE = -100  # label of tokens that carry no loss (the prompt and the padding)
BUCKET = 16  # batches sorted by length together (see _batches)


Encoded = tuple[list[int], list[int]]  # input ids, labels


def encode(tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int) -> Encoded:
    """Prompt + target + eos, labels only on target + eos (the model must learn to stop).

    Too long a sequence loses the start of its prompt: the end holds the candidates, which the
    answer copies from, while the start is boilerplate the model has seen in every other example.
    """
    # The prompt as vLLM and GRPO encode it: with a tokenizer's BOS, where it adds one (a model
    # trained without the BOS it is served with reads every prompt as out of place).
    prompt = tokenizer(example.prompt)["input_ids"]
    target = tokenizer(example.target, add_special_tokens=False)["input_ids"]
    target = [*target, tokenizer.eos_token_id][:max_length]
    prompt = prompt[max(0, len(prompt) + len(target) - max_length) :]
    return prompt + target, [IGNORE] * len(prompt) + target


class Batch(NamedTuple):
    input_ids: torch.Tensor
    labels: torch.Tensor
    tail: int  # every target lies in the last `tail` columns


def collate(rows: Sequence[Encoded], pad_id: int) -> Batch:
    """Pad a batch on the right; no attention mask.

    A causal model never attends to a later column, so right padding needs no mask: real tokens
    cannot see the padding, and padded columns carry no label. Without a mask, PyTorch's
    attention takes its fused causal kernel, about twice as fast on a CPU as the masked one
    (batches hold prompts of similar lengths, see `_batches`, so little is padded). The logits
    of the last `tail + 1` columns are all the loss needs: computing the vocabulary projection
    for the prompt too costs as much as the rest of the model at this size.
    """
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for row, (ids, row_labels) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
    labelled = (labels != IGNORE).int()
    first = labelled.argmax(dim=1)[labelled.any(dim=1)]  # first labelled column of each row
    # A label in column 0 has no logit before it to predict it from (nor has it in HF's loss).
    tail = min(int(width - first.min()) if len(first) else 1, max(width - 1, 1))
    return Batch(input_ids, labels, tail)


def batch_loss(model: PreTrainedModel, batch: Batch, bf16: bool) -> torch.Tensor:
    """Mean cross-entropy of the labelled tokens; logits only where labels are."""
    device = model.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(
            input_ids=batch.input_ids.to(device), use_cache=False, logits_to_keep=batch.tail + 1
        ).logits
    # The logit at column j predicts the token at j + 1.
    predictions = logits[:, :-1].float()
    labels = batch.labels[:, -batch.tail :].to(device)
    return torch.nn.functional.cross_entropy(
        predictions.reshape(-1, predictions.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    ) / (labels != IGNORE).sum().clamp(min=1)


def _batches(
    encoded: Sequence[Encoded], settings: SftSettings, generator: torch.Generator
) -> Iterator[list[Encoded]]:
    """Shuffled batches of similar lengths, epoch after epoch, forever; the caller stops.

    Each run of BUCKET batches is sorted by length before it is cut into batches, so a batch
    pads a few tokens rather than the spread of the whole set; the batches are then shuffled.
    """
    size = settings.batch_size
    while True:
        order = torch.randperm(len(encoded), generator=generator).tolist()
        batches = []
        for start in range(0, len(order), size * BUCKET):
            bucket = sorted(order[start : start + size * BUCKET], key=lambda i: len(encoded[i][0]))
            batches += [bucket[i : i + size] for i in range(0, len(bucket), size)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield [encoded[i] for i in batches[b]]


def use_bf16(setting: bool | Literal["auto"], device: torch.device) -> bool:
    """bf16 autocast (weights stay float32): about 2x faster where the CPU has bf16 units; on an
    accelerator whenever it supports bf16."""
    if accelerated_bf16(device):
        return True
    if setting == "auto":
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return setting


def total_steps(n_examples: int, settings: SftSettings) -> int:
    if settings.max_steps is not None:
        return settings.max_steps
    return settings.epochs * math.ceil(n_examples / settings.batch_size)


@torch.no_grad()
def target_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_length: int = 2048,
    batch_size: int = 8,
) -> float:
    """Mean cross-entropy per target token over `examples` (what SFT minimises)."""
    was_training = model.training
    model.eval()
    encoded = [encode(tokenizer, example, max_length) for example in examples]
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start : start + batch_size], tokenizer.pad_token_id)
        count = int((batch.labels[:, -batch.tail :] != IGNORE).sum())
        loss_sum += float(batch_loss(model, batch, bf16=False)) * count
        tokens += count
    model.train(was_training)
    return loss_sum / max(tokens, 1)


def run_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    settings: SftSettings,
) -> PreTrainedModel:
    """Fine-tune `model` in place on the examples' targets; returns it in eval mode."""
    if not examples:
        raise ValueError("SFT needs at least one example")
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    encoded = [encode(tokenizer, example, settings.max_length) for example in examples]
    steps = total_steps(len(encoded), settings)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    schedule = get_cosine_schedule_with_warmup(optimizer, int(settings.warmup_ratio * steps), steps)
    bf16 = use_bf16(settings.bf16, model.device)
    model.train()
    batches = _batches(encoded, settings, generator)
    with tqdm(total=steps, desc="SFT", unit="step", disable=not settings.progress) as bar:
        for _ in range(steps):
            loss = batch_loss(model, collate(next(batches), tokenizer.pad_token_id), bf16)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
    logger.info("SFT done: %d steps, last batch loss %.4f", steps, loss.item())
    return model.eval()
