"""Feedback over stored data that cannot be read (written by hand or by another program): a 500
that writes nothing, counts no outage and claims no event id, so that once the data is repaired
the same events, ids and all, are stored in full rather than answered as duplicates."""

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from tests.server.helpers import assert_error, metric, post_events, put_items

REDIS_ERRORS = "reasonrec_redis_errors_total"
CLICK = {"user_id": "uu", "item_id": "a", "type": "click", "event_id": "e1"}
RATING = {"user_id": "uu", "item_id": "a", "type": "rating", "value": 5, "event_id": "e1"}


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    """A client that reads bytes, as DUMP answers."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _everything(raw: redis.Redis, prefix: str) -> dict[bytes, bytes | None]:
    """Every key of the test with its serialized value: any write changes one or adds one."""
    return {key: raw.dump(key) for key in raw.scan_iter(match=f"{prefix}:*")}


def _refused_writing_nothing(
    client: TestClient, raw: redis.Redis, prefix: str, *events: dict[str, Any]
) -> None:
    """The batch answers a 500 of bad data, with its event ids, and nothing is written."""
    before, outages = _everything(raw, prefix), metric(client, REDIS_ERRORS)
    response = post_events(client, *events)
    error = assert_error(response, 500, "internal_error")
    assert error["details"] == {"event_ids": [event["event_id"] for event in events]}
    assert "none of the events was stored" in error["message"]
    assert "retry-after" not in response.headers
    assert _everything(raw, prefix) == before
    assert metric(client, REDIS_ERRORS) == outages


def _stored_in_full(client: TestClient, *events: dict[str, Any]) -> None:
    """Sent again once the data is repaired, every event is new."""
    response = post_events(client, *events)
    assert response.status_code == 200, response.text
    assert (response.json()["accepted"], response.json()["duplicates"]) == (len(events), 0)


def _click_written(rdb: redis.Redis, prefix: str) -> None:
    assert [fields["event_id"] for _, fields in rdb.xrange(f"{prefix}:events")] == ["e1"]
    assert rdb.zscore(f"{prefix}:pop", "a") == 1
    assert rdb.zrange(f"{prefix}:user:uu:hist", 0, -1) == ["a"]
    assert rdb.smembers(f"{prefix}:user:uu:seen") == {"a"}
    assert rdb.sismember(f"{prefix}:users", "uu")
    assert rdb.exists(f"{prefix}:eventid:uu:e1")


def _rating_written(rdb: redis.Redis, prefix: str) -> None:
    _click_written(rdb, prefix)
    assert rdb.hget(f"{prefix}:user:uu:ratings", "a") == "5.0"
    assert rdb.zrange(f"{prefix}:user:uu:rated", 0, -1) == ["a"]
    assert rdb.hexists(f"{prefix}:user:uu:rated_at", "a")
    assert float(rdb.hget(f"{prefix}:ratings:sum", "a")) == 5
    assert rdb.hget(f"{prefix}:ratings:count", "a") == "1"
    assert rdb.hmget(f"{prefix}:ratings:total", ["sum", "count"]) == ["5", "1"]


@pytest.mark.parametrize(
    ("key", "field", "value"),
    [
        ("ratings:sum", "a", "lots"),
        ("ratings:sum", "a", "inf"),  # HINCRBYFLOAT refuses to make it infinite
        ("ratings:sum", "a", "0" * 5200 + "1"),  # 1 to Lua, too long for HINCRBYFLOAT
        ("ratings:count", "a", "1.5"),
        ("ratings:count", "a", " 1"),  # Lua reads it, HINCRBY does not
        ("ratings:total", "sum", "lots"),
        ("ratings:total", "count", "many"),
        ("user:uu:rated_at", "a", "yesterday"),
    ],
)
def test_a_rating_over_unreadable_stats_writes_nothing_and_stores_once_repaired(
    client, rdb, raw, key_prefix, key, field, value
):
    """It was a 503 (a Redis outage) after the event was logged, counted as popular and its id
    claimed: sent again with its id, a duplicate, the rating itself lost for good."""
    put_items(client, "a")
    rdb.hset(f"{key_prefix}:{key}", field, value)

    _refused_writing_nothing(client, raw, key_prefix, RATING)

    rdb.hdel(f"{key_prefix}:{key}", field)
    _stored_in_full(client, RATING)
    _rating_written(rdb, key_prefix)


@pytest.mark.parametrize(
    ("key", "event"),
    [
        ("user:uu:seen", CLICK),
        ("user:uu:hist", CLICK),
        ("user:uu:hist:ties", CLICK),
        ("pop", CLICK),
        ("users", CLICK),
        ("events", CLICK),  # the event id was claimed before the log refused it
        ("user:uu:rated", RATING),
        ("user:uu:rated:ties", RATING),
        ("user:uu:rated_at", RATING),
        ("user:uu:ratings", RATING),
        ("ratings:sum", RATING),
        ("ratings:count", RATING),
        ("ratings:total", RATING),
    ],
)
def test_an_event_onto_a_key_of_the_wrong_type_writes_nothing_and_stores_once_repaired(
    client, rdb, raw, key_prefix, key, event
):
    """It was a 500 already, but with the event id claimed (and part of the event written):
    sent again once the key was repaired, the event was a duplicate and never stored in full."""
    put_items(client, "a")
    rdb.set(f"{key_prefix}:{key}", "a string")

    _refused_writing_nothing(client, raw, key_prefix, event)

    rdb.delete(f"{key_prefix}:{key}")
    _stored_in_full(client, event)
    (_rating_written if event is RATING else _click_written)(rdb, key_prefix)


def test_an_event_id_marker_of_the_wrong_type_leaves_the_events_before_it_unwritten(
    client, rdb, raw, key_prefix
):
    """The marker of the second event is read only after the first event is written."""
    put_items(client, "a", "b")
    rdb.sadd(f"{key_prefix}:eventid:uu:e2", "a set")
    first = {**CLICK, "item_id": "b", "event_id": "e0"}
    second = {**CLICK, "event_id": "e2"}

    _refused_writing_nothing(client, raw, key_prefix, first, second)

    rdb.delete(f"{key_prefix}:eventid:uu:e2")
    _stored_in_full(client, first, second)
    assert [f["event_id"] for _, f in rdb.xrange(f"{key_prefix}:events")] == ["e0", "e2"]
