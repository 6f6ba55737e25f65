"""The trainer's consumer: joins feedback to impressions, persists before acknowledging, and
neither loses nor doubles anything when it crashes in between (real Redis)."""

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from server import store as store_module
from server.config import Settings
from server.store import Store, build_store, open_store
from trainer import feedback_log
from trainer.feedback_log import GROUP, FeedbackLog, LoggedExample


async def _with_store(
    settings: Settings, body: Callable[[Store], Awaitable[Any]], **store: float
) -> Any:
    client = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        return await body(build_store(settings, client, **store))
    finally:
        await client.aclose()


def run(settings: Settings, body: Callable[[Store], Awaitable[Any]]) -> Any:
    return asyncio.run(_with_store(settings, body))


async def impression(
    store: Store, request_id: str, shown: list[str], ts: float = 1700000000.0
) -> None:
    await store.redis.xadd(
        store.keys.impressions,
        {
            "request_id": request_id,
            "user_id": "u1",
            "model_version": "v1",
            "ts": str(ts),
            "k": str(len(shown)),
            "items": json.dumps(shown),
            "candidates": json.dumps([*shown, "z"]),
            "prompt": f"prompt of {request_id}",
            "output": "",
        },
    )


async def event(
    store: Store, kind: str, item: str, request_id: str = "", value: str = "", user: str = "u1"
) -> None:
    fields = {"user_id": user, "item_id": item, "type": kind, "value": value, "ts": "1"}
    await store.redis.xadd(store.keys.events, {**fields, "request_id": request_id})


async def pending(store: Store) -> int:
    total = 0
    for stream in (store.keys.impressions, store.keys.events):
        total += (await store.redis.xpending(stream, GROUP))["pending"]
    return total


def on_disk(log: FeedbackLog) -> dict[str, LoggedExample]:
    """What the log file holds; what `consume` kept of it in memory must be the same."""
    read = log.read()
    assert list(log.logged.items()) == list(read.items())
    return read


def test_joins_feedback_to_the_list_it_answers(settings: Settings) -> None:
    async def body(store: Store) -> None:
        await impression(store, "r1", ["a", "b"])
        await impression(store, "r2", ["c", "d"])
        await event(store, "click", "b", "r1")
        await event(store, "rating", "a", "r1", value="2")  # a low rating: negative
        await event(store, "click", "c")  # organic: no request id
        log = FeedbackLog(store, settings.data_dir / "trainer")
        result = await log.consume()
        assert (result.impressions, result.joined, result.organic) == (2, 2, 1)
        assert result.positives == 1  # the click, not the low rating
        logged = on_disk(log)
        assert logged["r1"].positives == ["b"] and logged["r1"].negatives == ["a"]
        assert logged["r1"].prompt == "prompt of r1" and logged["r1"].candidates == ["a", "b", "z"]
        assert logged["r2"].positives == [] and logged["r2"].negatives == ["c", "d"]  # ignored
        assert await pending(store) == 0

    run(settings, body)


