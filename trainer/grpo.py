"""Stage 2 of RecLLM-R1: GRPO with TRL's `GRPOTrainer`, rewards from `reward_rules`.

Each reward term becomes its own TRL reward function and its weight goes into `reward_weights`,
rather than one function returning `weighted_sum`: TRL then logs every term separately
(`rewards/<name>/mean`), which is how one sees which objective moves. The total is the same: TRL
turns a term's None ("does not apply") into NaN and sums with `nansum`, which is exactly
`reward_rules.terms.weighted_sum`'s "a None term adds nothing".

Generation runs inside the trainer with transformers' `generate` (no vLLM): the model is small
and the trainer must work wherever the tests run. It follows the answer grammar the gateway
serves with (`trainer.constrained`), so rewards compare the items a completion picks.
"""

import logging
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import (
    LogitsProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PrinterCallback,
    ProgressCallback,
    TrainerCallback,
)
from trl import GRPOConfig, GRPOTrainer

from contract.prompt import parse_answer
from contract.rating import parse_rating
from contract.search import parse_search
from contract.tasks import Task
from reward_rules.terms import Term
from server.durable import weights_written
from trainer.constrained import (
    PatternConstraint,
    answer_budget,
    answer_constraint,
    constrained_generation,
)
from trainer.device import accelerated_bf16
from trainer.examples import Example
from trainer.presets import GrpoSettings

Drawn = TypeVar("Drawn")
logger = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"
REFERENCE_ADAPTER = "ref"  # the name TRL gives the frozen copy of an adapter it trains on
COMPLETION_MARGIN = 16  # tokens beyond the longest SFT target: room for a longer rationale


PARSERS = {Task.rank: parse_answer, Task.rate: parse_rating, Task.search: parse_search}


class TermReward:
    """One reward term as a TRL reward function: parse each completion, score it with its row.

    A class rather than a closure so that it pickles; `__name__` is what TRL logs it as.
    """

    def __init__(self, term: Term, name: str):
        self.term = term
        self.parse = PARSERS[term.task]
        self.__name__ = name

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list:
        # TRL passes every dataset column as a list aligned with `completions`, plus a few
        # extras (trainer_state, log_metric, ...) that are not lists of that length.
        rows = {key: value for key, value in columns.items() if _aligned(value, completions)}
        return [
            self.term(self.parse(completion), {key: value[i] for key, value in rows.items()})
            for i, completion in enumerate(completions)
        ]


def _aligned(value: Any, completions: list[str]) -> bool:
    return isinstance(value, list) and len(value) == len(completions)


class Stopped(Exception):
    """Training was asked to stop before it finished (Ctrl-C on the process that runs it)."""


class StopWhenSet(TrainerCallback):
    """Raises `Stopped` at the end of the first step after `event` is set. Training runs in a
    thread, which nothing can interrupt from outside; `should_training_stop` would end it as if
    it had finished, and the caller would go on to gate and publish it."""

    def __init__(self, event: threading.Event):
        self.event = event

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.event.is_set():
            raise Stopped(f"stopped after step {state.global_step} of {state.max_steps}")


def _unique(name: str, seen: set[str]) -> str:
    unique, n = name, 1
    while unique in seen:
        n += 1
        unique = f"{name}_{n}"
    seen.add(unique)
    return unique


def reward_functions(
    terms_with_weights: Sequence[tuple[Term, float]],
) -> tuple[list[TermReward], list[float]]:
    """TRL reward functions named after the terms (made unique, e.g. two Novelty terms), and
    their weights in the same order."""
    functions, weights, seen = [], [], set()
    for term, weight in terms_with_weights:
        name = _unique(getattr(term, "name", type(term).__name__.lower()), seen)
        functions.append(TermReward(term, name))
        weights.append(float(weight))
    return functions, weights


def to_dataset(examples: Sequence[Example]) -> Dataset:
    """The prompt and the columns rewards read; the SFT target is not needed for GRPO."""
    return Dataset.from_list([example.model_dump(exclude={"target"}) for example in examples])


def completion_budget(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]) -> int:
    """Enough tokens for the longest SFT target (rationale + k ids + eos) and a margin."""
    longest = max(len(tokenizer(e.target, add_special_tokens=False)["input_ids"]) for e in examples)
    return longest + 1 + COMPLETION_MARGIN


def grpo_config(
    settings: GrpoSettings,
    weights: list[float],
    completion_length: int,
    output_dir: Path,
    device: torch.device,
    checkpointing: bool = False,
) -> GRPOConfig:
    """`checkpointing`: recompute activations in the backward pass (GRPOConfig's default), for
    adapters on a large frozen model, whose activations over a group's long completions are what
    fills memory; the small embedded model trains faster without."""
    return GRPOConfig(
        output_dir=str(output_dir),
        use_cpu=device.type == "cpu",
        bf16=accelerated_bf16(device),  # GRPOConfig would turn bf16 on even on a CPU
        gradient_checkpointing=checkpointing,
        use_vllm=False,
        max_steps=settings.max_steps,
        learning_rate=settings.learning_rate,
        # TRL counts completions, not prompts, in its batch size.
        per_device_train_batch_size=settings.prompts_per_step * settings.num_generations,
        num_generations=settings.num_generations,
        max_completion_length=completion_length,
        temperature=settings.temperature,
        beta=settings.beta,
        reward_weights=weights,
        seed=settings.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=not settings.progress,
    )


