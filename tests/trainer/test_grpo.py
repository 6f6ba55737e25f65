"""GRPO runs with the real GRPOTrainer, each reward term logged, rewards parsed from completions."""

import copy
import json
import math
import threading
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import SafetensorError
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from contract.prompt import ItemView, render_answer
from reward_rules.terms import Accuracy, Diversity, Format, Novelty
from trainer.examples import Example
from trainer.grpo import (
    STATE_FILE,
    Stopped,
    TermReward,
    completion_budget,
    reward_functions,
    run_grpo,
    spread,
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


def test_a_full_disk_under_the_kl_reference_is_an_os_error(
    toy_tokenizer: PreTrainedTokenizerFast,
    toy_examples: list[Example],
    toy_sft_model: PreTrainedModel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """safetensors' own error was a traceback where a failed write is one line (a refresh's
    reason, `train --once`'s message)."""

    def full_disk(*_: object, **__: object) -> None:
        raise SafetensorError("I/O error: No space left on device (os error 28)")

    model = copy.deepcopy(toy_sft_model)
    monkeypatch.setattr(type(model), "save_pretrained", full_disk)
    settings = GrpoSettings(max_steps=1, beta=0.04, progress=False)
    written = f"weights not written to {tmp_path / 'reference'}: .*No space left"
    with pytest.raises(OSError, match=written):
        run_grpo(model, toy_tokenizer, toy_examples, [(Format(), 1.0)], settings, tmp_path)


@pytest.mark.parametrize("progress", [True, False])
def test_grpo_writes_nothing_to_stdout(
    toy_tokenizer: PreTrainedTokenizerFast,
    toy_examples: list[Example],
    toy_sft_model: PreTrainedModel,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    progress: bool,
) -> None:
    """`bootstrap` and `train --once` print their JSON summary there; the bar is on stderr."""
    settings = GrpoSettings(max_steps=2, prompts_per_step=2, num_generations=4, progress=progress)
    with one_thread():
        run_grpo(
            copy.deepcopy(toy_sft_model),
            toy_tokenizer,
            toy_examples,
            [(Format(), 1.0)],
            settings,
            tmp_path,
        )
    captured = capfd.readouterr()
    assert captured.out == ""
    assert (" 2/2 [" in captured.err) == progress  # the training bar, when asked for


@pytest.mark.slow
def test_lora_grpo_trains_adapters_only_and_goes_on_training_them(
    toy_tokenizer: PreTrainedTokenizerFast,
    toy_examples: list[Example],
    toy_sft_model: PreTrainedModel,
    tmp_path: Path,
) -> None:
    # Hot sampling, so that completions and their rewards differ within a group: a gradient.
    terms = [(Accuracy(), 1.0)]
    base = {name: p.detach().clone() for name, p in toy_sft_model.named_parameters()}
    settings = GrpoSettings(
        max_steps=2,
        prompts_per_step=2,
        num_generations=4,
        temperature=5.0,
        lora_rank=4,
        progress=False,
    )

    with one_thread():
        adapted = run_grpo(
            copy.deepcopy(toy_sft_model),
            toy_tokenizer,
            toy_examples,
            terms,
            settings,
            tmp_path / "first",
        )
        first = {n: p.detach().clone() for n, p in adapted.named_parameters() if "lora_" in n}
        # A PeftModel given back trains the adapters it has (the rank setting is ignored).
        again = run_grpo(
            adapted,
            toy_tokenizer,
            toy_examples,
            terms,
            settings.model_copy(update={"lora_rank": 8}),
            tmp_path / "second",
        )

    assert isinstance(adapted, PeftModel) and again is adapted
    assert again.base_model.model.is_gradient_checkpointing  # activations of a large model
    assert again.peft_config["default"].r == 4 and list(again.peft_config) == ["default"]
    # Base weights untouched: the adapters are published and served as adapters.
    unloaded = dict(copy.deepcopy(again).unload().named_parameters())
    assert unloaded.keys() == base.keys()
    assert all(torch.equal(base[name], unloaded[name]) for name in base)
    weights = dict(again.named_parameters())
    assert any(not torch.equal(first[name], weights[name]) for name in first)
    assert not (tmp_path / "first" / "reference").exists()  # KL reference: adapters switched off


@pytest.mark.slow
def test_a_stop_ends_grpo_at_the_end_of_the_step_under_way(
    toy_tokenizer: PreTrainedTokenizerFast,
    toy_examples: list[Example],
    toy_sft_model: PreTrainedModel,
    tmp_path: Path,
) -> None:
    """Ctrl-C on a refresh: its training thread must end, not run all its steps."""
    settings = GrpoSettings(max_steps=3, prompts_per_step=2, num_generations=4, progress=False)
    stop = threading.Event()
    stop.set()

    with one_thread(), pytest.raises(Stopped, match="stopped after step 1 of 3"):
        model = copy.deepcopy(toy_sft_model)
        terms = [(Accuracy(), 1.0)]
        run_grpo(model, toy_tokenizer, toy_examples, terms, settings, tmp_path, stop=stop)


def test_grpo_prompts_are_drawn_across_users_not_the_first_ones() -> None:
    """Training sets are built user after user: 64 prompts from their head were two users'."""
    built = [(f"u{user}", position) for user in range(30) for position in range(20)]

    drawn = spread(built, 64, seed=0)

    assert len({user for user, _ in drawn}) > 20
    assert drawn == sorted(drawn, key=built.index) == spread(built, 64, seed=0)
    assert spread(built[:10], 64) == built[:10]
