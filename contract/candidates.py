"""How candidates are ordered and filtered, by the gateway and by training alike, so that a model
is trained on candidate lists made the way they are served."""

from collections.abc import Iterable, Sequence
from typing import Protocol

OVERFETCH = 4
"""Retrieval depth per candidate wanted (index hits and popular items), to survive the filters."""


class Listing(Protocol):
    """What the filters read of a catalog item."""

    item_id: str
    hidden: bool
    available: bool
    categories: Sequence[str]


def allowed(item: Listing, exclude: set[str], categories: set[str] | None = None) -> bool:
    """Whether an item may be a candidate: shown, available, not excluded, in a wanted category."""
    if item.hidden or not item.available or item.item_id in exclude:
        return False
    return categories is None or bool(categories.intersection(item.categories))


def candidate_order(
    hits: list[tuple[str, float]], popular: list[tuple[str, float]], newest: list[str]
) -> list[tuple[str, float]]:
    """Retrieval hits first, then popular items with one new item after every three.

    Scores are similarities for hits and popularity shares for the rest.
    """
    total = sum(count for _, count in popular) or 1.0
    ranked = [(item_id, count / total) for item_id, count in popular]
    share = dict(ranked)
    mixed: list[tuple[str, float]] = list(hits)
    for i, item_id in enumerate(newest):
        mixed += [*ranked[3 * i : 3 * i + 3], (item_id, share.get(item_id, 0.0))]
    return _unique(mixed + ranked[3 * len(newest) :])


def _unique(pairs: Iterable[tuple[str, float]]) -> list[tuple[str, float]]:
    seen: set[str] = set()
    return [(i, s) for i, s in pairs if not (i in seen or seen.add(i))]
