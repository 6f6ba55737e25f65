"""GRPO reward terms: score one parsed completion against its example's columns.

Each term is a small picklable class (GRPO workers pickle them; closures would not survive) with a
`name`, `build(catalog)` and `__call__(answer, example) -> float | None`, None meaning "does not
apply to this example". `@term` registers a class in `TERMS`, through which a policy file names
terms and weights them; `weighted_sum` combines them.

Example columns read by the terms: `candidates` (list of item ids the model may name),
`positives` (held-out items the user engaged with) and `k` (how many items the answer should
rank). Other columns are ignored. Facts about the catalog (categories, popularity, promotions,
availability, creation times) are given to a term when it is built, not per example.

Every term is "higher is better", so policy weights are never negative: the ranking terms lie in
[0, 1], the business penalties (availability, category cap) returned as 1 - the share of
offending items; the rating terms keep METHODS.md §2's scale, [-1, 1] each.

Each term scores one task's answers (`task`): the ranking terms an `Answer`, the rating terms
(`rating_format`, `rating_accuracy`, which read the example's `rating` column) a `RatingAnswer`.

`SearchNdcg` (Rec-R1) scores a `SearchAnswer` with the retriever it is given: it is built in code,
not named in a policy file, because its reward is the retriever's list, not a business rule.

Only `Format` looks at a malformed completion; the content terms score it 0.0 (when they apply),
as RecZero scores accuracy only for a valid format: otherwise a policy could collect content
reward without learning the contract.
"""

from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from contract.answer import Answer
from contract.ranking import first_k
from contract.rating import RatingAnswer, on_scale
from contract.search import SearchAnswer, retriever_query
from contract.tasks import Task
from reward_rules.metrics import (
    intra_list_distance,
    max_self_information,
    mean_self_information,
    ndcg_at_k,
    rank_ndcg,
)

Example = Mapping[str, Any]


@dataclass(frozen=True)
class Catalog:
    """What terms know of the catalog, given once when they are built, not per example."""

    categories: Mapping[str, frozenset[str]] = field(default_factory=dict)
    promoted: frozenset[str] = frozenset()
    unavailable: frozenset[str] = frozenset()
    created_at: Mapping[str, float] = field(default_factory=dict)
    """Unix seconds, for the items whose creation time is known."""
    popularity: Mapping[str, int] = field(default_factory=dict)
    """Training interactions per item."""
    max_per_category: int | None = None


class Term(Protocol):
    name: ClassVar[str]
    task: ClassVar[Task]

    @classmethod
    def build(cls, catalog: Catalog) -> "Term": ...

    def __call__(self, answer: Any, example: Example) -> float | None: ...


TERMS: dict[str, type[Term]] = {}
"""Term classes by name, so that a policy file can refer to them; filled by `@term`."""


def term(cls: type[Term]) -> type[Term]:
    """Register a term class under its `name`: the one place a term is made known."""
    TERMS[cls.name] = cls
    return cls


def _ranked(answer: Answer, example: Example) -> list[str]:
    """The ranked candidates of a well-formed answer; nothing for a malformed one."""
    if not answer.well_formed:
        return []
    return first_k(answer.items, example["candidates"], int(example["k"]))


@term
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
    task: ClassVar[Task] = Task.rank

    @classmethod
    def build(cls, catalog: Catalog) -> "Format":
        return cls()

    def __call__(self, answer: Answer, example: Example) -> float:
        if not answer.well_formed:
            return 0.0
        candidates = set(example["candidates"])
        k = int(example["k"])
        target = min(k, len(candidates))
        valid = len({item for item in answer.items[:k] if item in candidates})
        extra = len(answer.items) - valid
        return 1.0 if target + extra == 0 else valid / (target + extra)


@term
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
    task: ClassVar[Task] = Task.rank

    @classmethod
    def build(cls, catalog: Catalog) -> "Accuracy":
        return cls()

    def __call__(self, answer: Answer, example: Example) -> float | None:
        relevant = set(example["positives"]) & set(example["candidates"])
        if not relevant:
            return None
        return ndcg_at_k(_ranked(answer, example), relevant, int(example["k"]))


@term
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
    task: ClassVar[Task] = Task.rank

    @classmethod
    def build(cls, catalog: Catalog) -> "Diversity":
        return cls(catalog.categories)

    def __init__(self, categories: Mapping[str, Sequence[str]]):
        self.categories = {item: frozenset(cats) for item, cats in categories.items()}

    def __call__(self, answer: Answer, example: Example) -> float | None:
        if int(example["k"]) < 2:
            return None
        items = _ranked(answer, example)
        return intra_list_distance([self.categories.get(item, frozenset()) for item in items])


@term
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
    task: ClassVar[Task] = Task.rank

    @classmethod
    def build(cls, catalog: Catalog) -> "Novelty":
        return cls(catalog.popularity)

    def __init__(self, counts: Mapping[str, int]):
        self.counts = dict(counts)
        self.total = sum(self.counts.values())

    def __call__(self, answer: Answer, example: Example) -> float:
        items = _ranked(answer, example)
        scale = max_self_information(self.total)
        if not items or scale == 0.0:
            return 0.0
        return mean_self_information(items, self.counts, self.total) / scale


