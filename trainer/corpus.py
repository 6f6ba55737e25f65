"""What training reads from the store: the catalog, user profiles, interaction sequences and
ratings.

Sequences come from the feedback stream (the durable log), not from the capped recent
histories, and hold what the gateway's histories hold: the positive events as the store counts
them (`server.schemas.is_positive`: click, like, purchase, a rating of 4 or more). Trained on
every rating, a model learnt from prompts the gateway never writes (a history with the films a
user rated 1) and to recommend what users rated low. `reasonrec eval`'s store counts every rating
as positive, as EVAL.md counts every rating as an interaction. Ratings of any value are the
rating task's. Impressions, skips and dislikes are neither. An event that cannot be decoded (no
type, user, item or time, a time or rating that is not a number, a time no date holds) is skipped
and counted (`reasonrec_unreadable_records_total{kind="event"}`).
"""

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from functools import cached_property
from typing import TypeVar

from pydantic import BaseModel

from server.schemas import EventType, Item, readable_time
from server.store import UNREADABLE, Store, skip_unreadable

INTERACTIONS = {EventType.click, EventType.like, EventType.purchase, EventType.rating}
CHUNK = 5000


Pair = TypeVar("Pair", bound=tuple[str, float])


def latest_per_item(pairs: Sequence[Pair]) -> list[Pair]:
    """Each item's last (item, time or rating) pair, in the order of those: what the gateway's
    histories and rated sets keep of a user who came back to an item (a click, then a purchase;
    a rating, then another)."""
    latest: dict[str, Pair] = {}
    for pair in pairs:
        latest.pop(pair[0], None)
        latest[pair[0]] = pair
    return list(latest.values())


class NotEnoughData(ValueError):
    """The store holds too little to train from (the message says what is needed)."""


class Corpus(BaseModel):
    items: dict[str, Item]
    profiles: dict[str, dict]
    sequences: dict[str, list[tuple[str, float]]]
    """Per user, (item id, time) of their positive events in time order; ties keep the order of
    the log."""
    ratings: dict[str, list[tuple[str, float]]] = {}
    """Per user, (item id, rating) of their rating events, in the same order."""
    rated_at: dict[str, float] = {}
    """Per user, the time of their latest rating event (a low rating is no positive event)."""

    @cached_property
    def popularity(self) -> Counter[str]:
        """Interactions per item; counted once (a corpus is read, then only read from)."""
        return Counter(item for seq in self.sequences.values() for item, _ in seq)

    def window(self) -> dict[str, float | int]:
        times = [ts for seq in self.sequences.values() for _, ts in seq]
        return {"first": min(times, default=0), "last": max(times, default=0), "events": len(times)}


async def read_corpus(store: Store) -> Corpus:
    item_ids = await store.item_ids()
    items: dict[str, Item] = {}
    for start in range(0, len(item_ids), CHUNK):
        items |= await store.get_items(item_ids[start : start + CHUNK])
    sequences: dict[str, list[tuple[str, float]]] = defaultdict(list)
    rated: dict[str, list[tuple[str, float, float]]] = defaultdict(list)
    async for event in store.events():
        try:
            interaction = _interaction(event, items)
        except UNREADABLE as exc:
            # Event ids are a user's own: the pair names the event (and its warning).
            ident = f"{event.get('user_id', '')}/{event.get('event_id', '')}"
            skip_unreadable("event", ident, exc)
            continue
        if interaction is None:
            continue
        user, item, ts, rating = interaction
        if store.is_positive(EventType(event["type"]), rating):
            sequences[user].append((item, ts))
        if rating is not None:
            rated[user].append((item, rating, ts))
    for seq in sequences.values():
        seq.sort(key=lambda pair: pair[1])  # stable: ties keep the log's order
    ratings = {
        user: [(item, value) for item, value, _ in sorted(seq, key=lambda row: row[2])]
        for user, seq in rated.items()
    }
    rated_at = {user: max(ts for _, _, ts in seq) for user, seq in rated.items()}
    profiles = await store.profiles(await store.user_ids())
    return Corpus(
        items=items,
        profiles=profiles,
        sequences=dict(sequences),
        ratings=ratings,
        rated_at=rated_at,
    )


def _interaction(
    event: dict[str, str], items: dict[str, Item]
) -> tuple[str, str, float, float | None] | None:
    """(user, item, time, rating or None) of an interaction with a catalog item; None for any other
    event. Raises one of UNREADABLE when the event cannot be decoded."""
    if event["type"] not in INTERACTIONS or event["item_id"] not in items:
        return None
    if readable_time(ts := float(event["ts"])) is None:
        raise ValueError(f"time {event['ts']}")
    rating = None
    if event["type"] == EventType.rating and event.get("value"):
        rating = float(event["value"])
    if rating is not None and not math.isfinite(rating):
        raise ValueError(f"rating {event['value']}")
    return event["user_id"], event["item_id"], ts, rating
