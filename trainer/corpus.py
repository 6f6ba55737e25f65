"""What training reads from the store: the catalog, user profiles and interaction sequences.

Sequences come from the feedback stream (the durable log), not from the capped recent
histories. An interaction is an event that shows the user consumed the item: click, like,
purchase, or a rating of any value (MovieLens users rated what they watched; EVAL.md counts every
rating). Impressions, skips and dislikes are not interactions.
"""

from collections import Counter, defaultdict
from functools import cached_property

from pydantic import BaseModel

from server.schemas import EventType, Item, readable_time
from server.store import Store, skip_unreadable

INTERACTIONS = {EventType.click, EventType.like, EventType.purchase, EventType.rating}
CHUNK = 5000


class NotEnoughData(ValueError):
    """The store holds too little to train from (the message says what is needed)."""


class Corpus(BaseModel):
    items: dict[str, Item]
    profiles: dict[str, dict]
    sequences: dict[str, list[tuple[str, float]]]
    """Per user, (item id, time) in time order; ties keep the order of the log."""
    ratings: dict[str, list[tuple[str, float]]] = {}
    """Per user, (item id, rating) of their rating events, in the same order."""

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
        if event["type"] not in INTERACTIONS or event["item_id"] not in items:
            continue
        if readable_time(ts := float(event["ts"])) is None:
            skip_unreadable("event", event.get("event_id", ""), ValueError(f"time {ts}"))
            continue
        sequences[event["user_id"]].append((event["item_id"], ts))
        if event["type"] == EventType.rating and event.get("value"):
            rated[event["user_id"]].append((event["item_id"], float(event["value"]), ts))
    for seq in sequences.values():
        seq.sort(key=lambda pair: pair[1])  # stable: ties keep the log's order
    ratings = {
        user: [(item, value) for item, value, _ in sorted(seq, key=lambda row: row[2])]
        for user, seq in rated.items()
    }
    profiles = await store.profiles(await store.user_ids())
    return Corpus(items=items, profiles=profiles, sequences=dict(sequences), ratings=ratings)
