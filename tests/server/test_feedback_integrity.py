"""What a write stores, however it gets there: event ids per user, writes that time out or lose
their reply, events a moment apart, and user records the API would not accept."""

import asyncio
import random
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import pytest
import redis
from fastapi.testclient import TestClient
from redis.exceptions import TimeoutError as RedisTimeout

from server.config import Settings
from server.schemas import FeedbackEvent, ItemUpsert
from server.store import Store, open_store
from tests.conftest import RedisProcess
from tests.server.helpers import metric, post_events, put_items

T0 = datetime(2024, 1, 1, tzinfo=UTC)
UNREADABLE = "reasonrec_unreadable_records_total"


def _click(user: str, item: str, at: datetime, event_id: str | None = None) -> FeedbackEvent:
    return FeedbackEvent(user_id=user, item_id=item, type="click", timestamp=at, event_id=event_id)


async def _history(store: Store, user: str) -> list[tuple[str, datetime]]:
    found = await store.get_user(user)
    assert found is not None
    return [(entry.item_id, entry.timestamp) for entry in found.history]


async def _stream_users(store: Store) -> list[str]:
    return [event["user_id"] async for event in store.events()]


# Event ids are each user's own ----------------------------------------------------------------


def test_an_event_id_is_each_users_own(client: TestClient) -> None:
    put_items(client, "a", "b")
    alice = post_events(
        client, {"user_id": "alice", "item_id": "a", "type": "like", "event_id": "1"}
    )
    bob = post_events(client, {"user_id": "bob", "item_id": "b", "type": "like", "event_id": "1"})
    again = post_events(client, {"user_id": "bob", "item_id": "b", "type": "like", "event_id": "1"})

    assert (alice.json()["accepted"], bob.json()["accepted"]) == (1, 1)
    assert (again.json()["accepted"], again.json()["duplicates"]) == (0, 1)
    assert [h["item_id"] for h in client.get("/v1/users/bob").json()["history"]] == ["b"]


# A write that times out is not sent again -----------------------------------------------------


async def test_a_write_that_times_out_is_not_sent_again(
    settings: Settings, redis_process: RedisProcess
) -> None:
    """A slow Redis runs the command it was sent even though the client stopped waiting: a retry
    would store it twice (an event stored without an id has nothing to stop it)."""
    own = settings.model_copy(update={"redis_url": redis_process.url, "redis_timeout_seconds": 0.5})
    async with open_store(own) as store:
        await store.upsert_items([ItemUpsert(item_id="a", title="A")])
        await store.add_feedback([_click("warm", "a", T0)])  # the script is loaded
        assert redis_process.proc is not None
        redis_process.proc.send_signal(signal.SIGSTOP)
        resume = threading.Timer(0.8, redis_process.proc.send_signal, [signal.SIGCONT])
        resume.start()
        try:
            with pytest.raises(RedisTimeout):
                await store.add_feedback([_click("u1", "a", T0)])
        finally:
            resume.join()
        assert await _stream_users(store) == ["warm", "u1"]  # queued before the timeout: it ran


# A write whose reply was lost is sent again, and counts once ----------------------------------


class ReplyLosingProxy:
    """A proxy to Redis that, once armed, passes the next command holding `marker` on but drops
    the connection in place of its reply: the command ran, and its sender, never told, sends it
    again on a new connection (the client retries a lost connection once)."""

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.marker: bytes | None = None
        self.lost = 0
        self._tasks: set[asyncio.Task] = set()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            server.close()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.upstream.scheme == "unix":
            return await asyncio.open_unix_connection(self.upstream.path)
        return await asyncio.open_connection(self.upstream.hostname, self.upstream.port)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())
        up_reader, up_writer = await self._open_upstream()
        losing = asyncio.Event()

        async def requests() -> None:
            while data := await reader.read(65536):
                if self.marker is not None and self.marker in data:
                    self.marker = None
                    losing.set()
                up_writer.write(data)
                await up_writer.drain()

        async def replies() -> None:
            while data := await up_reader.read(65536):
                if losing.is_set():
                    self.lost += 1
                    return
                writer.write(data)
                await writer.drain()

        both = [asyncio.create_task(requests()), asyncio.create_task(replies())]
        try:
            await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in both:
                task.cancel()
            await asyncio.gather(*both, return_exceptions=True)
            for stream in (writer, up_writer):
                stream.close()
                with suppress(ConnectionError):
                    await stream.wait_closed()


