"""Everything in Redis goes through `Store`: catalog, users, feedback and impression streams,
model pointers and their announcements, the trainer's lock. No other module touches Redis keys."""

import json
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import cached_property
from importlib import resources
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import ResponseError

from contract.impression import Impression
from contract.rating import LEAN_WINDOW, Stats, user_lean
from server import metrics
from server.config import Settings
from server.keys import Keys
from server.logs import describe
from server.redis_client import connect
from server.schemas import (
    POSITIVE_RATING,
    Attributes,
    EventType,
    FeedbackEvent,
    HistoryEntry,
    Item,
    ItemUpsert,
    Listed,
    User,
    UserUpsert,
    is_positive,
    readable_time,
)

log = logging.getLogger(__name__)

FEEDBACK_SCRIPT = resources.files("server").joinpath("feedback.lua").read_text()
# A checked activation that finds its own version active is done: it is a retry of one whose reply
# was lost (the connection dropped), and answers as that one did.
# A version the registry is removing is refused: its folder may be gone by the time gateways
# open it (`mark_pruning`).
ACTIVATE_SCRIPT = """
if redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 1 then return {2, ''} end
local old = redis.call('GET', KEYS[1])
if ARGV[3] == '1' and (old or '') ~= ARGV[2] then
  if old == ARGV[1] then return {1, redis.call('GET', KEYS[2]) or ''} end
  return {0, old or ''}
end
redis.call('SET', KEYS[1], ARGV[1])
-- Activated again (gateways that refused it try it again): it answers the previous version.
if old == ARGV[1] then
  old = redis.call('GET', KEYS[2])
elseif old then
  redis.call('SET', KEYS[2], old)
end
redis.call('PUBLISH', KEYS[3], ARGV[1])
return {1, old or ''}
"""
RENEW_SCRIPT = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then "
    "return redis.call('EXPIRE', KEYS[1], ARGV[2]) end"
)
RELEASE_SCRIPT = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end"
)
CHUNK = 1000  # entries per stream read, keys per delete
Stream = Literal["impressions", "events"]


# A day: ample for a client to retry a write that answered 503, short enough that ids nobody
# chose do not pile up in Redis.
ASSIGNED_ID_SECONDS = 86_400


# Longer than any removal of versions takes; a pruner killed half-way frees its versions then.
PRUNING_SECONDS = 300


class BeingRemoved(Exception):
    """The version to activate is being removed from the registry (pruned)."""

    def __init__(self, version: str):
        super().__init__(f"model version '{version}' is being removed from the registry")


class ActiveModelChanged(Exception):
    """Another version became active than the one an activation was to replace."""

    def __init__(self, active: str | None):
        super().__init__(f"{active or 'no version'} is active now")
        self.active = active


class UnknownItems(Exception):
    """A feedback batch names items that are not in the catalog; nothing was written."""

    def __init__(self, indexes: list[int]):
        super().__init__(f"{len(indexes)} event(s) name unknown items")
        self.indexes = indexes


class UnreadableStoredData(ResponseError):
    """Stored data a feedback batch writes to or compares with cannot be read: a key of another
    type, or a rating sum, count or time that is no number (written by hand or by another
    program); nothing was written. A ResponseError, as Redis's own WRONGTYPE is: whoever handles
    that handles this alike (bad data, not an outage)."""

    def __init__(self, index: int, problem: str):
        super().__init__(f"event {index}: {problem}")
        self.index = index


def _ts(value: datetime) -> str:
    return repr(value.timestamp())


def _time_or_none(value: str) -> datetime | None:
    try:
        return _dt(value)
    except ValueError:
        return None


def _dt(value: str | float) -> datetime:
    if (converted := readable_time(float(value))) is None:
        raise ValueError(f"{value} is not a readable time")
    return converted


UNREADABLE = (KeyError, TypeError, ValueError, OverflowError, ValidationError)
"""What decoding a record that was written by hand, or before a validation rule existed, raises."""