def _target(example: Example) -> int:
    """How many items a complete answer ranks: k, or every candidate if there are fewer."""
    return min(int(example["k"]), len(set(example["candidates"])))


@term
class Promotion:
    """The share of the answer's k slots that hold promoted items, in [0, 1].

    The share is taken of `min(k, number of candidates)` (the length of a complete answer), not of
    the ranked items, so that a short answer naming one promoted item cannot score 1. None when no
    candidate is promoted: every answer would score 0, the example says nothing.

    >>> term = Promotion({"a", "c"})
    >>> example = {"candidates": ["a", "b", "c", "d"], "k": 2}
    >>> term(Answer("", ("a", "c"), True), example), term(Answer("", ("a", "b"), True), example)
    (1.0, 0.5)
    >>> term(Answer("", ("a",), True), example)  # one promoted item of the two slots
    0.5
    >>> print(term(Answer("", ("b",), True), {"candidates": ["b", "d"], "k": 2}))
    None
    """

    name: ClassVar[str] = "promotion"
    task: ClassVar[Task] = Task.rank

    @classmethod
    def build(cls, catalog: Catalog) -> "Promotion":
        return cls(catalog.promoted)

    def __init__(self, promoted: Collection[str]):
        self.promoted = frozenset(promoted)

    def __call__(self, answer: Answer, example: Example) -> float | None:
        if self.promoted.isdisjoint(example["candidates"]):
            return None
        items = _ranked(answer, example)
        return sum(item in self.promoted for item in items) / _target(example)


@term
class Availability:
    """1 - the share of the ranked items that are unavailable, in [0, 1] (higher is better).

    The gateway never serves an unavailable item when the policy excludes them; this term teaches
    the model not to name them in the first place. 0.0 when nothing is ranked (an empty answer
    must not earn the best score). None when no candidate is unavailable.

    >>> term = Availability({"b"})
    >>> example = {"candidates": ["a", "b", "c", "d"], "k": 2}
    >>> term(Answer("", ("a", "c"), True), example), term(Answer("", ("a", "b"), True), example)
    (1.0, 0.5)
    """

    name: ClassVar[str] = "availability"
    task: ClassVar[Task] = Task.rank

    @classmethod
    def build(cls, catalog: Catalog) -> "Availability":
        return cls(catalog.unavailable)

    def __init__(self, unavailable: Collection[str]):
        self.unavailable = frozenset(unavailable)

    def __call__(self, answer: Answer, example: Example) -> float | None:
        if self.unavailable.isdisjoint(example["candidates"]):
            return None
        items = _ranked(answer, example)
        if not items:
            return 0.0
        return 1.0 - sum(item in self.unavailable for item in items) / len(items)


def split_at_category_cap(
    items: Sequence[str], categories: Mapping[str, Collection[str]], cap: int | None
) -> tuple[list[str], list[str]]:
    """(kept, skipped): walk `items` in order, skipping an item whose categories include one that
    already has `cap` kept items. An item counts towards each of its categories; an item without
    categories is never capped. No cap (None) keeps everything.

    This is the rule the gateway enforces and `CategoryCap` rewards: one implementation for both.

    >>> cats = {"a": ["Drama"], "b": ["Drama", "War"], "c": ["War"], "d": ["Comedy"]}
    >>> split_at_category_cap(["a", "b", "c", "d"], cats, 1)
    (['a', 'c', 'd'], ['b'])
    """
    if cap is None:
        return list(items), []
    kept: list[str] = []
    skipped: list[str] = []
    counts: Counter[str] = Counter()
    for item in items:
        cats = set(categories.get(item, ()))
        if any(counts[category] >= cap for category in cats):
            skipped.append(item)
        else:
            kept.append(item)
            counts.update(cats)
    return kept, skipped


@term
class CategoryCap:
    """1 - the share of the ranked items that break the per-category cap, in [0, 1].

    The offending items are those `split_at_category_cap` skips: walking the answer in order, an
    item whose category already has `max_per_category` items. 0.0 when nothing is ranked. None
    when the cap cannot be exceeded (no cap, or k <= cap).

    >>> term = CategoryCap({"a": ["Drama"], "b": ["Drama"], "c": ["Comedy"]}, max_per_category=1)
    >>> example = {"candidates": ["a", "b", "c"], "k": 2}
    >>> term(Answer("", ("a", "c"), True), example), term(Answer("", ("a", "b"), True), example)
    (1.0, 0.5)
    """

    name: ClassVar[str] = "category_cap"
    task: ClassVar[Task] = Task.rank

    @classmethod
    def build(cls, catalog: Catalog) -> "CategoryCap":
        return cls(catalog.categories, catalog.max_per_category)

    def __init__(self, categories: Mapping[str, Collection[str]], max_per_category: int | None):
        if max_per_category is not None and max_per_category < 1:
            raise ValueError(f"max_per_category must be at least 1, got {max_per_category}")
        self.categories = {item: frozenset(cats) for item, cats in categories.items()}
        self.cap = max_per_category

    def __call__(self, answer: Answer, example: Example) -> float | None:
        if self.cap is None or int(example["k"]) <= self.cap:
            return None
        items = _ranked(answer, example)
        if not items:
            return 0.0
        _, skipped = split_at_category_cap(items, self.categories, self.cap)
        return 1.0 - len(skipped) / len(items)


