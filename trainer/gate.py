"""Validation and the gate, for bootstrap and refresh alike.

`validate` answers held-out lists the way the gateway would (same grammar, same served order) and
scores them against the retrieval order of the same lists; it also chooses the served order's
`Blend` for the model. A bootstrapped version is activated (`activation`), and a refreshed one
is published (`refresh_gate`), only when it ranks at least as well as that retrieval order,
unless forced.
"""

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch
from pydantic import BaseModel, Field

from contract.answer import Answer
from contract.prompt import ANSWER_TAG, parse_answer, ref
from contract.ranking import Blend, backfilled, served_order
from contract.tasks import Task
from reward_rules.metrics import mean_self_information, ndcg_at_k
from server.config import Settings
from server.item_index import ItemIndex
from trainer.constrained import (
    PatternConstraint,
    answer_budget,
    answer_choices,
    answer_constraint,
    constrained_generation,
    greedy_after,
)
from trainer.examples import Example

# The weights validation may choose for each model's served order (`Blend`). The largest
# retrieval priors come close to the retrieval order itself; a popularity penalty p takes back
# p / log(1 + c_max) nats of log-probability per factor e of popularity (c_max: the most popular
# item's interactions, a few hundred on ML-100K, so 8 is about one nat).
RETRIEVAL_PRIORS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
POPULARITY_PENALTIES = (0.0, 0.5, 1.0, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0)
BLENDS = tuple(
    Blend(retrieval_prior=prior, popularity_penalty=penalty)
    for penalty in POPULARITY_PENALTIES
    for prior in RETRIEVAL_PRIORS
)

K = 10
"""The cut-off of every validation metric (`ndcg@10`, `novelty@10`)."""

# The served lists' novelty may fall at most this far below the retrieval order's, by default
# (REASONREC_NOVELTY_FLOOR): a model trained on what users chose learns popularity, and a blend
# that trades a little accuracy for the catalog's long tail is preferred to the most accurate one
# that recommends only hits.
NOVELTY_FLOOR = 0.95


@dataclass(frozen=True)
class Popularity:
    """What validation reads of the items' popularity."""

    counts: Mapping[str, int]
    """Training interactions per item: novelty is computed from them, as `reasonrec eval` does."""
    relative: Mapping[str, float]
    """The index's relative log-popularity, which the gateway's popularity penalty reads."""

    @classmethod
    def of(cls, counts: Mapping[str, int], index: ItemIndex | None) -> "Popularity":
        """No index, no relative popularity: the penalty then changes nothing."""
        return cls(counts=counts, relative=index.popularity(index.item_ids) if index else {})


class Served(BaseModel):
    """Means over validation lists."""

    ndcg: float
    novelty: float
    invalid: float = 0.0


def _first_picks(tokenizer, choices: list[str], scores: torch.Tensor | None) -> dict[str, float]:
    """Each choice's score as the first answer item (the scores after the answer constraint,
    as vLLM's processed log-probabilities are)."""
    if scores is None:
        return {}
    logprobs = scores.log_softmax(-1)
    tokens = {item: tokenizer.convert_tokens_to_ids(ref(item)) for item in choices}
    if any(token in (None, tokenizer.unk_token_id) for token in tokens.values()):
        return {}  # items are not single tokens: no first-pick scores to read
    scored = {item: float(logprobs[token]) for item, token in tokens.items()}
    return {item: score for item, score in scored.items() if math.isfinite(score)}


@torch.no_grad()
def validate(
    model,
    tokenizer,
    examples: list[Example],
    popularity: Popularity,
    novelty_floor: float = NOVELTY_FLOOR,
) -> dict[str, float]:
    """Answers on held-out last interactions: NDCG@k and novelty of the model vs the retrieval
    order of the same lists.

    Decoding follows the answer grammar, as vLLM's structured outputs do when serving, and the
    served order is chosen as the gateway chooses it (`contract.ranking.served_order`) with the
    blend among BLENDS that `choose_blend` picks under `novelty_floor`: the figures are what the
    gateway would serve with `retrieval_prior` and `popularity_penalty`; `invalid_rate` counts
    answers still repaired.
    """
    model.eval()
    budget = 8 + 6 * max((e.k for e in examples), default=0) + 60
    constraint = answer_constraint(tokenizer, examples, budget) if examples else None
    if isinstance(constraint, PatternConstraint):  # ids written as text take more tokens
        budget = answer_budget(tokenizer, examples)
    prompts = [example.prompt for example in examples]
    tag = tokenizer.convert_tokens_to_ids(ANSWER_TAG)
    with constrained_generation(model, constraint):
        greedy = greedy_after(model, tokenizer, prompts, budget, tag, "validation (ranking)")
    choices = [answer_choices(tokenizer, example.candidates) for example in examples]
    answers = [
        (parse_answer(text), named, _first_picks(tokenizer, named, scores))
        for named, (text, scores) in zip(choices, greedy, strict=True)
    ]
    scored = {blend: _served(examples, answers, blend, popularity) for blend in BLENDS}
    retrieval = _scored([e.candidates[: e.k] for e in examples], examples, popularity.counts)
    blend = choose_blend(scored, retrieval, novelty_floor)
    chosen = scored[blend]
    return {
        "validation_users": float(len(examples)),
        "ndcg@10": chosen.ndcg,
        "novelty@10": chosen.novelty,
        "first_pick_ndcg@10": scored[Blend()].ndcg,
        "first_pick_novelty@10": scored[Blend()].novelty,
        "retrieval_ndcg@10": retrieval.ndcg,
        "retrieval_novelty@10": retrieval.novelty,
        "retrieval_prior": blend.retrieval_prior,
        "popularity_penalty": blend.popularity_penalty,
        "novelty_floor": novelty_floor,
        "invalid_rate": chosen.invalid,
    }