UNREADABLE_LOG_SECONDS = 60.0
_REMEMBERED = 1024  # records whose last warning is remembered, the most recent
_warned_at: OrderedDict[tuple[str, str], float] = OrderedDict()
_warned_lock = threading.Lock()  # the trainer skips records in threads too


def skip_unreadable(kind: str, ident: str, exc: Exception) -> None:
    """A stored record that cannot be decoded is skipped, never raised into a request. Counted
    each time, logged at most once per UNREADABLE_LOG_SECONDS: a user's unreadable record is met
    by every request of theirs."""
    metrics.UNREADABLE_RECORDS.labels(kind).inc()
    now, key = time.monotonic(), (kind, ident)
    with _warned_lock:
        if now - _warned_at.get(key, -math.inf) < UNREADABLE_LOG_SECONDS:
            return
        _warned_at[key] = now
        _warned_at.move_to_end(key)
        if len(_warned_at) > _REMEMBERED:
            _warned_at.popitem(last=False)
    log.warning(
        "unreadable record skipped", extra={"kind": kind, "id": ident, "reason": describe(exc)}
    )


def _readable_ratings(user_id: str, stored: dict[str, str]) -> dict[str, float]:
    """A user's stored ratings by item, those that are not a rating left out."""
    readable = {}
    for item_id, raw in stored.items():
        try:
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError(f"rating {raw}")
        except UNREADABLE as exc:
            skip_unreadable("rating", f"{user_id}/{item_id}", exc)
            continue
        readable[item_id] = value
    return readable


def _readable_stats(ident: str, total: str | None, count: str | None) -> Stats:
    """A stored rating sum and count as a mean; none when they cannot be read."""
    try:
        stats = Stats.of(float(total or 0), int(count or 0))
        if stats.mean is not None and not math.isfinite(stats.mean):
            raise ValueError(f"sum {total}")
    except UNREADABLE as exc:
        skip_unreadable("rating_stats", ident, exc)
        return Stats()
    return stats


STORED_ATTRIBUTES = TypeAdapter(Attributes)


def attributes_of(owner: str, raw: str | None) -> dict[str, Any]:
    """A user's stored attributes; empty when there are none, or they cannot be read or are not
    what the API accepts (a list, null or object, written by hand or by another program)."""
    try:
        return STORED_ATTRIBUTES.validate_python(json.loads(raw)) if raw else {}
    except UNREADABLE as exc:
        skip_unreadable("user", owner, exc)
        return {}


def _flag(value: bool) -> str:
    return "1" if value else "0"


def _item_fields(item: ItemUpsert) -> dict[str, str]:
    return {
        "title": item.title,
        "categories": json.dumps(item.categories),
        "attributes": json.dumps(item.attributes),
        "description": item.description,
        "available": _flag(item.available),
        "promoted": _flag(item.promoted),
        "boost": repr(item.boost),
        "hidden": "0",
    }


def _item_from_hash(item_id: str, raw: dict[str, str]) -> Item | None:
    try:
        return _decode_item(item_id, raw)
    except UNREADABLE as exc:
        skip_unreadable("item", item_id, exc)
        return None


def _decode_item(item_id: str, raw: dict[str, str]) -> Item:
    return Item(
        title=raw["title"],
        description=raw["description"],
        promoted=raw["promoted"] == "1",
        boost=float(raw["boost"]),
        created_at=_dt(raw["created_at"]),
        **_listing(item_id, raw),
    )


LISTED = ("categories", "attributes", "available", "hidden")


def _listing(item_id: str, raw: dict[str, str]) -> dict[str, Any]:
    """The fields of an item the filters read (LISTED), decoded."""
    return {
        "item_id": item_id,
        "categories": json.loads(raw["categories"]),
        "attributes": json.loads(raw["attributes"]),
        "available": raw["available"] == "1",
        "hidden": raw["hidden"] == "1",
    }


