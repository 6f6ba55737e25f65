"""SFT learns the answer format on a small synthetic task, deterministically."""

import copy

import pytest
import torch
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from contract.prompt import parse_answer
from trainer.examples import Example
from trainer.model import build_model
from trainer.presets import SftSettings
from trainer.sft import IGNORE, _batches, batch_loss, collate, encode, run_sft, target_loss

from .conftest import one_thread


def greedy(model: PreTrainedModel, tok: PreTrainedTokenizerFast, prompts: list[str]) -> list[str]:
    batch = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=120, do_sample=False)
    return tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


class TestEncode:
    def test_loss_only_on_target_and_eos(
        self, toy_tokenizer: PreTrainedTokenizerFast, toy_examples: list[Example]
    ) -> None:
        ids, labels = encode(toy_tokenizer, toy_examples[0], max_length=4096)
        prompt_len = len(toy_tokenizer(toy_examples[0].prompt)["input_ids"])
        assert labels[:prompt_len] == [IGNORE] * prompt_len
        assert labels[prompt_len:] == ids[prompt_len:]
        assert ids[-1] == toy_tokenizer.eos_token_id
        assert toy_tokenizer.decode(ids[prompt_len:-1]) == toy_examples[0].target

    def test_a_tokenizer_that_starts_with_bos_gets_it_as_when_served(
        self, toy_tokenizer: PreTrainedTokenizerFast, toy_examples: list[Example]
    ) -> None:
        """vLLM encodes a prompt with the tokenizer's special tokens: a Llama base was trained
        without the BOS it is served with."""
        bos = copy.deepcopy(toy_tokenizer)
        first = toy_tokenizer.eos_token  # any special token stands in for a BOS here
        bos.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"{first} $A", special_tokens=[(first, toy_tokenizer.eos_token_id)]
        )

        ids, labels = encode(bos, toy_examples[0], max_length=4096)

        assert ids[0] == bos.eos_token_id and labels[0] == IGNORE
        assert (
            ids[: len(bos(toy_examples[0].prompt)["input_ids"])]
            == bos(toy_examples[0].prompt)["input_ids"]
        )

    def test_too_long_loses_the_start_of_the_prompt(
        self, toy_tokenizer: PreTrainedTokenizerFast, toy_examples: list[Example]
    ) -> None:
        full, _ = encode(toy_tokenizer, toy_examples[0], max_length=4096)
        ids, labels = encode(toy_tokenizer, toy_examples[0], max_length=len(full) - 10)
        assert ids == full[10:]
        assert (
            toy_tokenizer.decode([t for t in labels if t != IGNORE][:-1]) == toy_examples[0].target
        )

    def test_collate_pads_right_and_keeps_only_the_target_tail(
        self, toy_tokenizer: PreTrainedTokenizerFast
    ) -> None:
        pad = toy_tokenizer.pad_token_id
        batch = collate([([5, 6, 7, 8], [IGNORE, IGNORE, 7, 8]), ([8, 9], [IGNORE, 9])], pad)
        assert batch.input_ids.tolist() == [[5, 6, 7, 8], [8, 9, pad, pad]]
        assert batch.labels.tolist() == [[IGNORE, IGNORE, 7, 8], [IGNORE, 9, IGNORE, IGNORE]]
        assert batch.tail == 3  # from the earliest target column (row 2's) to the end

    def test_batch_loss_equals_the_full_sequence_loss(
        self, toy_tokenizer: PreTrainedTokenizerFast, toy_examples: list[Example]
    ) -> None:
        """Right padding without a mask and the cut logits change nothing in the loss."""
        model = build_model(toy_tokenizer, "tiny", seed=0).eval()
        rows = [encode(toy_tokenizer, example, 4096) for example in toy_examples[:3]]
        assert len({len(ids) for ids, _ in rows}) > 1  # some rows are padded
        with torch.no_grad():
            ours = batch_loss(model, collate(rows, toy_tokenizer.pad_token_id), bf16=False)
            one_by_one = [
                model(
                    input_ids=torch.tensor([ids]), labels=torch.tensor([labels]), use_cache=False
                ).loss
                * (sum(label != IGNORE for label in labels[1:]))
                for ids, labels in rows
            ]
        tokens = sum(sum(label != IGNORE for label in labels[1:]) for _, labels in rows)
        assert float(ours) == pytest.approx(float(sum(one_by_one)) / tokens, rel=1e-4)


def test_batches_cover_every_example_once_an_epoch_grouped_by_length() -> None:
    encoded = [([0] * length, [IGNORE] * length) for length in range(1, 257)]
    rng = torch.Generator().manual_seed(0)
    batches = _batches(encoded, SftSettings(batch_size=4), rng)
    epoch = [next(batches) for _ in range(64)]
    lengths = [[len(ids) for ids, _ in batch] for batch in epoch]
    assert sorted(n for batch in lengths for n in batch) == list(range(1, 257))
    # a bucket sorts 64 random lengths of 256: about 4 apart; random batches would span ~150
    assert sum(max(batch) - min(batch) for batch in lengths) / len(lengths) < 20
    assert lengths != sorted(lengths)  # the batches themselves are shuffled


@pytest.mark.slow
class TestRunSft:
    def test_lowers_the_loss(
        self,
        toy_tokenizer: PreTrainedTokenizerFast,
        toy_examples: list[Example],
        toy_sft_model: PreTrainedModel,
    ) -> None:
        before = target_loss(
            build_model(toy_tokenizer, "tiny", seed=0), toy_tokenizer, toy_examples
        )
        after = target_loss(toy_sft_model, toy_tokenizer, toy_examples)
        assert after < 0.5 * before

    def test_greedy_answers_are_well_formed_and_name_candidates(
        self,
        toy_tokenizer: PreTrainedTokenizerFast,
        toy_examples: list[Example],
        toy_sft_model: PreTrainedModel,
    ) -> None:
        completions = greedy(
            toy_sft_model, toy_tokenizer, [example.prompt for example in toy_examples]
        )
        for example, completion in zip(toy_examples, completions, strict=True):
            answer = parse_answer(completion)
            assert answer.well_formed, completion
            assert answer.items, completion
            assert set(answer.items) <= set(example.candidates), completion

    def test_same_seed_same_model(
        self, toy_tokenizer: PreTrainedTokenizerFast, toy_examples: list[Example]
    ) -> None:
        settings = SftSettings(max_steps=3, batch_size=4, seed=3, progress=False)
        with one_thread():
            a = run_sft(build_model(toy_tokenizer, "tiny"), toy_tokenizer, toy_examples, settings)
            b = run_sft(build_model(toy_tokenizer, "tiny"), toy_tokenizer, toy_examples, settings)
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(pa, pb)
