"""What training reads from the store: an event that cannot be decoded is skipped and counted,
never raised into the refresh or bootstrap reading the corpus; sequences hold the positive events,
as the gateway's histories do (real Redis)."""

import asyncio

import redis.asyncio as aioredis

from server.config import Settings
from server.schemas import ItemUpsert
from server.store import build_store
from trainer import metrics
from trainer.corpus import Corpus, read_corpus


def skipped() -> float:
    found = metrics.REGISTRY.get_sample_value(
        "reasonrec_unreadable_records_total", {"kind": "event"}
    )
    return found or 0.0


def test_an_unreadable_event_is_skipped_and_counted(settings: Settings) -> None:
    good = {"user_id": "u1", "item_id": "a", "type": "click", "value": "", "ts": "100"}
    broken = [
        {k: v for k, v in good.items() if k != "ts"},  # no time
        good | {"ts": ""},
        good | {"ts": "soon"},
        {k: v for k, v in good.items() if k != "type"},  # no type
        {k: v for k, v in good.items() if k != "user_id"},  # no user
        good | {"type": "rating", "value": "x"},
        good | {"type": "rating", "value": "nan"},
    ]

    async def body() -> None:
        client = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
        try:
            store = build_store(settings, client)
            await store.upsert_items([ItemUpsert(item_id=i, title=i) for i in ("a", "b")])
            for n, fields in enumerate(broken):
                await client.xadd(store.keys.events, fields | {"event_id": f"bad{n}"})
            await client.xadd(store.keys.events, good | {"item_id": "b", "ts": "200"})
            await client.xadd(store.keys.events, good | {"type": "rating", "value": "4"})
            await client.xadd(store.keys.events, good | {"type": "view"})  # not an interaction
            return await read_corpus(store)
        finally:
            await client.aclose()

    before = skipped()
    corpus = asyncio.run(body())

    assert corpus.sequences == {"u1": [("a", 100.0), ("b", 200.0)]}
    assert corpus.ratings == {"u1": [("a", 4.0)]}
    assert skipped() == before + len(broken)


def test_sequences_hold_what_the_gateways_histories_hold(settings: Settings) -> None:
    """A film rated 1 was in every training prompt after it, and a target to recommend; the
    gateway's history leaves it out. A store that counts every rating (eval's) keeps it."""
    events = [("a", "click", ""), ("b", "rating", "1"), ("c", "rating", "4"), ("d", "like", "")]

    async def body(every_rating: bool) -> Corpus:
        client = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
        try:
            if every_rating:  # a store of its own, under this test's prefix
                prefix = f"{settings.key_prefix}:every"
                store = build_store(settings.model_copy(update={"key_prefix": prefix}), client, 0.0)
            else:
                store = build_store(settings, client)
            await store.upsert_items([ItemUpsert(item_id=i, title=i) for i in "abcd"])
            for n, (item, kind, value) in enumerate(events):
                event = {"user_id": "u", "item_id": item, "type": kind, "value": value}
                await client.xadd(store.keys.events, event | {"ts": str(n)})
            return await read_corpus(store)
        finally:
            await client.aclose()

    served = asyncio.run(body(every_rating=False))
    assert [item for item, _ in served.sequences["u"]] == ["a", "c", "d"]
    assert served.ratings == {"u": [("b", 1.0), ("c", 4.0)]}  # the rating task reads them all
    assert served.rated_at == {"u": 2.0}  # the latest rating, not the latest positive event (3)
    evaluated = asyncio.run(body(every_rating=True))
    assert [item for item, _ in evaluated.sequences["u"]] == ["a", "b", "c", "d"]