@term
class Freshness:
    """Mean freshness of the ranked items, in [0, 1]: how new each item is within the catalog.

    An item's freshness is its percentile rank by creation time among the catalog's items: the
    share of the other items that are older, ties counted as half older (so the newest item of a
    catalog without ties scores 1, the oldest 0). A rank, not a scaled age, so that one very old
    item does not squeeze every other score together, and so that it means the same for a catalog
    spanning decades (films) or days (news). Items without a creation time score 0. 0.0 when
    nothing is ranked; None when the catalog has fewer than two distinct creation times (no item
    is newer than another).

    `created_at` maps item ids to creation times in Unix seconds.

    >>> term = Freshness({"old": 0.0, "mid": 100.0, "new": 200.0})
    >>> example = {"candidates": ["old", "mid", "new"], "k": 1}
    >>> [term(Answer("", (item,), True), example) for item in ("old", "mid", "new")]
    [0.0, 0.5, 1.0]
    """

    name: ClassVar[str] = "freshness"
    task: ClassVar[Task] = Task.rank

    @classmethod
    def build(cls, catalog: Catalog) -> "Freshness":
        return cls(catalog.created_at)

    def __init__(self, created_at: Mapping[str, float]):
        times = sorted(created_at.values())
        self.applies = len(times) >= 2 and times[0] != times[-1]
        self.score: dict[str, float] = {}
        if self.applies:
            others = len(times) - 1
            for item, time in created_at.items():
                older = bisect_left(times, time)
                ties = bisect_right(times, time) - older - 1  # other items created at that time
                self.score[item] = (older + ties / 2) / others

    def __call__(self, answer: Answer, example: Example) -> float | None:
        if not self.applies:
            return None
        items = _ranked(answer, example)
        if not items:
            return 0.0
        return sum(self.score.get(item, 0.0) for item in items) / len(items)


@term
class RatingFormat:
    """+1 when every tag appears once, in order, non-empty, and the rating is a number in [1, 5];
    -1 otherwise (METHODS.md §2).

    >>> RatingFormat()(RatingAnswer(("a", "b", "c"), 4.0, True), {})
    1.0
    """

    name: ClassVar[str] = "rating_format"
    task: ClassVar[Task] = Task.rate

    @classmethod
    def build(cls, catalog: Catalog) -> "RatingFormat":
        return cls()

    def __call__(self, answer: RatingAnswer, example: Example) -> float:
        return 1.0 if answer.well_formed else -1.0


@term
class RatingAccuracy:
    """1 - |predicted - true| / 2 for a well-formed answer (from 1 for the exact rating down to
    -1 four stars off), 0 for a malformed one (METHODS.md §2).

    >>> RatingAccuracy()(RatingAnswer(("a", "b", "c"), 3.0, True), {"rating": 4})
    0.5
    """

    name: ClassVar[str] = "rating_accuracy"
    task: ClassVar[Task] = Task.rate

    @classmethod
    def build(cls, catalog: Catalog) -> "RatingAccuracy":
        return cls()

    def __call__(self, answer: RatingAnswer, example: Example) -> float:
        if not answer.well_formed or answer.rating is None:
            return 0.0
        # Feedback may carry half stars below 1: the reward stays in [-1, 1] as documented.
        return 1.0 - abs(answer.rating - on_scale(float(example["rating"]))) / 2


Retriever = Callable[[str, str, Collection[str]], int | None]
"""(query, item id, items to leave out) -> the item's 1-based rank in the retriever's list for the
query without those items, None when the retriever does not return it."""


class SearchNdcg:
    """Rec-R1's reward (METHODS.md §3): -2 for a malformed answer; otherwise 0.1 (for the format)
    plus the NDCG@k of the held-out item in the retriever's list for the query, the user's seen
    items left out as the gateway leaves them out.

    Example columns: `item_id` (the held-out item), `typed` (what the user typed, sent before the
    model's query), `seen`.

    >>> rank = lambda query, item, seen: 1 if query == "up Toy Story" else None
    >>> SearchNdcg(rank, 10)(SearchAnswer("", "Toy Story", True), {"item_id": "1", "typed": "up"})
    1.1
    """

    name: ClassVar[str] = "search_ndcg"
    task: ClassVar[Task] = Task.search
    MALFORMED: ClassVar[float] = -2.0
    FORMAT: ClassVar[float] = 0.1

    def __init__(self, rank_of: Retriever, k: int = 1000):
        self.rank_of, self.k = rank_of, k

    def __call__(self, answer: SearchAnswer, example: Example) -> float:
        if not answer.well_formed:
            return self.MALFORMED
        query = retriever_query(example.get("typed") or "", answer.query)
        rank = self.rank_of(query, example["item_id"], example.get("seen") or ())
        return self.FORMAT + rank_ndcg(rank, self.k)


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
