"""Sampling under the answer grammar: even an untrained model only writes servable answers."""

import copy

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from contract.prompt import parse_answer
from tests.trainer.gguf_files import tiny_model, tiny_tokenizer
from trainer import constrained
from trainer.constrained import (
    AfterTag,
    PatternConstraint,
    answer_budget,
    answer_constraint,
    constrained_generation,
    greedy_after,
)
from trainer.examples import Example
from trainer.model import build_model

BUDGET = 48


def sample(model, tokenizer, prompts: list[str], budget: int = BUDGET, seed: int = 0) -> list[str]:
    """Left-padded batch at temperature 1, as GRPOTrainer samples."""
    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    inputs = tokenizer(text=prompts, return_tensors="pt", padding=True)
    output = model.generate(
        **inputs,
        max_new_tokens=budget,
        do_sample=True,
        temperature=1.0,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.batch_decode(
        output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )


@pytest.fixture(scope="module")
def untrained(toy_tokenizer: PreTrainedTokenizerFast):
    return build_model(toy_tokenizer, "tiny", seed=0).eval()


def test_untrained_samples_are_free_text_without_it(untrained, toy_tokenizer, toy_examples):
    texts = sample(untrained, toy_tokenizer, [e.prompt for e in toy_examples[:4]])
    assert not any(parse_answer(text).well_formed for text in texts)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_sample_names_k_distinct_candidates(
    untrained, toy_tokenizer: PreTrainedTokenizerFast, toy_examples: list[Example], seed: int
) -> None:
    examples = toy_examples[:4] + make_examples_with_longer_prompts(toy_examples)
    constraint = answer_constraint(toy_tokenizer, examples, BUDGET)
    assert constraint is not None
    with constrained_generation(untrained, constraint):
        texts = sample(untrained, toy_tokenizer, [e.prompt for e in examples], seed=seed)
    for example, text in zip(examples, texts, strict=True):
        answer = parse_answer(text)
        assert answer.well_formed, text
        assert len(answer.items) == len(set(answer.items)) == example.k
        assert set(answer.items) <= set(example.candidates)


def make_examples_with_longer_prompts(examples: list[Example]) -> list[Example]:
    """Prompts of another length, so that the batch is really padded."""
    return [
        e.model_copy(update={"prompt": e.prompt + "More about this user.\n"}) for e in examples[:2]
    ]


def test_a_short_budget_still_closes_the_answer(untrained, toy_tokenizer, toy_examples):
    examples = toy_examples[:2]
    budget = 14  # <think> + 2 tokens of rationale + an answer of k=3 ids
    with constrained_generation(untrained, answer_constraint(toy_tokenizer, examples, budget)):
        texts = sample(untrained, toy_tokenizer, [e.prompt for e in examples], budget)
    assert all(parse_answer(text).well_formed for text in texts)


def test_too_short_a_budget_is_an_error(toy_tokenizer, toy_examples):
    with pytest.raises(ValueError, match="cannot hold a 3-item answer"):
        answer_constraint(toy_tokenizer, toy_examples, 8)


def test_generate_is_restored_after_the_block(untrained, toy_tokenizer, toy_examples):
    with constrained_generation(untrained, answer_constraint(toy_tokenizer, toy_examples, BUDGET)):
        assert "generate" in vars(untrained)
    assert "generate" not in vars(untrained)


def test_a_prompt_it_was_not_built_for_is_an_error(untrained, toy_tokenizer, toy_examples):
    constraint = answer_constraint(toy_tokenizer, toy_examples[:1], BUDGET)
    with constrained_generation(untrained, constraint), pytest.raises(KeyError, match="not built"):
        sample(untrained, toy_tokenizer, [toy_examples[1].prompt])


def test_a_prompt_that_opens_with_the_pad_token_is_found(untrained, toy_tokenizer, toy_examples):
    """A chat tokenizer may pad with the token its prompts open with: removing left padding
    must not make those prompts unknown to the constraint."""
    tokenizer = copy.deepcopy(toy_tokenizer)
    first = tokenizer(text=toy_examples[0].prompt)["input_ids"][0]
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(first)
    examples = toy_examples[:3]
    constraint = answer_constraint(tokenizer, examples, BUDGET)
    with constrained_generation(untrained, constraint):
        texts = sample(untrained, tokenizer, [e.prompt for e in examples])
    assert all(parse_answer(text).well_formed for text in texts)


def test_ids_written_as_text_are_held_to_the_gateways_regex(toy_examples: list[Example]) -> None:
    """A pretrained-shaped model (byte-level BPE, ids of several tokens, random weights) samples
    only what vLLM would let it serve: a closed rationale, then k of its own candidates."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer))
    examples = toy_examples[:3] + make_examples_with_longer_prompts(toy_examples)
    constraint = answer_constraint(tokenizer, examples, BUDGET)
    assert isinstance(constraint, PatternConstraint)
    budget = answer_budget(tokenizer, examples)
    texts = sample(model, tokenizer, [e.prompt for e in examples])
    assert not any(parse_answer(text).well_formed for text in texts)
    with constrained_generation(model, constraint):
        texts = sample(model, tokenizer, [e.prompt for e in examples], budget)
    for example, text in zip(examples, texts, strict=True):
        answer = parse_answer(text)
        assert answer.well_formed, text
        assert len(answer.items) == example.k
        assert set(answer.items) <= set(example.candidates)


def test_greedy_decoding_in_batches_matches_one_prompt_at_a_time(
    untrained, toy_tokenizer, toy_examples, monkeypatch
):
    """Left padding must not change what validation reads: each prompt's greedy answer and the
    scores after its answer tag."""
    examples = toy_examples[:3] + make_examples_with_longer_prompts(toy_examples)
    prompts = [e.prompt for e in examples]
    tag = toy_tokenizer.convert_tokens_to_ids("<answer>")
    constraint = answer_constraint(toy_tokenizer, examples, BUDGET)

    def greedy(batch: int) -> list:
        monkeypatch.setattr(constrained, "GREEDY_BATCH", batch)
        with constrained_generation(untrained, constraint):
            return greedy_after(untrained, toy_tokenizer, prompts, BUDGET, tag)

    batched, alone = greedy(4), greedy(1)
    assert [text for text, _ in batched] == [text for text, _ in alone]
    for (_, a), (_, b) in zip(batched, alone, strict=True):
        assert a is not None and b is not None
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite)
        assert torch.allclose(a[finite], b[finite], atol=1e-4)


def test_after_tag_keeps_the_scores_of_the_step_after_each_rows_first_tag():
    after = AfterTag(tag=7, rows=2, prompt_length=2)
    steps = [torch.randn(2, 10) for _ in range(3)]
    prompts = torch.tensor([[1, 7], [1, 2]])  # a tag in the prompt is not the answer's
    after(prompts, steps[0])
    after(torch.cat([prompts, torch.tensor([[7], [3]])], 1), steps[1])
    returned = after(torch.cat([prompts, torch.tensor([[7, 7], [3, 4]])], 1), steps[2])
    assert torch.equal(returned, steps[2])  # it changes nothing
    assert torch.equal(after.kept[0], steps[1][0])
    assert after.kept[1] is None


def test_an_id_that_is_no_token_is_left_out_not_the_token_grammar(
    untrained, toy_tokenizer: PreTrainedTokenizerFast, toy_examples: list[Example]
) -> None:
    """One candidate the tokenizer has no token for (an id it left out, "café") put every
    prompt under the regex, where ids are spelled in pieces and repeated; the gateway lets an
    answer name only the candidates that are tokens."""
    odd = toy_examples[0]
    odd = odd.model_copy(update={"candidates": [*odd.candidates, "café"]})
    examples = [odd, *toy_examples[1:4]]

    constraint = answer_constraint(toy_tokenizer, examples, BUDGET)

    assert not isinstance(constraint, PatternConstraint)
    with constrained_generation(untrained, constraint):
        texts = sample(untrained, toy_tokenizer, [e.prompt for e in examples])
    answer = parse_answer(texts[0])
    assert answer.well_formed and "café" not in answer.items
    assert set(answer.items) <= set(odd.candidates)