def test_the_log_keeps_the_newest_lists_with_a_positive_and_as_many_without(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    monkeypatch.setattr(feedback_log, "fsync", lambda path: synced.append(path.name))

    async def body(store: Store) -> None:
        log = FeedbackLog(store, settings.data_dir / "trainer", keep=2)
        for n in range(8):  # every other list clicked, an hour apart; more than 3 * keep lists
            await impression(store, f"r{n}", [f"i{n}"], ts=1700000000.0 + n * 3600)
            if n % 2 == 0:
                await event(store, "click", f"i{n}", f"r{n}")
        await log.consume()
        assert synced[:2] == ["trainer", settings.data_dir.name]  # the new file's name, on disk
        assert list(on_disk(log)) == ["r4", "r5", "r6", "r7"]
        assert on_disk(log)["r6"].positives == ["i6"]
        assert len(log.path.read_text().splitlines()) == 4  # rewritten, not only read so
        await event(store, "like", "i5", "r5")  # late feedback still joins a kept idle list
        await log.consume()
        assert on_disk(log)["r5"].positives == ["i5"]
        assert await pending(store) == 0

    run(settings, body)


def test_the_log_keeps_the_lists_of_the_last_hour_up_to_a_bound(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A click comes minutes after its list: a busy hour's lists stay, past `keep`, up to
    RECENT_FACTOR * keep (an hour of heavy traffic would not fit in memory)."""
    monkeypatch.setattr(feedback_log, "RECENT_FACTOR", 3)

    async def body(store: Store) -> None:
        log = FeedbackLog(store, settings.data_dir / "trainer", keep=1)
        for n in range(7):  # lists nobody engaged with (yet), a minute apart
            await impression(store, f"r{n}", [f"i{n}"], ts=1700000000.0 + n * 60)
        await log.consume()
        assert list(on_disk(log)) == ["r4", "r5", "r6"]

    run(settings, body)


def test_the_log_is_not_rewritten_to_drop_little(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Past the trigger (3 x keep) but all of it kept (the last hour's lists): rewriting it at
    every refresh would gain nothing."""

    async def body(store: Store) -> None:
        log = FeedbackLog(store, settings.data_dir / "trainer", keep=1)
        for n in range(4):
            await impression(store, f"r{n}", [f"i{n}"], ts=1700000000.0 + n * 60)
        with caplog.at_level("INFO", logger=feedback_log.__name__):
            await log.consume()
        assert list(on_disk(log)) == ["r0", "r1", "r2", "r3"]
        assert "feedback log compacted" not in caplog.messages

    run(settings, body)


def test_late_feedback_and_feedback_before_its_impression(settings: Settings) -> None:
    async def body(store: Store) -> None:
        log = FeedbackLog(store, settings.data_dir / "trainer")
        await impression(store, "r1", ["a", "b"])
        await log.consume()
        await event(store, "like", "a", "r1")  # after r1 was written: merged into it
        await event(store, "click", "x", "r9")  # r9 not logged yet: waits, not acknowledged
        await log.consume()
        assert on_disk(log)["r1"].positives == ["a"] and on_disk(log)["r1"].negatives == ["b"]
        assert await pending(store) == 1
        await impression(store, "r9", ["x"])
        await log.consume()
        assert on_disk(log)["r9"].positives == ["x"]
        assert await pending(store) == 0

    run(settings, body)


def test_crash_before_acknowledging_loses_and_doubles_nothing(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def crash(*_: Any) -> None:
        raise RuntimeError("killed")

    async def body(store: Store) -> None:
        log = FeedbackLog(store, settings.data_dir / "trainer")
        await impression(store, "r1", ["a", "b"])
        await event(store, "purchase", "b", "r1")
        with monkeypatch.context() as patch:
            patch.setattr(store, "ack", crash)
            with pytest.raises(RuntimeError):
                await log.consume()
        assert await pending(store) == 2  # written, not acknowledged: delivered again
        result = await log.consume()
        assert result.impressions == 1 and result.events == 1
        assert on_disk(log)["r1"].positives == ["b"]
        assert log.path.read_text().count('"request_id":"r1"') == 2  # the record + a merge
        assert await pending(store) == 0

    run(settings, body)


def test_a_record_torn_by_a_crash_is_skipped_and_written_again(settings: Settings) -> None:
    async def body(store: Store) -> None:
        log = FeedbackLog(store, settings.data_dir / "trainer")
        await impression(store, "r1", ["a", "b"])
        await log.consume()
        await impression(store, "r2", ["c"])
        await event(store, "click", "c", "r2")
        # Killed mid-write: half a record, no line end, nothing acknowledged.
        with log.path.open("a") as out:
            out.write('{"request_id":"r2","user_')

        result = await log.consume()

        assert result.written == 1 and result.joined == 1
        assert set(on_disk(log)) == {"r1", "r2"} and on_disk(log)["r2"].positives == ["c"]
        assert await pending(store) == 0

    run(settings, body)


def test_feedback_on_no_logged_list_is_given_up_after_the_wait(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("trainer.feedback_log.JOIN_WAIT_SECONDS", 0.5)

    async def body(store: Store) -> None:
        log = FeedbackLog(store, settings.data_dir / "trainer")
        await event(store, "click", "x", "search-request")  # a search's id: no impression
        assert (await log.consume()).unjoined == 0
        assert await pending(store) == 1  # its impression may still come
        await asyncio.sleep(0.6)

        result = await log.consume()

        assert result.unjoined == 1 and result.written == 0
        assert await pending(store) == 0

    run(settings, body)


def test_feedback_quoting_another_users_list_is_not_joined_to_it(settings: Settings) -> None:
    """A client's mistake: u2's click said u1 clicked, and was trained on as u1's."""

    async def body(store: Store) -> None:
        log = FeedbackLog(store, settings.data_dir / "trainer")
        await impression(store, "r1", ["a", "b"])  # served to u1
        await event(store, "click", "a", "r1", user="u2")
        first = await log.consume()
        await event(store, "click", "b", "r1", user="u2")  # late, on a list already logged

        late = await log.consume()

        assert (first.unjoined, first.joined, late.unjoined, late.joined) == (1, 0, 1, 0)
        assert on_disk(log)["r1"].positives == []
        assert await pending(store) == 0

    run(settings, body)


def test_a_rating_is_positive_from_the_stores_threshold(settings: Settings) -> None:
    """As the store counts it in histories (eval's store counts every rating): a rating of 2
    was a negative of the list and a positive of the history."""

    async def body(store: Store) -> None:
        log = FeedbackLog(store, settings.data_dir / "trainer")
        await impression(store, "r1", ["a", "b"])
        await event(store, "rating", "a", "r1", value="2")

        await log.consume()

        assert (on_disk(log)["r1"].positives, on_disk(log)["r1"].negatives) == (["a"], [])

    asyncio.run(_with_store(settings, body, positive_rating=0.0))


def test_an_unreadable_entry_is_skipped_acknowledged_and_holds_back_nothing(
    settings: Settings,
) -> None:
    async def body(store: Store) -> None:
        log = FeedbackLog(store, settings.data_dir / "trainer")
        await impression(store, "r1", ["a", "b"])
        await store.redis.xadd(  # lists that are not JSON
            store.keys.impressions,
            {"request_id": "r2", "user_id": "u1", "ts": "1", "items": "[a", "prompt": "p"},
        )
        await impression(store, "r3", ["c"])
        await event(store, "view", "a", "r1")  # a type no client may send
        await store.redis.xadd(store.keys.events, {"type": "click", "request_id": "r1"})  # no item
        await event(store, "rating", "a", "r1", value="five")
        await event(store, "rating", "b", "r1", value="nan")
        await event(store, "click", "b", "r1")
        await event(store, "click", "c", "r3")

        result = await log.consume()

        assert (result.unreadable, result.joined, result.written) == (5, 2, 2)
        logged = on_disk(log)
        assert set(logged) == {"r1", "r3"}
        assert logged["r1"].positives == ["b"] and logged["r3"].positives == ["c"]
        assert await pending(store) == 0  # acknowledged: not delivered again
        assert (await log.consume()).unreadable == 0

    run(settings, body)


async def read_all(store: Store) -> list[tuple[str, dict[str, str]]]:
    return [entry async for batch in store.read_group("events", GROUP, "c") for entry in batch]


def test_an_entry_that_is_no_utf8_is_skipped_not_a_stop_to_every_later_read(
    settings: Settings,
) -> None:
    """Written by another program: the reply's decoding failed, the entry stayed pending, and
    every consume and every corpus read after it failed on it again."""

    async def body() -> None:
        async with open_store(settings) as store:  # the client every command uses
            log = FeedbackLog(store, settings.data_dir / "trainer")
            await impression(store, "r1", ["a", "b"])
            poison = {"user_id": "u1", "item_id": "a", "type": b"\xffclick", "request_id": "r1"}
            await store.redis.xadd(store.keys.events, poison)
            await event(store, "click", "b", "r1")

            result = await log.consume()

            assert (result.unreadable, result.joined) == (1, 1)
            assert await pending(store) == 0
            assert len([entry async for entry in store.events()]) == 2  # the corpus reads on

    asyncio.run(body())


def test_a_pending_entry_trimmed_from_its_stream_is_acknowledged(settings: Settings) -> None:
    async def body(store: Store) -> None:
        await impression(store, "r1", ["a"])
        await event(store, "click", "a", "r1")
        assert len(await read_all(store)) == 1  # delivered, never acked
        await store.redis.xtrim(store.keys.events, maxlen=0)  # MAXLEN trimming, meanwhile
        await event(store, "click", "a")

        entries = await read_all(store)

        assert [fields["request_id"] for _, fields in entries] == [""]  # the trimmed one: gone
        await store.ack("events", GROUP, [entry_id for entry_id, _ in entries])
        assert (await store.redis.xpending(store.keys.events, GROUP))["pending"] == 0

    run(settings, body)


def test_every_pending_entry_is_read_once_however_many_chunks_they_fill(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Feedback waiting for its list stays pending from one consume to the next: with more than
    two chunks of it, the second read went over the same chunk for ever."""
    monkeypatch.setattr(store_module, "CHUNK", 3)

    async def body(store: Store) -> None:
        for n in range(10):
            await event(store, "click", "a", f"r{n}")  # quoting lists not logged (yet)
        assert len(await read_all(store)) == 10  # delivered, never acked

        again: list[tuple[str, dict[str, str]]] = []
        async for batch in store.read_group("events", GROUP, "c"):
            again += batch
            assert len(again) <= 10, "an entry was read twice"

        assert sorted(fields["request_id"] for _, fields in again) == sorted(
            f"r{n}" for n in range(10)
        )

    run(settings, body)


def test_a_loaded_data_set_is_consumed_a_chunk_at_a_time(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events without a request id (a loaded data set: millions, for a large one) are
    acknowledged chunk by chunk, never all held at once; joined ones still wait for the write."""
    monkeypatch.setattr(store_module, "CHUNK", 3)
    largest: list[int] = []
    reading = Store.read_group

    async def counted(self: Store, *args: str):
        async for batch in reading(self, *args):
            largest.append(len(batch))
            yield batch

    monkeypatch.setattr(Store, "read_group", counted)

    async def body(store: Store) -> None:
        log = FeedbackLog(store, settings.data_dir / "trainer")
        await impression(store, "r1", ["a", "b"])
        for _ in range(10):
            await event(store, "click", "a")
        await event(store, "click", "b", "r1")

        result = await log.consume()

        assert (result.events, result.organic, result.joined) == (11, 10, 1)
        assert max(largest) == 3
        assert on_disk(log)["r1"].positives == ["b"]
        assert await pending(store) == 0

    run(settings, body)
