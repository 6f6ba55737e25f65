"""Ranking metrics: the one implementation used by GRPO rewards and by the offline evaluation.

Definitions follow the offline protocol (`shared/docs/EVAL.md`): binary relevance, ranks start at 1,
ILD is the mean pairwise 1 - Jaccard of category sets, novelty is -log2 of an item's share of the
training interactions.
"""

import math
from collections.abc import Collection, Mapping, Sequence


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")


def _first_occurrences(ranked: Sequence[str], k: int) -> list[tuple[int, str]]:
    """(rank, item) for the top k, keeping only the first time an item appears.

    A repeated id is not a second hit: otherwise a list could score above the ideal one.
    """
    seen: set[str] = set()
    out = []
    for rank, item in enumerate(ranked[:k], start=1):
        if item not in seen:
            seen.add(item)
            out.append((rank, item))
    return out


def dcg_at_k(ranked: Sequence[str], relevant: Collection[str], k: int) -> float:
    """Sum of 1 / log2(rank + 1) over the hits in the top k (binary relevance, rank from 1)."""
    _check_k(k)
    hits = [rank for rank, item in _first_occurrences(ranked, k) if item in relevant]
    return sum(1.0 / math.log2(rank + 1) for rank in hits)


def ndcg_at_k(ranked: Sequence[str], relevant: Collection[str], k: int) -> float:
    """DCG@k divided by the DCG of an ideal list with min(|relevant|, k) hits; 0.0 if none relevant.

    >>> ndcg_at_k(["a", "b", "c"], {"b"}, 10)  # one relevant item at rank 2: 1 / log2(3)
    0.6309297535714575
    """
    _check_k(k)
    relevant = set(relevant)  # an id listed twice is one relevant item
    if not relevant:
        return 0.0
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(len(relevant), k) + 1))
    return dcg_at_k(ranked, relevant, k) / ideal


def rank_ndcg(rank: int | None, k: int) -> float:
    """NDCG@k of a list whose one relevant item sits at 1-based `rank` (None: not in the list);
    what `ndcg_at_k` gives with one relevant item, from its rank alone.

    >>> rank_ndcg(2, 10) == ndcg_at_k(["a", "b"], {"b"}, 10)
    True
    """
    _check_k(k)
    return 1.0 / math.log2(rank + 1) if rank is not None and rank <= k else 0.0


def hit_at_k(ranked: Sequence[str], relevant: Collection[str], k: int) -> float:
    """1.0 if any of the top k is relevant, else 0.0.

    >>> hit_at_k(["a", "b"], {"b"}, 1), hit_at_k(["a", "b"], {"b"}, 2)
    (0.0, 1.0)
    """
    _check_k(k)
    return 1.0 if any(item in relevant for item in ranked[:k]) else 0.0


def jaccard_distance(a: Collection[str], b: Collection[str]) -> float:
    """1 - |a & b| / |a | b|; two empty sets are identical (distance 0)."""
    sa, sb = set(a), set(b)
    union = len(sa | sb)
    return 0.0 if union == 0 else 1.0 - len(sa & sb) / union


def intra_list_distance(category_sets: Sequence[Collection[str]]) -> float:
    """Mean pairwise Jaccard distance of the listed items' category sets; 0.0 for < 2 items.

    >>> intra_list_distance([{"Drama"}, {"Drama", "War"}, {"Comedy"}])  # (0.5 + 1 + 1) / 3
    0.8333333333333334
    """
    sets = [set(categories) for categories in category_sets]
    pairs = [(i, j) for i in range(len(sets)) for j in range(i + 1, len(sets))]
    if not pairs:
        return 0.0
    return sum(jaccard_distance(sets[i], sets[j]) for i, j in pairs) / len(pairs)


def self_information(count: int, total: int) -> float:
    """-log2(popularity share) of an item seen `count` times among `total` interactions.

    EVAL.md's share is count / total (training interactions). It says nothing about items never
    seen in training, whose share 0 would give +inf. The smallest smoothing that keeps the value
    finite without changing any observed item is to count an unseen item as seen once:
    share = max(count, 1) / max(total, 1). An unseen item is then exactly as novel as the rarest
    observed one, and the value lies in [0, log2(max(total, 1))].

    >>> self_information(1, 8), self_information(0, 8), self_information(8, 8)
    (3.0, 3.0, 0.0)
    """
    if count < 0 or count > total:
        raise ValueError(f"need 0 <= count <= total, got count={count}, total={total}")
    return max_self_information(total) - math.log2(max(count, 1))


def max_self_information(total: int) -> float:
    """The largest value `self_information` can take for this total (an item seen at most once)."""
    return math.log2(max(total, 1))


def mean_self_information(
    items: Sequence[str], counts: Mapping[str, int], total: int | None = None
) -> float:
    """Novelty of a list: mean `self_information` of its items; 0.0 for an empty list.

    `counts` maps item id to its number of training interactions (missing = 0); `total` defaults
    to the sum of `counts` and may be passed to avoid summing it for every list.

    >>> mean_self_information(["a", "b"], {"a": 4, "b": 2, "c": 2})  # (1 + 2) / 2
    1.5
    """
    if not items:
        return 0.0
    if total is None:
        total = sum(counts.values())
    return sum(self_information(counts.get(item, 0), total) for item in items) / len(items)