@pytest.fixture
def proxy(settings: Settings) -> ReplyLosingProxy:
    assert settings.redis_url is not None
    return ReplyLosingProxy(settings.redis_url)


@asynccontextmanager
async def _losing_store(settings: Settings, proxy: ReplyLosingProxy) -> AsyncIterator[Store]:
    async with (
        proxy.running() as url,
        open_store(settings.model_copy(update={"redis_url": url})) as store,
    ):
        yield store


async def test_feedback_sent_again_after_its_reply_was_lost_is_stored_once(
    settings: Settings, proxy: ReplyLosingProxy
) -> None:
    async with _losing_store(settings, proxy) as store:
        await store.upsert_items([ItemUpsert(item_id="a", title="A")])
        await store.add_feedback([_click("warm", "a", T0)])  # the script is loaded
        proxy.marker = b"EVALSHA"

        stored = await store.add_feedback(
            [_click("u1", "a", T0, "e-1"), _click("u1", "a", T0, "e-1")]
        )

        assert proxy.lost == 1
        assert stored == [True, False]  # as the first run answered: the id twice is still once
        assert await _stream_users(store) == ["warm", "u1"]
        assert await store.popular(5) == [("a", 2.0)]


async def test_an_activation_sent_again_after_its_reply_was_lost_succeeds(
    settings: Settings, proxy: ReplyLosingProxy
) -> None:
    async with _losing_store(settings, proxy) as store:
        await store.set_active_model("v1")  # the script is loaded
        proxy.marker = b"EVALSHA"

        assert await store.set_active_model("v2", replacing="v1") == "v1"

        assert proxy.lost == 1
        assert (await store.active_model(), await store.previous_model()) == ("v2", "v1")


async def test_the_trainer_lock_taken_again_after_its_reply_was_lost_is_held(
    settings: Settings, proxy: ReplyLosingProxy
) -> None:
    async with _losing_store(settings, proxy) as store:
        proxy.marker = store.keys.trainer_lock.encode()

        assert await store.take_trainer_lock("mine", 60)

        assert proxy.lost == 1
        assert not await store.take_trainer_lock("theirs", 60)


# Only events at exactly one time are ties ------------------------------------------------------


StoreOf = Callable[[int], AbstractAsyncContextManager[Store]]


@pytest.fixture
def store_of(settings: Settings) -> StoreOf:
    """A store on the test's prefix that keeps `history_size` items a user."""
    return lambda history_size: open_store(
        settings.model_copy(update={"history_size": history_size})
    )


@pytest.mark.parametrize("history_size", [1, 50])
async def test_an_older_event_arriving_later_is_no_tie_of_a_newer_one(
    store_of: StoreOf, history_size: int
) -> None:
    """A click at T + 0.5 ms, then a later-arriving click at T: the latter was numbered after the
    former (its time read back as T + 0.501 ms), and the newer one was the one trimmed."""
    newer, older = T0 + timedelta(microseconds=500), T0
    async with store_of(history_size) as store:
        await store.upsert_items([ItemUpsert(item_id=i, title=i) for i in "XY"])
        await store.add_feedback([_click("u", "X", newer)])
        await store.add_feedback([_click("u", "Y", older)])
        for item, at in (("X", newer), ("Y", older)):  # ratings below positive: not in history
            rating = FeedbackEvent(
                user_id="u", item_id=item, type="rating", value=2.0, timestamp=at
            )
            await store.add_feedback([rating])

        assert await _history(store, "u") == [("X", newer), ("Y", older)][:history_size]
        rated = await store.redis.zrange(store.keys.rated("u"), 0, -1)
        assert rated == ["Y", "X"][-history_size:]


async def test_ties_come_last_among_their_time_whatever_came_in_between(store_of: StoreOf) -> None:
    """Past a thousand ties at one time, with other times in between, the next tie still comes
    after every earlier one, and before the times after it."""
    items = [f"i{n}" for n in range(1100)]
    later = T0 + timedelta(seconds=1)
    async with store_of(2000) as store:
        await store.upsert_items([ItemUpsert(item_id=i, title=i) for i in [*items, "x", "y"]])
        for start in (0, 1000):
            await store.add_feedback([_click("u", i, T0) for i in items[start : start + 1000]])
        await store.add_feedback([_click("u", "x", later)])
        await store.add_feedback([_click("u", "y", T0)])

        history = await _history(store, "u")

        assert [item for item, _ in history[:3]] == ["x", "y", "i1099"]
        assert history[0][1] == later