def _listed(item_id: str, values: list[str | None]) -> Listed | None:
    raw = {field: value for field, value in zip(LISTED, values, strict=True) if value is not None}
    try:
        return Listed(**_listing(item_id, raw))
    except UNREADABLE as exc:
        skip_unreadable("item", item_id, exc)
        return None


class RatingContext(BaseModel):
    profile: dict[str, Any]
    recent: list[tuple[str, float]] = Field(description="(item, rating), oldest first.")
    latest: list[tuple[str, float]] = Field(
        description="The last LEAN_WINDOW (item, rating), oldest first: what the lean is from."
    )
    ratings: dict[str, float] = Field(description="Every item the user rated -> latest rating.")
    items: dict[str, Stats] = Field(description="Stats of the items to rate and of those rated.")
    everyone: Stats

    @cached_property
    def lean(self) -> float | None:
        """The user's lean, once per request however many items it rates."""
        latest = [(value, self.items.get(item, Stats())) for item, value in self.latest]
        return user_lean(self.everyone, latest)


class Served(NamedTuple):
    user_id: str | None  # None: written before users were (a key of an older gateway)
    version: str


def _served(shown: str | None, served: str | None) -> Served | None:
    """From a `shown:` key ("user version"), else from a `served:` key (the version)."""
    if shown:
        user, _, version = shown.partition(" ")  # written by hand without one: no version
        return Served(user, version)
    return None if served is None else Served(None, served)


class RedisMemory(BaseModel):
    used_bytes: int
    max_bytes: int = Field(description="Its cap (`maxmemory`); 0: none.")