@contextmanager
def _reference_on_disk(model: PreTrainedModel, output_dir: Path, beta: float) -> Iterator[None]:
    """Give TRL a directory to load the KL reference from while the trainer is built.

    With beta > 0, GRPOTrainer builds the reference model with `from_pretrained(
    model.config._name_or_path)`, which is empty for a model built or trained in memory. The
    reference is the policy as it starts, so that is what is saved there.
    """
    if beta == 0.0:
        yield
        return
    path = output_dir / "reference"
    with weights_written(path):
        model.save_pretrained(path)
    previous = model.config._name_or_path
    model.config._name_or_path = str(path)
    try:
        yield
    finally:
        model.config._name_or_path = previous


def spread(examples: Sequence[Drawn], count: int, seed: int = 0) -> list[Drawn]:
    """`count` of the examples, drawn across the whole set (seeded), in their order. Training sets
    are built user after user: their first `count` were one or two users' (the default preset's
    64 GRPO prompts came from two)."""
    if len(examples) <= count:
        return list(examples)
    chosen = np.random.default_rng(seed).choice(len(examples), size=count, replace=False)
    return [examples[i] for i in sorted(chosen)]


class BarOnly(ProgressCallback):
    """The progress bar (stderr) without the log dicts transformers writes under it: those go to
    stdout, where `bootstrap` and `train --once` print their JSON summary. `_log_rewards` logs
    what they held."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def run_grpo(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    reward_terms_with_weights: Sequence[tuple[Term, float]],
    settings: GrpoSettings,
    output_dir: Path | str,
    constraint: LogitsProcessor | None = None,
    stop: threading.Event | None = None,
) -> PreTrainedModel | PeftModel:
    """Train `model` in place with GRPO on the examples' prompts; returns it in eval mode.

    With `settings.lora_rank` only new LoRA adapters train and a PeftModel is returned (the
    adapters unmerged: a LoRA version is published and served as an adapter). A PeftModel given
    in goes on training its own adapters (`settings.lora_rank` is then ignored).

    Sampling follows `constraint` (a `trainer.constrained` grammar), by default the ranking
    answer's for these examples. Once `stop` is set, `Stopped` is raised at the end of the step
    under way.

    `output_dir` receives the KL reference (when beta > 0) and `trainer_state.json`, whose
    `log_history` has the mean reward, each term's mean, the KL, ... per step. No checkpoints.
    """
    if not examples:
        raise ValueError("GRPO needs at least one example")
    output_dir = Path(output_dir)
    # TRL's sampler needs a full step of distinct prompts.
    prompts = min(settings.prompts_per_step, len(examples))
    settings = settings.model_copy(update={"prompts_per_step": prompts})
    functions, weights = reward_functions(reward_terms_with_weights)
    length = settings.max_completion_length or completion_budget(tokenizer, examples)
    if constraint is None:
        constraint = answer_constraint(tokenizer, examples, length)
    if isinstance(constraint, PatternConstraint):  # ids written as text: room for any answer
        length = max(length, answer_budget(tokenizer, examples))
    adapted = isinstance(model, PeftModel)
    adapter = lora_config(settings.lora_rank) if settings.lora_rank and not adapted else None
    # SmolLM2 with adapters, 8 completions after 1,500-token prompts: over 24 GB without.
    checkpointing = adapted or adapter is not None
    # With adapters TRL keeps the KL reference in the model itself: for new adapters, the model
    # with adapters switched off; for adapters trained on, a frozen copy of them ("ref").
    with _reference_on_disk(model, output_dir, 0.0 if adapter or adapted else settings.beta):
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=functions,
            args=grpo_config(settings, weights, length, output_dir, model.device, checkpointing),
            train_dataset=to_dataset(examples),
            processing_class=tokenizer,
            peft_config=adapter,
        )
    if settings.progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(BarOnly)
    else:
        # With the bar disabled, transformers prints every log dict instead: silence that too.
        trainer.remove_callback(PrinterCallback)
    if stop is not None:
        trainer.add_callback(StopWhenSet(stop))
    with constrained_generation(trainer.model, constraint):
        trainer.train()
    trainer.state.save_to_json(str(output_dir / STATE_FILE))
    _log_rewards(trainer.state.log_history)
    trained = trainer.model
    if isinstance(trained, PeftModel) and REFERENCE_ADAPTER in trained.peft_config:
        trained.delete_adapter(REFERENCE_ADAPTER)  # the KL reference, not part of the result
    return trained.eval()


def lora_config(rank: int) -> LoraConfig:
    """Adapters on every linear layer but the output head, alpha = 2 x rank (a common default)."""
    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def _log_rewards(history: Sequence[Mapping[str, float]]) -> None:
    rewards = [entry["reward"] for entry in history if "reward" in entry]
    if not all(math.isfinite(reward) for reward in rewards):
        # All-NaN means every term returned None for every completion: nothing was learned.
        logger.warning("GRPO logged non-finite mean rewards: %s", rewards)
    logger.info("GRPO done: %d logged steps, last mean reward %s", len(rewards), rewards[-1:])
