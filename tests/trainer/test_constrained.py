"""Sampling under the answer grammar: even an untrained model only writes servable answers."""

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from contract.prompt import parse_answer
from trainer.constrained import answer_constraint, constrained_generation
from trainer.examples import Example
from trainer.model import build_model
from trainer.tokenizer import train_tokenizer

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


def test_no_constraint_when_item_ids_are_not_single_tokens(toy_catalog, toy_examples):
    texts = [example.prompt + example.target for example in toy_examples]
    plain = train_tokenizer(texts, [], vocab_size=600)  # no item tokens: "#100" is several
    assert answer_constraint(plain, toy_examples, BUDGET) is None