class Store:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        history_size: int,
        dedup_ttl_seconds: int,
        positive_rating: float = POSITIVE_RATING,
        events_maxlen: int = 0,
    ):
        self.redis = redis
        self.keys = keys
        self.history_size = history_size
        self.dedup_ttl_seconds = dedup_ttl_seconds
        self.events_maxlen = events_maxlen  # about how many events the stream keeps; 0: all
        # The lowest rating that enters history and popularity (the offline protocol counts all).
        self.positive_rating = positive_rating
        self._feedback = redis.register_script(FEEDBACK_SCRIPT)
        self._activate = redis.register_script(ACTIVATE_SCRIPT)
        self._renew = redis.register_script(RENEW_SCRIPT)
        self._release = redis.register_script(RELEASE_SCRIPT)

    def is_positive(self, kind: EventType, value: float | None) -> bool:
        """Whether an event enters history and popularity, at this store's lowest positive
        rating."""
        return is_positive(kind, value, self.positive_rating)

    async def ping(self) -> None:
        await self.redis.ping()

    # Items ---------------------------------------------------------------------------------

    async def upsert_items(self, items: Sequence[ItemUpsert]) -> int:
        """Write items, and say how many: an id given twice is one item, the last one given (as
        two puts one after the other). An upsert un-hides an item and keeps its first creation
        time (unless that time cannot be read: then the item is created now, so that a put
        repairs it)."""
        items = list({item.item_id: item for item in items}.values())
        now = datetime.now(UTC).timestamp()
        unreadable = await self._unreadable_creation(items)
        async with self.redis.pipeline(transaction=True) as pipe:
            for item in items:
                key = self.keys.item(item.item_id)
                pipe.hset(key, mapping=_item_fields(item))
                if item.created_at is None and item.item_id in unreadable:
                    pipe.hset(key, "created_at", repr(now))
                    pipe.zadd(self.keys.created, {item.item_id: now})
                elif item.created_at is None:
                    pipe.hsetnx(key, "created_at", repr(now))
                    pipe.zadd(self.keys.created, {item.item_id: now}, nx=True)
                else:
                    pipe.hset(key, "created_at", _ts(item.created_at))
                    pipe.zadd(self.keys.created, {item.item_id: item.created_at.timestamp()})
            pipe.sadd(self.keys.items, *(item.item_id for item in items))
            pipe.srem(self.keys.hidden, *(item.item_id for item in items))
            pipe.incr(self.keys.catalog_version)  # what the search index follows
            await pipe.execute()
        return len(items)

    async def _unreadable_creation(self, items: Sequence[ItemUpsert]) -> set[str]:
        """Items to be kept at their stored creation time whose stored time cannot be read."""
        keeping = [item.item_id for item in items if item.created_at is None]
        if not keeping:
            return set()
        async with self.redis.pipeline(transaction=False) as pipe:
            for item_id in keeping:
                pipe.hget(self.keys.item(item_id), "created_at")
            stored = await pipe.execute()
        return {
            item_id
            for item_id, value in zip(keeping, stored, strict=True)
            if value is not None and _time_or_none(value) is None
        }

    async def catalog_version(self) -> int:
        """How many item writes the catalog has had: it changes whenever an item's text may."""
        return int(await self.redis.get(self.keys.catalog_version) or 0)

    async def get_item(self, item_id: str) -> Item | None:
        """The item, or None when it does not exist or its record cannot be read."""
        raw = await self.redis.hgetall(self.keys.item(item_id))
        return _item_from_hash(item_id, raw) if raw else None

    async def get_items(self, item_ids: Sequence[str]) -> dict[str, Item]:
        """The readable items that exist among `item_ids`, in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for item_id in item_ids:
                pipe.hgetall(self.keys.item(item_id))
            found = await pipe.execute()
        decoded = (
            (i, _item_from_hash(i, raw)) for i, raw in zip(item_ids, found, strict=True) if raw
        )
        return {i: item for i, item in decoded if item is not None}

    async def listings(self, item_ids: Sequence[str]) -> dict[str, Listed]:
        """What the filters read of the readable items among `item_ids`, in one round trip: a
        filter that few items pass reads thousands, whose descriptions (up to 20,000
        characters each) it does not need."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for item_id in item_ids:
                pipe.hmget(self.keys.item(item_id), LISTED)
            found = await pipe.execute()
        listed = (
            (i, _listed(i, values))
            for i, values in zip(item_ids, found, strict=True)
            if any(value is not None for value in values)
        )
        return {i: item for i, item in listed if item is not None}

    async def popular(self, limit: int) -> list[tuple[str, float]]:
        """Most engaged-with items and their positive-event counts, most popular first.

        An infinite count (written by hand) is skipped and counted: it would make every item's
        share NaN. Left out by Redis, so that `limit` readable items still come back when there
        are as many (retrieval reads deeper only when a source came back full)."""
        key = self.keys.popularity
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrevrangebyscore(key, "(+inf", "(-inf", start=0, num=limit, withscores=True)
            pipe.zrangebyscore(key, "+inf", "+inf", start=0, num=limit)
            pipe.zrangebyscore(key, "-inf", "-inf", start=0, num=limit)
            readable, above, below = await pipe.execute()
        for item_id in [*above, *below]:
            skip_unreadable("popularity", item_id, ValueError("an infinite count"))
        return readable

    async def newest(self, limit: int) -> list[str]:
        return await self.redis.zrevrange(self.keys.created, 0, limit - 1)

    async def hide_item(self, item_id: str) -> bool:
        """Hide an item from recommendations for good; its history and events stay."""
        if not await self.redis.sismember(self.keys.items, item_id):
            return False
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.item(item_id), "hidden", "1")
            pipe.sadd(self.keys.hidden, item_id)
            await pipe.execute()
        return True

    async def item_ids(self) -> list[str]:
        return sorted(await self.redis.smembers(self.keys.items))

    async def count_items(self) -> int:
        return await self.redis.scard(self.keys.items)

    async def begin_load(self) -> None:
        """Mark a dataset load as running until `end_load`, so that one cut short shows."""
        await self.redis.set(self.keys.loading, "1")

    async def end_load(self) -> None:
        await self.redis.delete(self.keys.loading)

    async def load_unfinished(self) -> bool:
        return bool(await self.redis.exists(self.keys.loading))

    # Users ---------------------------------------------------------------------------------

    async def upsert_users(self, users: Sequence[UserUpsert]) -> int:
        async with self.redis.pipeline(transaction=True) as pipe:
            for user in users:
                pipe.hset(self.keys.user(user.user_id), "attributes", json.dumps(user.attributes))
            pipe.sadd(self.keys.users, *(user.user_id for user in users))
            await pipe.execute()
        return len(users)

    async def get_user(self, user_id: str) -> User | None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.sismember(self.keys.users, user_id)
            pipe.hget(self.keys.user(user_id), "attributes")
            pipe.zrevrange(self.keys.history(user_id), 0, -1, withscores=True)
            known, attributes, history = await pipe.execute()
        if not known:
            return None
        titles = await self._titles([item_id for item_id, _ in history])
        entries = []
        for (item_id, ts), title in zip(history, titles, strict=True):
            if (timestamp := readable_time(ts)) is None:
                skip_unreadable("history", f"{user_id}/{item_id}", ValueError(f"time {ts}"))
                continue
            entries.append(HistoryEntry(item_id=item_id, timestamp=timestamp, title=title))
        return User(user_id=user_id, attributes=attributes_of(user_id, attributes), history=entries)

    async def user_context(
        self, user_id: str, history_limit: int
    ) -> tuple[dict[str, Any], list[tuple[str, float]], set[str]]:
        """A user's profile, last `history_limit` history entries ((item id, time), oldest first)
        and seen items, in one round trip; unreadable entries are skipped and counted."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(self.keys.user(user_id), "attributes")
            pipe.zrange(self.keys.history(user_id), -history_limit, -1, withscores=True)
            pipe.smembers(self.keys.seen(user_id))
            attributes, history, seen = await pipe.execute()
        readable = []
        for item_id, ts in history if history_limit else []:
            if readable_time(ts) is None:
                skip_unreadable("history", f"{user_id}/{item_id}", ValueError(f"time {ts}"))
            else:
                readable.append((item_id, ts))
        return attributes_of(user_id, attributes), readable, set(seen)

    async def seen_items(self, user_id: str) -> set[str]:
        return set(await self.redis.smembers(self.keys.seen(user_id)))

    async def rating_context(
        self, user_id: str, item_ids: Sequence[str], history_limit: int
    ) -> RatingContext:
        """What rating `item_ids` for a user needs, in two round trips: the user's profile, their
        latest `history_limit` ratings and all their ratings, and the rating stats of those items,
        of the items to rate and of everyone."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(self.keys.user(user_id), "attributes")
            pipe.zrange(self.keys.rated(user_id), -max(history_limit, LEAN_WINDOW), -1)
            pipe.hgetall(self.keys.ratings(user_id))
            pipe.hmget(self.keys.rating_total, ["sum", "count"])
            attributes, recent, ratings, total = await pipe.execute()
        values = _readable_ratings(user_id, ratings)
        wanted = list(dict.fromkeys([*item_ids, *values]))
        latest = [(i, values[i]) for i in recent if i in values]
        return RatingContext(
            profile=attributes_of(user_id, attributes),
            recent=latest[-history_limit:] if history_limit else [],
            latest=latest[-LEAN_WINDOW:],
            ratings=values,
            items=await self._rating_stats(wanted),
            everyone=_readable_stats("everyone", *total),
        )

    async def _rating_stats(self, item_ids: list[str]) -> dict[str, Stats]:
        if not item_ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(self.keys.rating_sums, item_ids)
            pipe.hmget(self.keys.rating_counts, item_ids)
            sums, counts = await pipe.execute()
        return {
            item: _readable_stats(item, total, count)
            for item, total, count in zip(item_ids, sums, counts, strict=True)
        }

    async def user_ids(self) -> list[str]:
        return sorted(await self.redis.smembers(self.keys.users))

    async def profiles(self, user_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for user_id in user_ids:
                pipe.hget(self.keys.user(user_id), "attributes")
            found = await pipe.execute()
        return {u: attributes_of(u, raw) for u, raw in zip(user_ids, found, strict=True)}

    async def _titles(self, item_ids: list[str]) -> list[str | None]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for item_id in item_ids:
                pipe.hget(self.keys.item(item_id), "title")
            return await pipe.execute()

    # Models --------------------------------------------------------------------------------

    async def active_model(self) -> str | None:
        return await self.redis.get(self.keys.active_model)

    async def previous_model(self) -> str | None:
        return await self.redis.get(self.keys.previous_model)

    async def serving_models(self) -> set[str]:
        """The active version and the one it replaced: what gateways serve or roll back to."""
        versions = await self.redis.mget(self.keys.active_model, self.keys.previous_model)
        return {version for version in versions if version}

    async def set_active_model(
        self, version: str, replacing: str | None = None, checked: bool = False
    ) -> str | None:
        """Point serving at `version`, remember the one it replaces, tell every gateway.

        One script, so that two activations at once cannot record the wrong previous version.
        Returns the version that was active before. With `replacing` or `checked`, only if
        `replacing` (None: no version) is still the active one (else ActiveModelChanged, and
        nothing changes), or `version` already is: then it returns the version recorded as
        previous, as the first try of a retried activation did.
        """
        keys = [self.keys.active_model, self.keys.previous_model, self.keys.model_updates]
        checked = checked or replacing is not None
        args = [version, replacing or "", "1" if checked else "0"]
        done, old = await self._activate(keys=[*keys, self.keys.pruning], args=args)
        if done == 2:
            raise BeingRemoved(version)
        if not done:
            raise ActiveModelChanged(old or None)
        return old or None

    async def mark_pruning(self, versions: list[str]) -> set[str]:
        """Have activation refuse `versions` (for PRUNING_SECONDS at most), then read the active
        and the previous version: an activation either came first, and is read, or is refused."""
        async with self.redis.pipeline(transaction=True) as pipe:
            if versions:
                pipe.sadd(self.keys.pruning, *versions)
                pipe.expire(self.keys.pruning, PRUNING_SECONDS)
            pipe.mget(self.keys.active_model, self.keys.previous_model)
            *_, serving = await pipe.execute()
        return {version for version in serving if version}

    async def unmark_pruning(self, versions: list[str]) -> None:
        if versions:
            await self.redis.srem(self.keys.pruning, *versions)

    @asynccontextmanager
    async def model_updates(self) -> AsyncIterator[PubSub]:
        """A subscription to activations (`set_active_model` publishes each version)."""
        async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.subscribe(self.keys.model_updates)
            yield pubsub

    # The trainer's lock ---------------------------------------------------------------------

    async def take_trainer_lock(self, token: str, seconds: int) -> bool:
        """Hold the lock for `seconds` under `token`; False when someone else holds it."""
        return await self._take(self.keys.trainer_lock, token, seconds)

    async def take_prune_lock(self, token: str) -> bool:
        """One prune at a time (for PRUNING_SECONDS at most): a second one's marks and removals
        would cross the first's. False when another prune holds it."""
        return await self._take(self.keys.prune_lock, token, PRUNING_SECONDS)

    async def renew_prune_lock(self, token: str) -> bool:
        """Hold the lock PRUNING_SECONDS more, or take it again if it lapsed and is free; False
        when another prune holds it."""
        renewed = await self._renew(keys=[self.keys.prune_lock], args=[token, PRUNING_SECONDS])
        return bool(renewed) or await self.take_prune_lock(token)

    async def release_prune_lock(self, token: str) -> None:
        await self._release(keys=[self.keys.prune_lock], args=[token])

    async def _take(self, lock: str, token: str, seconds: int) -> bool:
        if await self.redis.set(lock, token, nx=True, ex=seconds):
            return True
        # A retry of a SET whose reply was lost (the connection dropped) finds the lock its own.
        return await self.redis.get(lock) == token

    async def renew_trainer_lock(self, token: str, seconds: int) -> bool:
        """Extend the lock if `token` still holds it; False when it does not (it lapsed, or
        another refresh took it)."""
        return bool(await self._renew(keys=[self.keys.trainer_lock], args=[token, seconds]))

    async def release_trainer_lock(self, token: str) -> None:
        """Release the lock if `token` still holds it (a lapsed lock may have a new holder)."""
        await self._release(keys=[self.keys.trainer_lock], args=[token])

    # Impressions ---------------------------------------------------------------------------

    async def log_impression(
        self, impression: Impression, maxlen: int | None, attribution_seconds: int
    ) -> None:
        """Append a served list to the impressions stream and remember, for a while, which
        version served its request id, to whom (so feedback can be credited without reading the
        stream)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(self.keys.impressions, impression.fields(), maxlen=maxlen, approximate=True)
        # Ids hold no whitespace; a version is a name the server gives. Under a key of its own
        # (`served:` held the version alone): a gateway of the release before, beside this one
        # in a rollout, would count "user version" as a version, a metric series per user.
        shown = self.keys.shown(impression.request_id)
        pipe.set(shown, f"{impression.user_id} {impression.model_version}", ex=attribution_seconds)
        await pipe.execute()

    async def served_by(self, request_ids: Sequence[str]) -> list[Served | None]:
        """Who was served each request id and by which version ("" for none), None once
        forgotten."""
        if not request_ids:
            return []
        keys = [self.keys.shown(r) for r in request_ids] + [
            self.keys.served(r) for r in request_ids
        ]
        found = await self.redis.mget(keys)
        shown, served = found[: len(request_ids)], found[len(request_ids) :]
        return [_served(value, old) for value, old in zip(shown, served, strict=True)]

    # Feedback ------------------------------------------------------------------------------

    async def add_feedback(
        self,
        events: Sequence[FeedbackEvent],
        dedup_ttl_seconds: int | None = None,
        assigned: frozenset[int] = frozenset(),
    ) -> list[bool]:
        """Append events atomically; True for each stored event, False for a duplicate.

        `dedup_ttl_seconds` overrides how long event ids are remembered (0: forever); the ids of
        the events at the `assigned` indexes were made up by the server, and are remembered only
        as long as a client may retry (ASSIGNED_ID_SECONDS).
        Raises UnknownItems, having written nothing, if any event names an unknown item, and
        UnreadableStoredData, having written nothing, if stored data an event needs cannot be read.
        """
        ttl = self.dedup_ttl_seconds if dedup_ttl_seconds is None else dedup_ttl_seconds
        # The call's own token: run again after a lost reply, the script knows what it stored.
        token = secrets.token_urlsafe(9)
        args: list[str | int] = [
            self.keys.prefix,
            self.history_size,
            token,
            len(events),
            self.events_maxlen,
        ]
        for i, event in enumerate(events):
            args += [
                event.user_id,
                event.item_id,
                event.type.value,
                "" if event.value is None else repr(event.value),
                event.request_id or "",
                event.event_id or "",
                _ts(event.timestamp),
                _flag(self.is_positive(event.type, event.value)),
                ASSIGNED_ID_SECONDS if i in assigned else ttl,
            ]
        status, payload = await self._feedback(args=args)
        if status == -1:
            raise UnknownItems([int(i) for i in payload])
        if status == -2:
            raise UnreadableStoredData(int(payload[0]), payload[1])
        return [flag == "1" for flag in payload]

    async def events(self) -> AsyncIterator[dict[str, str]]:
        """Every feedback event, oldest first, read a chunk at a time."""
        start = "-"
        while True:
            batch = await self.redis.xrange(self.keys.events, min=start, count=CHUNK)
            for _, fields in batch:
                yield fields
            if len(batch) < CHUNK:
                return
            start = "(" + batch[-1][0]

    async def events_kept(self) -> int:
        """Events the stream holds now."""
        try:
            return await self.redis.xlen(self.keys.events)
        except ResponseError as exc:  # the feedback script names the key; so must this
            if "WRONGTYPE" not in str(exc):
                raise
            raise ResponseError(f"{self.keys.events} is not a stream") from exc

    async def event_count(self) -> int:
        """Events ever added to the stream, those trimmed since included (Redis 7; before it, the
        events it holds): a count that only grows, for the trainer's schedule."""
        try:
            info = await self.redis.xinfo_stream(self.keys.events)
        except ResponseError as exc:
            if "no such key" not in str(exc).lower():
                raise
            return 0
        return int(info.get("entries-added", info["length"]))

    async def memory(self) -> RedisMemory | None:
        """What Redis holds against its cap (the whole server's: every prefix counts); None when
        it does not say (a managed Redis or a proxy may leave the fields out)."""
        info = await self.redis.info("memory")
        if "used_memory" not in info:
            return None
        return RedisMemory(used_bytes=info["used_memory"], max_bytes=info.get("maxmemory", 0))

    # Consumer groups on the two streams --------------------------------------------------------

    def _stream(self, stream: Stream) -> str:
        return {"impressions": self.keys.impressions, "events": self.keys.events}[stream]

    async def read_group(
        self, stream: Stream, group: str, consumer: str
    ) -> AsyncIterator[list[tuple[str, dict[str, str]]]]:
        """Every entry not yet acknowledged by `group`, CHUNK at a time: pending ones first
        (delivered before a crash, never acknowledged), then new ones. Creates the group on first
        use. In chunks: the first read after loading a data set meets every event it wrote.

        A pending entry trimmed from the stream meanwhile (MAXLEN) comes back without fields: it
        is acknowledged here, as there is nothing left to read, so that it is not read again."""
        key = self._stream(stream)
        try:
            await self.redis.xgroup_create(key, group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        for start in ("0", ">"):
            while True:
                found = await self.redis.xreadgroup(group, consumer, {key: start}, count=CHUNK)
                batch = found[0][1] if found else []
                if entries := [(entry_id, fields) for entry_id, fields in batch if fields]:
                    yield entries
                if trimmed := [entry_id for entry_id, fields in batch if entry_id and not fields]:
                    await self.redis.xack(key, group, *trimmed)
                    log.info("trimmed pending entries acknowledged", extra={"count": len(trimmed)})
                if len(batch) < CHUNK:
                    break
                if start != ">":  # pending entries: the next chunk is after this one's last
                    start = batch[-1][0]

    async def ack(self, stream: Stream, group: str, entry_ids: Sequence[str]) -> None:
        for start in range(0, len(entry_ids), CHUNK):
            await self.redis.xack(self._stream(stream), group, *entry_ids[start : start + CHUNK])

    # The whole deployment ------------------------------------------------------------------

    async def drop_everything(self) -> None:
        """Delete every key under this store's prefix (a throwaway store, as offline evaluation
        makes on a shared Redis)."""
        match = f"{self.keys.prefix}:*"
        keys = [key async for key in self.redis.scan_iter(match=match, count=CHUNK)]
        for start in range(0, len(keys), CHUNK):
            await self.redis.delete(*keys[start : start + CHUNK])


def build_store(
    settings: Settings, redis: Redis, positive_rating: float = POSITIVE_RATING
) -> Store:
    return Store(
        redis,
        Keys(settings.key_prefix),
        history_size=settings.history_size,
        dedup_ttl_seconds=settings.dedup_ttl_seconds,
        positive_rating=positive_rating,
        events_maxlen=settings.events_maxlen,
    )


@asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[Store]:
    """A store outside the app (CLI, trainer); closes its connection, or embedded Redis, after."""
    handle = connect(settings)
    try:
        yield build_store(settings, handle.client)
    finally:
        await handle.close()