async def test_ties_keep_arrival_order_and_times_read_back_as_sent(store_of: StoreOf) -> None:
    """Random batches at times equal or a fraction of a millisecond apart: the history holds the
    newest items by (time, arrival), and every event that is no tie reads back at its time."""
    rng = random.Random(7)
    offsets = [0.0, 0.0, 0.0003, 0.0005, 0.0009, 1.0]
    items = [f"i{n}" for n in range(8)]
    async with store_of(5) as store:
        await store.upsert_items([ItemUpsert(item_id=i, title=i) for i in items])
        for trial in range(40):
            user, arrived = f"u{trial}", 0
            latest: dict[str, tuple[datetime, int]] = {}  # item -> (time, arrival)
            first: dict[datetime, int] = {}  # time -> arrival of the first event at it
            for _ in range(rng.randint(1, 6)):
                batch = [
                    _click(user, rng.choice(items), T0 + timedelta(seconds=rng.choice(offsets)))
                    for _ in range(rng.randint(1, 6))
                ]
                await store.add_feedback(batch)
                for event in batch:
                    arrived += 1
                    first.setdefault(event.timestamp, arrived)
                    latest[event.item_id] = max(
                        latest.get(event.item_id, (T0, 0)), (event.timestamp, arrived)
                    )
            newest = sorted(latest, key=latest.__getitem__, reverse=True)[:5]

            history = await _history(store, user)

            assert [item for item, _ in history] == newest
            for item, at in history:
                sent, arrival = latest[item]
                if first[sent] == arrival:
                    assert at == sent
                else:  # a tie: microseconds after it, unless the first left the set
                    assert timedelta(0) <= at - sent < timedelta(microseconds=100)


async def test_the_ties_kept_beside_a_set_stay_as_few_as_its_items(store_of: StoreOf) -> None:
    async with store_of(3) as store:
        await store.upsert_items([ItemUpsert(item_id=i, title=i) for i in "abcdef"])
        await store.add_feedback([_click("u", "a", T0)])  # one item stays while others move up
        for n in range(1, 200):
            item = "bcdef"[n % 5] if n > 100 else "b"
            await store.add_feedback([_click("u", item, T0 + timedelta(seconds=n))])

        ties = await store.redis.zcard(f"{store.keys.history('u')}:ties")

        assert ties <= 3


# User records the API would not accept ---------------------------------------------------------


@pytest.mark.parametrize("raw", ['{"tags": ["x", "y"]}', '{"age": null}', '{"n": {"a": 1}}'])
def test_stored_attributes_the_api_would_refuse_are_skipped(
    client: TestClient, rdb: redis.Redis, key_prefix: str, raw: str
) -> None:
    put_items(client, "a")
    rdb.hset(f"{key_prefix}:user:u1", "attributes", raw)
    rdb.sadd(f"{key_prefix}:users", "u1")
    before = metric(client, UNREADABLE, kind="user")

    user = client.get("/v1/users/u1")
    served = client.post("/v1/recommend", json={"user_id": "u1"})

    assert user.status_code == 200, user.text
    assert user.json()["attributes"] == {}
    assert served.status_code == 200, served.text
    assert metric(client, UNREADABLE, kind="user") >= before + 2


async def test_a_data_set_loaded_before_ids_were_per_user_is_not_stored_twice(
    store_of: StoreOf,
) -> None:
    """Loaders remember their event ids forever (ttl 0) under the marker of the time:
    `evid:{event_id}`. An API event's marker expires: only a load checks the old form. The new
    form has a name of its own: the old marker of id `ml:1` is no marker of user `ml`'s id `1`."""
    async with store_of(50) as store:
        await store.upsert_items([ItemUpsert(item_id="a", title="A")])
        await store.redis.set(f"{store.keys.prefix}:evid:ml:1", "1")  # a load before the upgrade
        event = _click("u1", "a", T0, "ml:1")
        loaded_again = await store.add_feedback([event], dedup_ttl_seconds=0)
        from_the_api = await store.add_feedback([_click("u2", "a", T0, "ml:1")])
        users_own = await store.add_feedback([_click("ml", "a", T0, "1")])
        assert (loaded_again, from_the_api, users_own) == ([False], [True], [True])
