"""Item-sequence pretraining: next-item prediction on the store's interaction sequences.

Before SFT, the embedded model reads every user's training sequence written exactly as a compact
prompt writes a history (`contract.prompt.compact_history`: profile line, then `#a, #b, …`) and
learns to predict each item from the ones before it. One item is one token, so ML-100K's ~100k
interactions are ~100k targets an epoch, against a few thousand SFT examples: this is where the
model learns what users watch next. SFT then only has to teach the answer format.

- Windows of `window` items, cut at offsets shifted every epoch, so that each item is seen with
  different amounts of context.
- The loss is cross-entropy over the catalog's item tokens only (the rest of the vocabulary never
  follows a separator), and items already in the window are left out of it: the gateway never
  offers a user an item of their history.
- Each user's last interaction is held out; the epoch whose model ranks it best (NDCG@10 over the
  catalog, seen items excluded) is kept, and training stops when it has not improved for
  `patience` epochs.
"""

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, Field
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from contract.prompt import SEPARATOR, compact_profile, ref
from reward_rules.metrics import ndcg_at_k
from trainer.corpus import Corpus, NotEnoughData, latest_per_item
from trainer.examples import Example
from trainer.presets import PretrainSettings

log = logging.getLogger(__name__)
IGNORE = -100


class PretrainResult(BaseModel):
    epochs: int
    best_epoch: int
    validation_ndcg: float = Field(description="NDCG@10 of the held-out items, whole catalog.")
    targets_per_epoch: int
    seconds: float


@dataclass(frozen=True)
class Vocabulary:
    """Token ids the item stream is written in, read off the tokenizer."""

    items: list[str]
    tokens: torch.Tensor  # token id of each catalog item, in `items` order
    separator: list[int]
    newline: list[int]

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase, item_ids: Sequence[str]) -> "Vocabulary":
        """The items among `item_ids` that are one token, in their order: an id the byte-level
        tokenizer spells in pieces (`trainer.tokenizer`: one with characters beyond printable
        ASCII) cannot be a next-item target, and is left out."""
        known = [(item, _token(tokenizer, item)) for item in item_ids]
        items = [item for item, token in known if token is not None]
        tokens = [token for _, token in known if token is not None]
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        return cls(items, torch.tensor(tokens, dtype=torch.long), encode(SEPARATOR), encode("\n"))


def _token(tokenizer: PreTrainedTokenizerBase, item_id: str) -> int | None:
    token = tokenizer.convert_tokens_to_ids(ref(item_id))
    return None if token is None or token == tokenizer.unk_token_id else token


@dataclass(frozen=True)
class Stream:
    """One user's item stream, as a compact prompt writes it."""

    prefix: list[int]  # the profile line and its newline
    items: list[int]  # catalog indices, oldest first


def _sequences(
    corpus: Corpus, tokenizer: PreTrainedTokenizerBase, vocab: Vocabulary
) -> tuple[list[Stream], list[tuple[Stream, int]]]:
    """Training sequences (last item held out) and (history, held-out item) pairs."""
    column = {item: j for j, item in enumerate(vocab.items)}
    train, held = [], []
    for user, seq in corpus.sequences.items():
        # As the gateway's histories (and training prompts) hold them: an item come back to once.
        items = [column[item] for item, _ in latest_per_item(seq) if item in column]
        if len(items) < 2:
            continue
        profile = compact_profile(corpus.profiles.get(user, {}))
        prefix = tokenizer(profile, add_special_tokens=False)["input_ids"] + vocab.newline
        train.append(Stream(prefix, items[:-1]))
        held.append((Stream(prefix, items[:-1]), items[-1]))
    return train, held


def render(vocab: Vocabulary, seq: Stream) -> tuple[list[int], list[int]]:
    """Token ids of the prefix and items, and the catalog index each token is followed by."""
    ids, follows = list(seq.prefix), [IGNORE] * len(seq.prefix)
    for n, item in enumerate(seq.items):
        if n:
            ids += vocab.separator
            follows += [IGNORE] * len(vocab.separator)
        if follows:  # the token before an item predicts it; the very first has none
            follows[-1] = item
        ids.append(int(vocab.tokens[item]))
        follows.append(IGNORE)
    return ids, follows


def _windows(train: list[Stream], window: int, rng: np.random.Generator) -> list[Stream]:
    """Each sequence cut into windows at an offset drawn anew every epoch."""
    cut = []
    for seq in train:
        offset = int(rng.integers(window))
        starts = [0, *range(offset or window, len(seq.items), window)]
        ends = [*starts[1:], None]
        cut += [Stream(seq.prefix, seq.items[a:b]) for a, b in zip(starts, ends, strict=True)]
    return [seq for seq in cut if seq.items]


def _batch(vocab: Vocabulary, rows: list[Stream], pad: int):
    rendered = [render(vocab, row) for row in rows]
    width = max(len(ids) for ids, _ in rendered)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    follows = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    seen = torch.zeros((len(rows), len(vocab.items)), dtype=torch.bool)
    for row, ((ids, labels), seq) in enumerate(zip(rendered, rows, strict=True)):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        follows[row, : len(ids)] = torch.tensor(labels)
        seen[row, seq.items] = True
    return input_ids, follows, seen


def item_logits(model: PreTrainedModel, vocab: Vocabulary, hidden: torch.Tensor) -> torch.Tensor:
    """Scores of the catalog's items from final hidden states: the tied output rows alone."""
    weight = model.get_output_embeddings().weight[vocab.tokens]
    return hidden @ weight.T


