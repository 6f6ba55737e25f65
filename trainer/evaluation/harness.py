"""The offline evaluation harness: fit each system on a split, rank for each user, report metrics.

Metrics follow `shared/docs/EVAL.md` at k = 10, averaged over the evaluated users, and come from
`reward_rules.metrics` (the same code the GRPO rewards use). Besides EVAL.md's five metrics the
report carries `invalid_rate` (answers a system had to repair, per user), `fallback_rate` (answers
a serving pipeline gave without its model, per user: 1 for the model-less paths, and for a model
path what its figures owe the fallback, unusable answers, also in `invalid_rate`, included) and
`p50_ms` (median wall time of one `recommend` call).
"""

import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial

from pydantic import BaseModel, Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from reward_rules.metrics import hit_at_k, intra_list_distance, mean_self_information, ndcg_at_k
from trainer.evaluation.split import Split
from trainer.evaluation.systems import System

K = 10
PROTOCOL = "EVAL.md: leave-last-out, rank catalog minus train+validation, k=10"


class ProtocolViolation(ValueError):
    """A system returned a list the protocol forbids; its numbers would not be comparable."""


class Report(BaseModel):
    """Results of one evaluation; `model_dump_json()` is the JSON form."""

    dataset: str
    protocol: str
    users: int
    systems: dict[str, dict[str, float]]
    repeated_tests: int = Field(
        0,
        description="Evaluated users whose test item is one they had before: it is excluded "
        "from ranking as seen, so every system scores 0 for them.",
    )
    model: dict[str, float] = Field(
        default_factory=dict,
        description="What the evaluated model's bootstrap measured on its own validation users, "
        "stage by stage (pretraining's first pick, SFT, GRPO) and in seconds.",
    )
    rating: "Report | None" = Field(
        None, description="The same model's rating report, when it was evaluated for both tasks."
    )

    def table(self) -> str:
        """The report as a fixed-width text table, one row per system."""
        metrics = list(next(iter(self.systems.values()), {}))
        width = max([len("system"), *(len(name) for name in self.systems)])
        header = "  ".join(["system".ljust(width), *(m.rjust(max(len(m), 8)) for m in metrics)])
        lines = [f"{self.dataset}, {self.users} users ({self.protocol})", header]
        for name, values in self.systems.items():
            cells = [f"{values[m]:.4f}".rjust(max(len(m), 8)) for m in metrics]
            lines.append("  ".join([name.ljust(width), *cells]))
        if self.repeated_tests:
            lines.append(
                f"{self.repeated_tests} users' test item is one they had before: "
                "every system scores 0 for them"
            )
        if self.model:
            stages = ", ".join(f"{key} {value:.4g}" for key, value in self.model.items())
            lines.append(f"model bootstrap (validation users): {stages}")
        if self.rating:
            lines += ["", self.rating.table()]
        return "\n".join(lines)


def evaluate(
    split: Split, systems: Sequence[System], users: Sequence[str], *, progress: bool = True
) -> Report:
    """Fit every system on `split` (training data only), then score it on `users`' test items.

    A progress bar per system goes to stderr unless `progress` is false. Raises
    `ProtocolViolation` when a system ranks a seen, unknown or repeated item or more than k items.
    """
    if not users:
        raise ValueError("no users to evaluate")
    if unknown := [user for user in users if user not in split.test]:
        raise ValueError(f"users without a test item in this split: {unknown[:5]}")
    if len(set(users)) != len(users):
        raise ValueError("users must not repeat: each would count twice")
    names = [system.name for system in systems]
    if len(set(names)) != len(names):
        raise ValueError(f"system names must be unique, got {names}")
    results = {}
    with _progress(progress) as bar:
        for system in systems:
            task = bar.add_task(system.name, total=len(users))
            system.fit(split)
            results[system.name] = _evaluate_system(
                split, system, users, partial(bar.advance, task)
            )
    return Report(
        dataset=split.dataset,
        protocol=PROTOCOL,
        users=len(users),
        systems=results,
        repeated_tests=sum(split.repeated_test(user) for user in users),
    )


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def _evaluate_system(
    split: Split, system: System, users: Sequence[str], step: Callable[[], object]
) -> dict[str, float]:
    repairs_before = getattr(system, "repairs", 0)
    fallbacks_before = getattr(system, "fallbacks", 0)
    if prepare := getattr(system, "prepare", None):
        # A serving pipeline answers many users at once, as it does under load; it then
        # reports each request's own latency in `latencies_ms`.
        prepare(users, K)
    totals = {"hit": 0.0, "ndcg": 0.0, "ild": 0.0, "novelty": 0.0}
    recommended: set[str] = set()
    times = []
    for user in users:
        start = time.perf_counter()
        items = system.recommend(user, K)
        times.append(time.perf_counter() - start)
        _check(split, system.name, user, items)
        recommended.update(items)
        for key, value in _score(split, user, items).items():
            totals[key] += value
        step()
    n = len(users)
    times_ms = [seconds * 1000.0 for seconds in times]
    return {
        f"hr@{K}": totals["hit"] / n,
        f"ndcg@{K}": totals["ndcg"] / n,
        f"ild@{K}": totals["ild"] / n,
        f"novelty@{K}": totals["novelty"] / n,
        f"coverage@{K}": len(recommended) / len(split.catalog),
        "invalid_rate": (getattr(system, "repairs", 0) - repairs_before) / n,
        "fallback_rate": (getattr(system, "fallbacks", 0) - fallbacks_before) / n,
        "p50_ms": statistics.median(getattr(system, "latencies_ms", None) or times_ms),
    }


def _score(split: Split, user: str, items: list[str]) -> dict[str, float]:
    """One user's metrics; places a system left empty count as not ranked."""
    relevant = {split.test[user]}
    return {
        "hit": hit_at_k(items, relevant, K),
        "ndcg": ndcg_at_k(items, relevant, K),
        "ild": intra_list_distance([split.categories[item] for item in items]),
        "novelty": mean_self_information(items, split.popularity, split.training_interactions),
    }


def _check(split: Split, name: str, user: str, items: list[str]) -> None:
    problems = []
    if len(items) > K:
        problems.append(f"{len(items)} items for k={K}")
    if len(set(items)) != len(items):
        problems.append("repeated items")
    if unknown := [item for item in items if item not in split.catalog_set]:
        problems.append(f"items not in the catalog: {unknown[:5]}")
    seen_by_user = split.seen(user)
    if seen := [item for item in items if item in seen_by_user]:
        problems.append(f"training or validation items of the user: {seen[:5]}")
    if problems:
        raise ProtocolViolation(f"system {name!r}, user {user!r}: " + "; ".join(problems))