def choose_blend(
    scored: Mapping[Blend, Served], retrieval: Served, novelty_floor: float = NOVELTY_FLOOR
) -> Blend:
    """The most accurate blend whose lists' novelty is at least `novelty_floor` times the
    retrieval order's (0: the most accurate blend); when none is, the most novel one. Ties go to
    the smaller weights."""
    floor = novelty_floor * retrieval.novelty

    def preference(blend: Blend) -> tuple[bool, float, float, float]:
        served = scored[blend]
        novel = served.novelty >= floor
        merit = served.ndcg if novel else served.novelty
        return novel, merit, -blend.popularity_penalty, -blend.retrieval_prior

    return max(scored, key=preference)


def _served(
    examples: list[Example],
    answers: list[tuple[Answer, list[str], dict[str, float]]],
    blend: Blend,
    popularity: Popularity,
) -> Served:
    """The lists the gateway would serve with `blend`, scored, with the repaired share: the
    answer's order of the choices it may name, then the candidates it may not, as reserve."""
    lists, invalid = [], 0
    for example, (answer, choices, scores) in zip(examples, answers, strict=True):
        ranked, repaired = served_order(
            answer, scores, choices, example.k, blend, popularity.relative
        )
        invalid += repaired
        lists.append(backfilled(ranked, example.candidates, example.k))
    served = _scored(lists, examples, popularity.counts)
    served.invalid = invalid / max(len(examples), 1)
    return served


def _scored(lists: list[list[str]], examples: list[Example], counts: Mapping[str, int]) -> Served:
    """NDCG and novelty at K, whatever k each list was served at (logged lists vary)."""
    n = max(len(examples), 1)
    total = sum(counts.values())
    pairs = list(zip(lists, examples, strict=True))
    return Served(
        ndcg=sum(ndcg_at_k(ranked, e.positives, K) for ranked, e in pairs) / n,
        novelty=sum(mean_self_information(ranked[:K], counts, total) for ranked, _ in pairs) / n,
    )


def beats_retrieval(metrics: dict[str, float]) -> bool:
    """A model must rank its validation users at least as well as the retrieval order."""
    return metrics.get("ndcg@10", 0.0) >= metrics.get("retrieval_ndcg@10", 0.0)


def beats_baseline(metrics: dict[str, float]) -> bool:
    """A rating model must predict its validation ratings no worse than its fallback, the lean
    baseline (`contract.rating.lean_rating`)."""
    return metrics.get("rate_rmse", math.inf) <= metrics.get("rate_baseline_rmse", 0.0)


def _rank_verdict(metrics: dict[str, float]) -> tuple[bool, str]:
    ours, theirs = metrics.get("ndcg@10", 0.0), metrics.get("retrieval_ndcg@10", 0.0)
    beats = beats_retrieval(metrics)
    verdict = "ranks at least as well as" if beats else "ranks WORSE than"
    return beats, (
        f"the model {verdict} the retrieval order on {int(metrics.get('validation_users', 0))} "
        f"validation users (NDCG@10 {ours:.4f} vs {theirs:.4f})"
    )


def _rate_verdict(metrics: dict[str, float]) -> tuple[bool, str]:
    beats = beats_baseline(metrics)
    verdict = "rates at least as well as" if beats else "rates WORSE than"
    ours, theirs = metrics.get("rate_rmse", math.nan), metrics.get("rate_baseline_rmse", math.nan)
    held = int(metrics.get("rate_validation_ratings", 0))
    return beats, (
        f"the model {verdict} the lean baseline on {held} held-out ratings "
        f"(RMSE {ours:.4f} vs {theirs:.4f})"
    )


def _search_verdict(metrics: dict[str, float]) -> tuple[bool, str]:
    ours, theirs = metrics.get("search_ndcg@10", 0.0), metrics.get("search_raw_ndcg@10", 0.0)
    beats = ours >= theirs
    verdict = "find items at least as well as" if beats else "find items WORSE than"
    return beats, (
        f"the model's queries {verdict} the last item's title on "
        f"{int(metrics.get('search_validation_users', 0))} validation users "
        f"(NDCG@10 {ours:.4f} vs {theirs:.4f})"
    )


