"""GRPO runs with the real GRPOTrainer, each reward term logged, rewards parsed from completions."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from reward_rules.terms import Accuracy, Diversity, Format, Novelty
from server.prompt import ItemView, render_answer
from trainer.examples import Example
from trainer.grpo import (
    STATE_FILE,
    TermReward,
    completion_budget,
    reward_functions,
    run_grpo,
)
from trainer.presets import GrpoSettings

from .conftest import one_thread


class TestTermReward:
    def test_scores_each_completion_with_its_own_row(self) -> None:
        reward = TermReward(Accuracy(), "accuracy")
        scores = reward(
            prompts=["p", "p", "q"],
            completions=[
                render_answer("r", ["a", "b"]),  # the positive first
                "<think>no answer tag</think>",  # malformed: content scores 0
                render_answer("r", ["c"]),  # no positive among q's candidates: None
            ],
            candidates=[["a", "b"], ["a", "b"], ["c"]],
            positives=[["a"], ["a"], ["z"]],
            k=[2, 2, 1],
            trainer_state=object(),  # TRL's extras are not columns and are ignored
        )
        assert scores == [1.0, 0.0, None]

    def test_named_after_the_term_and_unique(self) -> None:
        functions, weights = reward_functions([(Format(), 1), (Novelty({}), 0.5), (Novelty({}), 2)])
        assert [f.__name__ for f in functions] == ["format", "novelty", "novelty_2"]
        assert weights == [1.0, 0.5, 2.0]


def test_completion_budget_covers_the_targets(
    toy_tokenizer: PreTrainedTokenizerFast, toy_examples: list[Example]
) -> None:
    longest = max(len(toy_tokenizer(e.target)["input_ids"]) for e in toy_examples)
    assert completion_budget(toy_tokenizer, toy_examples) > longest


@pytest.mark.slow
def test_run_grpo_trains_and_logs_every_term(
    toy_tokenizer: PreTrainedTokenizerFast,
    toy_examples: list[Example],
    toy_catalog: dict[str, ItemView],
    toy_sft_model: PreTrainedModel,
    tmp_path: Path,
) -> None:
    model = copy.deepcopy(toy_sft_model)  # the session's SFT model is shared
    before = [p.detach().clone() for p in model.parameters()]
    categories = {item_id: item.categories for item_id, item in toy_catalog.items()}
    terms = [
        (Format(), 1.0),
        (Accuracy(), 2.0),
        (Diversity(categories), 0.5),
        (Novelty({item_id: 3 for item_id in toy_catalog}), 0.5),
    ]
    settings = GrpoSettings(max_steps=3, prompts_per_step=2, num_generations=4, progress=False)

    with one_thread():
        trained = run_grpo(model, toy_tokenizer, toy_examples, terms, settings, tmp_path)

    assert isinstance(trained, PreTrainedModel)
    assert any(not torch.equal(a, b) for a, b in zip(before, trained.parameters(), strict=True))
    history = json.loads((tmp_path / STATE_FILE).read_text())["log_history"]
    steps = [entry for entry in history if "reward" in entry]
    assert len(steps) == settings.max_steps
    for entry in steps:
        assert math.isfinite(entry["reward"])
        for name in ("format", "accuracy", "diversity", "novelty"):
            assert f"rewards/{name}/mean" in entry
    # sampling follows the answer grammar: every completion is well formed
    assert all(entry["rewards/format/mean"] == 1.0 for entry in steps)
    # the KL reference is the model as it started; the policy keeps its own identity
    assert (tmp_path / "reference" / "config.json").exists()
    assert trained.config._name_or_path == toy_sft_model.config._name_or_path


@pytest.mark.slow
def test_lora_grpo_returns_merged_weights_with_only_the_linear_layers_moved(
    toy_tokenizer: PreTrainedTokenizerFast,
    toy_examples: list[Example],
    toy_sft_model: PreTrainedModel,
    tmp_path: Path,
) -> None:
    model = copy.deepcopy(toy_sft_model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    settings = GrpoSettings(
        max_steps=2, prompts_per_step=2, num_generations=4, lora_rank=4, progress=False
    )

    with one_thread():
        trained = run_grpo(
            model, toy_tokenizer, toy_examples, [(Accuracy(), 1.0)], settings, tmp_path
        )

    assert type(trained) is type(toy_sft_model)  # adapters merged: no peft wrapper left
    after = dict(trained.named_parameters())
    assert after.keys() == before.keys()
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved and all(name.endswith("proj.weight") for name in moved)
    assert not (tmp_path / "reference").exists()  # the KL reference is the adapter switched off
