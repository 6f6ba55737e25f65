"""Systems the offline harness compares, and the two reference baselines of EVAL.md.

A system is fitted on a `Split` (training interactions only) and then ranks the whole catalog
minus the user's training and validation items. Baselines here: `Popularity` and `ItemKNN`, and
`TitleQuery` (search's retriever); the retrieval stage and the reasonrec LLM pipeline implement
the same protocol elsewhere.
"""

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from server.search_index import SearchIndex
from trainer.evaluation.split import Split


class System(Protocol):
    """What the harness needs from a recommender.

    `recommend` returns at most k distinct catalog ids, best first, never one of the user's
    training or validation items (the harness refuses a list that breaks this). Fewer than k is
    allowed: the missing places count as not ranked.

    Optional: a system whose answers sometimes need repair (an LLM naming items it may not) keeps
    an integer attribute `repairs`, the number of answers it had to repair so far; the harness
    reports the increase during evaluation per evaluated user as `invalid_rate`.
    """

    name: str

    def fit(self, split: Split) -> None: ...

    def recommend(self, user_id: str, k: int) -> list[str]: ...


class _Catalog:
    """Column numbers of the catalog and the ranking shared by the baselines."""

    def __init__(self, split: Split):
        self.split = split
        self.items = np.array(split.catalog, dtype=object)
        self.column = {item: j for j, item in enumerate(split.catalog)}

    def columns(self, items: tuple[str, ...] | frozenset[str]) -> np.ndarray:
        return np.fromiter((self.column[item] for item in items), dtype=np.int64)

    def counts(self) -> np.ndarray:
        return np.array([self.split.popularity[item] for item in self.split.catalog], np.float64)

    def top_k(self, user: str, scores: np.ndarray, tie_order: np.ndarray, k: int) -> list[str]:
        """The k best-scored items the user has not seen; equal scores follow `tie_order`."""
        ordered = scores[tie_order].astype(np.float64)  # a copy: callers' scores stay intact
        seen = np.zeros(len(self.items), dtype=bool)
        seen[self.columns(self.split.seen(user))] = True
        ordered[seen[tie_order]] = -np.inf
        best = np.argsort(-ordered, kind="stable")[:k]
        best = best[np.isfinite(ordered[best])]  # a catalog smaller than k + seen runs out
        return self.items[tie_order[best]].tolist()


class Popularity:
    """Most training interactions first; ties by item id ascending (as integers)."""

    name = "popularity"

    def fit(self, split: Split) -> None:
        self._catalog = _Catalog(split)
        self._counts = self._catalog.counts()
        self._id_order = np.arange(len(split.catalog))  # the catalog is sorted by id already

    def recommend(self, user_id: str, k: int) -> list[str]:
        return self._catalog.top_k(user_id, self._counts, self._id_order, k)


def cosine_similarity(interactions: np.ndarray) -> np.ndarray:
    """Item-item cosine of a binary users x items matrix, with a zero diagonal.

    sim(i, j) = |users of i and j| / sqrt(|users of i| * |users of j|); 0 for an item nobody
    interacted with.
    """
    binary = (interactions > 0).astype(np.float32)
    # float32 counts are exact up to 2**24 co-occurrences; the division is done in float64
    co = (binary.T @ binary).astype(np.float64)
    counts = np.diag(co)
    # sqrt of the exact integer product: sim(i, j) is then correctly rounded, so equal ratios
    # (1/2 from 1/sqrt(2*2) and from 2/sqrt(4*4)) are equal floats and tie as they should
    denominator = np.sqrt(np.outer(counts, counts))
    sim = np.divide(co, denominator, out=np.zeros_like(co), where=denominator > 0)
    np.fill_diagonal(sim, 0.0)
    return sim


class ItemKNN:
    """Item-based kNN of EVAL.md: cosine over training co-occurrence, scored from the last items.

    score(j) = sum of sim(i, j) over the user's last `history` items i. Those are the items the
    user had interacted with before the test item, training and validation, unless
    `include_validation` is false (training only). The similarity itself is built from training
    interactions only. Ties (including items no history item co-occurs with) are broken by
    training popularity, then by item id ascending.

    The dense items x items matrix costs 8 bytes per pair (22 MB for ML-100K's 1682 items).
    """

    name = "item-knn"

    def __init__(self, history: int = 20, include_validation: bool = True):
        if history < 1:
            raise ValueError(f"history must be at least 1, got {history}")
        self.history = history
        self.include_validation = include_validation

    def fit(self, split: Split) -> None:
        self._split = split
        self._catalog = _Catalog(split)
        matrix = np.zeros((len(split.users), len(split.catalog)), dtype=np.float32)
        for row, user in enumerate(split.users):
            matrix[row, self._catalog.columns(split.train[user])] = 1.0
        self._sim = cosine_similarity(matrix)
        self._popularity_order = np.argsort(-self._catalog.counts(), kind="stable")

    def recommend(self, user_id: str, k: int) -> list[str]:
        split = self._split
        known = split.history(user_id) if self.include_validation else split.train.get(user_id, ())
        seeds = self._catalog.columns(known[-self.history :])
        # rounded so that sums equal in exact arithmetic tie (and fall to the tie-breakers)
        # whatever order the floats were added in
        scores = np.round(self._sim[seeds].sum(axis=0), 9)
        return self._catalog.top_k(user_id, scores, self._popularity_order, k)


class TitleQuery:
    """Search's fixed retriever queried with the title of the user's last item (training and
    validation): the raw-query baseline a query-writing model must beat (Rec-R1, issue 17).

    Scores are the retriever's (`server.search_index`); items it does not match (BM25: no shared
    word) are not ranked; ties follow catalog order.
    """

    def __init__(self, index: SearchIndex, titles: Mapping[str, str]):
        self.name = f"title query ({index.kind.value})"
        self._index, self._titles = index, titles

    def fit(self, split: Split) -> None:
        self._split = split
        self._catalog = _Catalog(split)
        position = {item: i for i, item in enumerate(self._index.item_ids)}  # list.index: n²
        self._at = np.array([position[item] for item in split.catalog])
        self._order = np.arange(len(split.catalog))

    def recommend(self, user_id: str, k: int) -> list[str]:
        history = self._split.history(user_id)
        if not history:
            return []
        scores = self._index.scores(self._titles[history[-1]])[self._at]
        scores = np.where(scores > self._index.floor, scores, -np.inf)
        return self._catalog.top_k(user_id, scores, self._order, k)