def activation(
    metrics: dict[str, float], tasks: Collection[Task], other_active: bool, force: bool
) -> tuple[bool, str]:
    """Whether a new bootstrapped version becomes active (it must pass the gate of every task it
    was trained for), and why, in a sentence for the operator."""
    verdicts = [_rank_verdict(metrics)] if Task.rank in tasks else []
    verdicts += [_rate_verdict(metrics)] if Task.rate in tasks else []
    verdicts += [_search_verdict(metrics)] if Task.search in tasks else []
    beats = all(ok for ok, _ in verdicts)
    said = "; ".join(sentence for _, sentence in verdicts)
    if other_active:
        return False, f"{said}; another version is active, so this one was not activated"
    if beats or force:
        return True, f"{said}; activated" + ("" if beats else " (forced)")
    return (
        False,
        f"{said}; NOT activated: the gateway serves its fallback (--force overrides)",
    )


class Gate(BaseModel):
    """A refresh's verdict: the candidate against the active version and the retrieval order."""

    active: dict[str, float]
    candidate: dict[str, float]
    ndcg_tolerance: float
    invalid_tolerance: float
    beats_retrieval: bool = Field(
        description="The candidate ranks the held-out lists at least as well as their retrieval "
        "order (or was not trained to rank); required to publish unless forced."
    )
    beats_baseline: bool = Field(
        True,
        description="The candidate rates the held-out ratings no worse than the lean baseline "
        "(or was not trained to rate); required to publish unless forced.",
    )
    forced: bool = Field(
        False, description="It passed only because it was forced past its fallbacks."
    )
    passed: bool
    failures: list[str] = Field(
        default_factory=list, description="What it failed, one phrase each; empty when it passed."
    )


# Each figure a refresh is held to against the active version: whether higher is better, what
# a candidate beyond its tolerance does, how the figures are named, the tolerance's setting.
AGAINST_ACTIVE = (
    ("ndcg@10", True, "ranks worse than", "NDCG@10 ", "gate_ndcg_tolerance"),
    ("invalid_rate", False, "writes more invalid answers than", "", "gate_invalid_tolerance"),
    ("rate_rmse", False, "rates worse than", "RMSE ", "gate_rmse_tolerance"),
    ("search_ndcg@10", True, "searches worse than", "NDCG@10 ", "gate_ndcg_tolerance"),
)


def _worse_than_active(
    active: dict[str, float], candidate: dict[str, float], settings: Settings
) -> list[str]:
    """Where the candidate is beyond a tolerance of the active version, on each task both were
    validated on; empty when it is within all of them."""
    worse = []
    for metric, higher, does, named, setting in AGAINST_ACTIVE:
        if metric not in candidate:
            continue
        ours, theirs, tolerance = candidate[metric], active[metric], getattr(settings, setting)
        if not (ours >= theirs - tolerance if higher else ours <= theirs + tolerance):
            worse.append(
                f"{does} the active version ({named}{ours:.4f} against {theirs:.4f}, "
                f"tolerance {tolerance:g})"
            )
    return worse


def _worse_than_fallbacks(candidate: dict[str, float]) -> list[str]:
    """Where the candidate is worse than what the gateway serves without it, on the same data."""
    worse = []
    if "ndcg@10" in candidate and not beats_retrieval(candidate):
        ours, theirs = candidate["ndcg@10"], candidate.get("retrieval_ndcg@10", 0.0)
        worse.append(
            f"ranks worse than the retrieval order (NDCG@10 {ours:.4f} against {theirs:.4f})"
        )
    if "rate_rmse" in candidate and not beats_baseline(candidate):
        ours, theirs = candidate["rate_rmse"], candidate.get("rate_baseline_rmse", math.nan)
        worse.append(f"rates worse than the lean baseline (RMSE {ours:.4f} against {theirs:.4f})")
    return worse


def refresh_gate(
    active: dict[str, float], candidate: dict[str, float], settings: Settings, force: bool = False
) -> Gate:
    """A refreshed version is published when no worse than the active version (within
    tolerances) and, unless forced, no worse than its fallbacks on the same held-out data: the
    retrieval order of the lists, the lean baseline of the ratings. Search, which a refresh does
    not train, is held to the active version alone: one the bootstrap let search below the raw
    query would otherwise fail every refresh."""
    ranks = "ndcg@10" not in candidate or beats_retrieval(candidate)
    rates = "rate_rmse" not in candidate or beats_baseline(candidate)
    failures = _worse_than_active(active, candidate, settings)
    fallbacks = _worse_than_fallbacks(candidate)
    if not force:
        failures += fallbacks
    return Gate(
        active=active,
        candidate=candidate,
        ndcg_tolerance=settings.gate_ndcg_tolerance,
        invalid_tolerance=settings.gate_invalid_tolerance,
        beats_retrieval=ranks,
        beats_baseline=rates,
        forced=bool(fallbacks) and not failures,
        passed=not failures,
        failures=failures,
    )
