"""Which k ids a list shows: one rule for serving, SFT targets and rewards.

Every list is the first k distinct ids that are candidates, from a preferred order and then, where
that runs short, from the retrieval order. The gateway prefers the model's answer (`repair`) or
its first-pick scores (`served_order`); SFT targets prefer the positives (`target_items`); reward
terms read the answer's own first k (`first_k`, no backfill: a short answer scores less).
"""

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from types import MappingProxyType

from pydantic import BaseModel, ConfigDict, Field

from contract.answer import Answer


def first_k(preferred: Iterable[str], candidates: Collection[str], k: int) -> list[str]:
    """The first `k` distinct ids of `preferred` that are candidates, in that order.

    >>> first_k(["b", "x", "b", "a", "c"], ["a", "b", "c"], 2)
    ['b', 'a']
    """
    allowed = candidates if isinstance(candidates, set | frozenset) else set(candidates)
    chosen: dict[str, None] = {}
    for item in preferred:
        if len(chosen) >= k:
            break
        if item in allowed:
            chosen.setdefault(item)
    return list(chosen)


def backfilled(preferred: Iterable[str], order: Sequence[str], k: int) -> list[str]:
    """`first_k` of `preferred`, then the rest of `order` until k ids (or all of `order`)."""
    return first_k([*preferred, *order], order, k)


def repair(answer: Answer, order: Sequence[str], k: int) -> tuple[list[str], bool]:
    """The answer's candidate ids, duplicates dropped, backfilled in retrieval order, and whether
    the answer needed repair (malformed, or fewer than k distinct candidates)."""
    picked = first_k(answer.items, order, k)
    repaired = not answer.well_formed or len(picked) < min(k, len(order))
    return backfilled(picked, order, k), repaired


class Blend(BaseModel):
    """How the served order weighs a model's first-pick log-probabilities against the retrieval
    rank and the items' popularity. Validation chooses both weights for each model: a model
    trained on what users chose ranks what many chose too high, and leaning on the retrieval
    order or taking popularity back keeps the lists' novelty near the retrieval order's."""

    model_config = ConfigDict(frozen=True)

    retrieval_prior: float = Field(
        0.0, ge=0, description="Weight of -log(1 + retrieval rank) (0: the model's order alone)."
    )
    popularity_penalty: float = Field(
        0.0,
        ge=0,
        description="Weight of -popularity, an item's log-popularity relative to the most "
        "popular item's (0 to 1, `ItemIndex.popularity`).",
    )

    def order(
        self, scores: Mapping[str, float], order: Sequence[str], popularity: Mapping[str, float]
    ) -> list[str]:
        """The scored candidates, best first; an item of unknown popularity counts 0."""
        rank = {item: position for position, item in enumerate(order)}

        def cost(item: str) -> float:
            taken = self.popularity_penalty * popularity.get(item, 0.0)
            return self.retrieval_prior * math.log1p(rank[item]) + taken - scores[item]

        return sorted(scores, key=cost)


def served_order(
    answer: Answer,
    scores: Mapping[str, float],
    order: Sequence[str],
    k: int,
    blend: Blend = Blend(),
    popularity: Mapping[str, float] = MappingProxyType({}),
) -> tuple[list[str], bool]:
    """The k ids served and whether the answer needed repair.

    With first-pick log-probabilities for k candidates (a model whose items are single tokens),
    they order the list, blended (see `Blend`): measured better than the rest of the greedy
    answer, which continues from the model's own earlier picks (docs/evaluation.md). Otherwise
    the answer's ids, repaired.
    """
    if answer.well_formed and len(scores) >= min(k, len(order)):
        return blend.order(scores, order, popularity)[:k], False
    return repair(answer, order, k)


def target_items(candidates: Sequence[str], positives: Sequence[str], k: int) -> list[str]:
    """The k ids an SFT target ranks: positives among the candidates, then the candidate order.

    Positives come first, in the order they happened: they are the only label we have that the
    user wanted these items, and the earliest one is the nearest "next item" after the history
    the prompt shows. The rest is backfilled from the retrieval order, so the target always names
    exactly k distinct candidates (the format the prompt asks for) and, where the data says
    nothing, imitates the retriever's ranking, which is also what the gateway backfills with.

    >>> target_items(["a", "b", "c", "d"], ["z", "c", "a"], 3)
    ['c', 'a', 'b']
    """
    return backfilled(positives, candidates, k)
