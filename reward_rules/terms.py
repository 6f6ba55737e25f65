"""GRPO reward terms: score one parsed completion against its example's columns.

Each term is a small picklable class (GRPO workers pickle them; closures would not survive) with a
`name` and `__call__(answer, example) -> float | None`, None meaning "does not apply to this
example". A policy file names terms through `TERMS` and weights them; `weighted_sum` combines them.

Example columns read by the terms: `candidates` (list of item ids the model may name),
`positives` (held-out items the user engaged with) and `k` (how many items the answer should
rank). Other columns are ignored.

Only `Format` looks at a malformed completion; the content terms score it 0.0 (when they apply),
as RecZero scores accuracy only for a valid format: otherwise a policy could collect content
reward without learning the contract.
"""

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

from reward_rules.answer import Answer, ranked
from reward_rules.metrics import (
    intra_list_distance,
    max_self_information,
    mean_self_information,
    ndcg_at_k,
)

Example = Mapping[str, Any]


class Term(Protocol):
    name: ClassVar[str]

    def __call__(self, answer: Answer, example: Example) -> float | None: ...


def _ranked(answer: Answer, example: Example) -> list[str]:
    """The ranked candidates of a well-formed answer; nothing for a malformed one."""
    if not answer.well_formed:
        return []
    return ranked(answer, example["candidates"], int(example["k"]))


class Format:
    """How well the answer follows the contract, in [0, 1]; 0.0 if it is not well formed.

    With `target = min(k, number of distinct candidates)`, `valid` = distinct candidate ids among
    the first k written, and `extra` = every other id written (duplicates, non-candidates, ids
    past the k-th): reward = valid / (target + extra), and 1.0 when nothing was expected and
    nothing written. It grows with each valid id, reaches 1.0 only for exactly `target` distinct
    valid ids and nothing else, and every stray id costs as much as a missing one would.

    >>> example = {"candidates": ["a", "b", "c"], "k": 2}
    >>> Format()(Answer("", ("a", "b"), True), example), Format()(Answer("", ("a",), True), example)
    (1.0, 0.5)
    >>> Format()(Answer("", ("a", "a", "b"), True), example)  # valid 1, extra 2: 1 / (2 + 2)
    0.25
    """

    name: ClassVar[str] = "format"

    def __call__(self, answer: Answer, example: Example) -> float:
        if not answer.well_formed:
            return 0.0
        candidates = set(example["candidates"])
        k = int(example["k"])
        target = min(k, len(candidates))
        valid = len({item for item in answer.items[:k] if item in candidates})
        extra = len(answer.items) - valid
        return 1.0 if target + extra == 0 else valid / (target + extra)


class Accuracy:
    """NDCG@k of the ranked candidates against the positives that are candidates.

    Positives outside the candidate list cannot be ranked, so they are left out of the ideal list
    (otherwise every completion of that prompt would be capped below 1). None when no positive is
    a candidate: the example says nothing about accuracy.

    >>> example = {"candidates": ["a", "b", "c"], "positives": ["b", "z"], "k": 2}
    >>> Accuracy()(Answer("", ("b", "a"), True), example)  # the one rankable positive, first
    1.0
    >>> round(Accuracy()(Answer("", ("a", "b"), True), example), 4)  # at rank 2: 1 / log2(3)
    0.6309
    """

    name: ClassVar[str] = "accuracy"

    def __call__(self, answer: Answer, example: Example) -> float | None:
        relevant = set(example["positives"]) & set(example["candidates"])
        if not relevant:
            return None
        return ndcg_at_k(_ranked(answer, example), relevant, int(example["k"]))


class Diversity:
    """Intra-list distance (mean pairwise 1 - Jaccard of category sets) of the ranked items.

    Items missing from `categories` have no categories. None when k < 2 (a single item cannot be
    diverse); an answer ranking fewer than two candidates scores 0.0.

    >>> term = Diversity({"a": ["Drama"], "b": ["Drama"], "c": ["Comedy"]})
    >>> example = {"candidates": ["a", "b", "c"], "k": 2}
    >>> term(Answer("", ("a", "b"), True), example), term(Answer("", ("a", "c"), True), example)
    (0.0, 1.0)
    """

    name: ClassVar[str] = "diversity"

    def __init__(self, categories: Mapping[str, Sequence[str]]):
        self.categories = {item: frozenset(cats) for item, cats in categories.items()}

    def __call__(self, answer: Answer, example: Example) -> float | None:
        if int(example["k"]) < 2:
            return None
        items = _ranked(answer, example)
        return intra_list_distance([self.categories.get(item, frozenset()) for item in items])


class Novelty:
    """Mean self-information of the ranked items, divided by its maximum so it lies in [0, 1].

    Self-information is -log2(max(count, 1) / total) with `total` the sum of `counts` (see
    `reward_rules.metrics.self_information`: an unseen item counts as seen once). Its maximum,
    reached by an item seen at most once, is log2(total), the divisor. 0.0 when nothing is ranked
    or total <= 1 (then every item is equally popular).

    >>> term = Novelty({"hit": 6, "niche": 1, "new": 0, "x": 1})  # total 8, log2(8) = 3 bits
    >>> example = {"candidates": ["hit", "niche", "new"], "k": 1}
    >>> term(Answer("", ("niche",), True), example), term(Answer("", ("new",), True), example)
    (1.0, 1.0)
    >>> round(term(Answer("", ("hit",), True), example), 4)  # log2(8 / 6) / 3
    0.1383
    """

    name: ClassVar[str] = "novelty"

    def __init__(self, counts: Mapping[str, int]):
        self.counts = dict(counts)
        self.total = sum(self.counts.values())

    def __call__(self, answer: Answer, example: Example) -> float:
        items = _ranked(answer, example)
        scale = max_self_information(self.total)
        if not items or scale == 0.0:
            return 0.0
        return mean_self_information(items, self.counts, self.total) / scale


TERMS: dict[str, type] = {term.name: term for term in (Format, Accuracy, Diversity, Novelty)}
"""Term classes by name, so that a policy file can refer to them."""


def weighted_sum(
    terms_with_weights: Iterable[tuple[Term, float]], answer: Answer, example: Example
) -> float:
    """Sum of weight * value over the terms that apply (a None term adds nothing).

    >>> example = {"candidates": ["a", "b"], "positives": [], "k": 2}
    >>> weighted_sum([(Format(), 0.5), (Accuracy(), 2.0)], Answer("", ("a", "b"), True), example)
    0.5
    """
    total = 0.0
    for term, weight in terms_with_weights:
        value = term(answer, example)
        if value is not None:
            total += weight * value
    return total