def batch_loss(model, vocab: Vocabulary, batch, bf16: bool) -> torch.Tensor:
    input_ids, follows, seen = (tensor.to(model.device) for tensor in batch)
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
    rows, columns = (follows != IGNORE).nonzero(as_tuple=True)
    logits = item_logits(model, vocab, hidden[rows, columns].float())
    targets = follows[rows, columns]
    others = seen[rows].clone()
    # The window's other items, not the target.
    others[torch.arange(len(targets), device=targets.device), targets] = False
    logits = logits.masked_fill(others, float("-inf"))
    return torch.nn.functional.cross_entropy(logits, targets)


@torch.no_grad()
def held_out_ndcg(model, vocab: Vocabulary, held: list[tuple[Stream, int]], window: int) -> float:
    """NDCG@10 of each held-out item over the catalog minus the user's history (their windows)."""
    model.eval()
    gains = []
    for start in range(0, len(held), 128):
        chunk = held[start : start + 128]
        rows = [Stream(seq.prefix, seq.items[-window:]) for seq, _ in chunk]
        # Ending with a separator: that is the position trained to name the next item.
        input_ids = [render(vocab, row)[0] + vocab.separator for row in rows]
        # Left padding with no mask would let the items attend to padding: score one length at
        # a time instead (ML-100K has few distinct lengths once histories are cut to a window).
        for length in sorted({len(ids) for ids in input_ids}):
            same = [j for j, ids in enumerate(input_ids) if len(ids) == length]
            ids = torch.tensor([input_ids[j] for j in same], device=model.device)
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[:, -1]
            scores = item_logits(model, vocab, hidden)
            for n, j in enumerate(same):
                seq, target = chunk[j]
                row = scores[n].clone()
                row[seq.items] = float("-inf")
                rank = int((row > row[target]).sum()) + 1
                gains.append(1 / math.log2(rank + 1) if rank <= 10 else 0.0)
    model.train()
    return sum(gains) / max(len(gains), 1)


def _epoch(
    model: PreTrainedModel,
    vocab: Vocabulary,
    windows: list[Stream],
    settings: PretrainSettings,
    optimizer: torch.optim.Optimizer,
    pad: int,
    rng: np.random.Generator,
) -> float:
    """One pass over the windows in random order; returns the mean batch loss."""
    order = rng.permutation(len(windows))
    losses = []
    for start in range(0, len(order), settings.batch_size):
        rows = [windows[i] for i in order[start : start + settings.batch_size]]
        loss = batch_loss(model, vocab, _batch(vocab, rows, pad), settings.bf16)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return sum(losses) / max(len(losses), 1)


def pretrain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    corpus: Corpus,
    settings: PretrainSettings,
    window: int,
) -> PretrainResult:
    """Pretrain `model` in place on windows of `window` items (the prompts' history length); it
    ends at its best epoch, in eval mode."""
    started = time.perf_counter()
    vocab = Vocabulary.of(tokenizer, sorted(corpus.items))
    train, held = _sequences(corpus, tokenizer, vocab)
    if not train:
        raise NotEnoughData(
            "no sequences to pretrain on: the store needs users with 2+ interactions"
        )
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    pad = tokenizer.pad_token_id
    best, best_epoch, best_state, epoch = -1.0, 0, None, 0
    targets = sum(len(seq.items) for seq in train)
    model.train()
    quiet = not settings.progress
    with tqdm(total=settings.max_epochs, desc="pretrain", unit="epoch", disable=quiet) as bar:
        for epoch in range(1, settings.max_epochs + 1):
            windows = _windows(train, window, rng)
            loss = _epoch(model, vocab, windows, settings, optimizer, pad, rng)
            score = held_out_ndcg(model, vocab, held, window) if held else 0.0
            if score > best:
                best, best_epoch = score, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            bar.set_postfix(loss=f"{loss:.3f}", ndcg=f"{score:.4f}", best=best_epoch)
            bar.update()
            late = settings.max_seconds and time.perf_counter() - started > settings.max_seconds
            if epoch - best_epoch >= settings.patience or late:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    result = PretrainResult(
        epochs=epoch,
        best_epoch=best_epoch,
        validation_ndcg=round(max(best, 0.0), 4),
        targets_per_epoch=targets,
        seconds=round(time.perf_counter() - started, 1),
    )
    model.eval()
    log.info("pretraining done", extra=result.model_dump())
    return result


@torch.no_grad()
def first_pick_ndcg(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]
) -> float:
    """NDCG@k of the candidates ranked by the model's next-item scores after a compact prompt's
    history: what pretraining alone knows, before any answer format is taught."""
    model.eval()
    gains = []
    for example in examples:
        text = example.prompt.removesuffix("\n") + SEPARATOR
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        hidden = model.model(input_ids=ids.to(model.device), use_cache=False).last_hidden_state
        hidden = hidden[:, -1]
        vocab = Vocabulary.of(tokenizer, example.candidates)
        scores = item_logits(model, vocab, hidden)[0].tolist()
        # sorted is stable: equal scores keep the retrieval order; candidates that are not one
        # token follow in that order
        order = sorted(range(len(scores)), key=lambda j: -scores[j])
        ranked = [vocab.items[j] for j in order]
        scored = set(ranked)
        ranked += [item for item in example.candidates if item not in scored]
        gains.append(ndcg_at_k(ranked, example.positives, example.k))
    return sum(gains) / max(len(gains), 1)
