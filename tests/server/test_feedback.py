"""Feedback: POST /v1/feedback, atomic batches, de-duplication and what each event updates."""

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from server.store import Store
from tests.server.helpers import assert_error, metric, post_events, put_items


@pytest.fixture
def keys(key_prefix):
    class K:
        events = f"{key_prefix}:events"
        pop = f"{key_prefix}:pop"
        users = f"{key_prefix}:users"

        @staticmethod
        def hist(user):
            return f"{key_prefix}:user:{user}:hist"

        @staticmethod
        def seen(user):
            return f"{key_prefix}:user:{user}:seen"

    return K


@pytest.fixture
def catalog(client):
    put_items(client, "a", "b", "c")


def tally(response):
    body = response.json()
    return {"accepted": body["accepted"], "duplicates": body["duplicates"]}


def ev(item="a", type="click", user="u1", **extra):
    return {"user_id": user, "item_id": item, "type": type, **extra}


def test_accepts_batch(client, catalog, rdb, keys):
    response = post_events(client, ev("a"), ev("b", "impression"), ev("c", "rating", value=3))
    assert response.status_code == 200, response.text
    assert tally(response) == {"accepted": 3, "duplicates": 0}
    assert rdb.xlen(keys.events) == 3


def test_the_stream_keeps_about_the_newest_events_maxlen(make_client, rdb, keys):
    client = make_client(events_maxlen=100)
    put_items(client, "a", "b", "c")
    for batch in range(6):
        events = [ev("abc"[n % 3], user=f"u{batch}-{n}") for n in range(100)]
        assert post_events(client, *events).status_code == 200
    # Trimmed a whole node (100 entries) at a time: between the cap and a node more.
    assert 100 <= rdb.xlen(keys.events) <= 200
    assert rdb.xrange(keys.events, count=1)[0][1]["user_id"].startswith(("u4-", "u5-"))
    # What the trainer's schedule counts: every event added, those trimmed too; before Redis 7
    # (the embedded one), which does not count them, the stream's length.
    store = client.app.state.store
    seven = int(rdb.info("server")["redis_version"].split(".")[0]) >= 7
    expected = 600 if seven else rdb.xlen(keys.events)
    assert client.portal.call(store.event_count) == expected


def test_stream_entry_fields(client, catalog, rdb, keys):
    event = ev(
        "b",
        "rating",
        value=4.5,
        request_id="req-1",
        event_id="e-1",
        timestamp="2024-01-01T00:00:00Z",
    )
    assert post_events(client, event).status_code == 200
    [(_, fields)] = rdb.xrange(keys.events)
    assert fields["user_id"] == "u1"
    assert fields["item_id"] == "b"
    assert fields["type"] == "rating"
    assert float(fields["value"]) == 4.5
    assert fields["request_id"] == "req-1"
    assert fields["event_id"] == "e-1"
    assert float(fields["ts"]) == 1704067200.0


@pytest.mark.parametrize(
    "event",
    [
        ev(type="click"),
        ev(type="like"),
        ev(type="purchase"),
        ev(type="rating", value=4),
        ev(type="rating", value=5),
    ],
    ids=["click", "like", "purchase", "rating4", "rating5"],
)
def test_positive_event_updates_history_seen_popularity(client, catalog, rdb, keys, event):
    assert post_events(client, event).status_code == 200
    assert rdb.zrange(keys.hist("u1"), 0, -1) == ["a"]
    assert rdb.smembers(keys.seen("u1")) == {"a"}
    assert rdb.zscore(keys.pop, "a") == 1
    assert rdb.xlen(keys.events) == 1
    assert rdb.sismember(keys.users, "u1")


@pytest.mark.parametrize(
    "event",
    [
        ev(type="dislike"),
        ev(type="skip"),
        ev(type="impression"),
        ev(type="rating", value=3.5),
        ev(type="rating", value=0.5),
    ],
    ids=["dislike", "skip", "impression", "rating3.5", "rating0.5"],
)
def test_negative_event_only_in_stream(client, catalog, rdb, keys, event):
    assert tally(post_events(client, event)) == {"accepted": 1, "duplicates": 0}
    assert rdb.xlen(keys.events) == 1
    assert not rdb.exists(keys.hist("u1"))
    assert not rdb.exists(keys.seen("u1"))
    assert rdb.zscore(keys.pop, "a") is None
    assert rdb.sismember(keys.users, "u1")


def test_popularity_counts_positive_events(client, catalog, rdb, keys):
    post_events(client, ev("a", user="u1"), ev("a", "like", user="u2"), ev("b", user="u1"))
    post_events(client, ev("a", "purchase", user="u3"), ev("b", "skip", user="u3"))
    assert rdb.zscore(keys.pop, "a") == 3
    assert rdb.zscore(keys.pop, "b") == 1
    assert rdb.zscore(keys.pop, "c") is None


def test_duplicate_event_id_in_same_batch(client, catalog, rdb, keys):
    response = post_events(client, ev("a", event_id="x"), ev("a", event_id="x"), ev("b"))
    assert tally(response) == {"accepted": 2, "duplicates": 1}
    assert rdb.xlen(keys.events) == 2
    assert rdb.zscore(keys.pop, "a") == 1


def test_duplicate_event_id_in_later_batch(client, catalog, rdb, keys):
    assert tally(post_events(client, ev("a", event_id="x"))) == {"accepted": 1, "duplicates": 0}
    response = post_events(client, ev("a", "like", event_id="x"), ev("b", event_id="y"))
    assert tally(response) == {"accepted": 1, "duplicates": 1}
    assert rdb.xlen(keys.events) == 2
    assert rdb.zscore(keys.pop, "a") == 1
    types = [fields["type"] for _, fields in rdb.xrange(keys.events)]
    assert types == ["click", "click"]


def test_events_without_event_id_all_kept(client, catalog, rdb, keys):
    response = post_events(client, ev("a"), ev("a"), ev("a"))
    assert tally(response) == {"accepted": 3, "duplicates": 0}
    assert rdb.xlen(keys.events) == 3
    assert rdb.zscore(keys.pop, "a") == 3
    assert rdb.zcard(keys.hist("u1")) == 1


def test_batch_of_1000_accepted(client, catalog, rdb, keys):
    events = [ev("abc"[n % 3], user=f"u{n % 7}", event_id=f"e{n}") for n in range(1000)]
    assert tally(post_events(client, *events)) == {"accepted": 1000, "duplicates": 0}
    assert rdb.xlen(keys.events) == 1000


def test_batch_of_1001_rejected(client, catalog, rdb, keys):
    events = [ev("a") for _ in range(1001)]
    error = assert_error(post_events(client, *events), 422, "validation_error")
    assert error["details"][0]["loc"] == ["body", "events"]
    assert rdb.xlen(keys.events) == 0


def test_empty_batch_rejected(client, catalog, rdb, keys):
    assert_error(client.post("/v1/feedback", json={"events": []}), 422, "validation_error")
    assert_error(client.post("/v1/feedback", json={}), 422, "validation_error")
    assert rdb.xlen(keys.events) == 0


BAD_EVENTS = {
    "unknown_item": (ev("nope"), ["body", "events", 1, "item_id"]),
    "bad_type": (ev(type="love"), ["body", "events", 1, "type"]),
    "rating_low": (ev(type="rating", value=0.4), ["body", "events", 1, "value"]),
    "rating_high": (ev(type="rating", value=5.5), ["body", "events", 1, "value"]),
    "rating_no_value": (ev(type="rating"), ["body", "events", 1, "value"]),
    "value_on_click": (ev(type="click", value=5), ["body", "events", 1, "value"]),
    "bad_user_id": (ev(user="a b"), ["body", "events", 1, "user_id"]),
    "extra_field": (ev(color="red"), ["body", "events", 1, "color"]),
}


@pytest.mark.parametrize("case", list(BAD_EVENTS))
def test_one_bad_event_rejects_whole_batch(client, catalog, rdb, keys, case):
    post_events(client, ev("c", "impression", user="other"))
    before = rdb.xlen(keys.events)
    bad, loc = BAD_EVENTS[case]
    batch = [ev("a", event_id="first"), bad, ev("b", "like", event_id="third")]
    error = assert_error(post_events(client, *batch), 422, "validation_error")
    assert [d["loc"] for d in error["details"]] == [loc]
    assert all(d["message"] for d in error["details"])
    # Nothing of the batch was written.
    assert rdb.xlen(keys.events) == before
    assert not rdb.exists(keys.hist("u1"))
    assert not rdb.exists(keys.seen("u1"))
    assert not rdb.exists(keys.pop)
    # The event ids were not consumed: the good events go through once the bad one is gone.
    response = post_events(client, batch[0], batch[2])
    assert tally(response) == {"accepted": 2, "duplicates": 0}


def test_unknown_items_all_reported(client, catalog, rdb, keys):
    batch = [ev("x1"), ev("a"), ev("x2", "like")]
    error = assert_error(post_events(client, *batch), 422, "validation_error")
    assert [d["loc"] for d in error["details"]] == [
        ["body", "events", 0, "item_id"],
        ["body", "events", 2, "item_id"],
    ]
    assert {d["type"] for d in error["details"]} == {"unknown_item"}
    assert "x1" in error["details"][0]["message"]
    assert rdb.xlen(keys.events) == 0


def test_feedback_on_hidden_item_accepted(client, catalog, rdb, keys):
    client.delete("/v1/items/a")
    assert tally(post_events(client, ev("a"))) == {"accepted": 1, "duplicates": 0}
    assert rdb.xlen(keys.events) == 1


def test_feedback_metric_counts_new_events_only(client, catalog):
    before_click = metric(client, "reasonrec_feedback_events_total", type="click")
    before_like = metric(client, "reasonrec_feedback_events_total", type="like")
    post_events(client, ev("a", event_id="m1"), ev("b", event_id="m1"), ev("c", "like"))
    post_events(client, ev("a", event_id="m1"))
    post_events(client, ev("nope"))  # rejected: counted nowhere
    assert metric(client, "reasonrec_feedback_events_total", type="click") == before_click + 1
    assert metric(client, "reasonrec_feedback_events_total", type="like") == before_like + 1


def test_every_bad_event_reported(client, catalog, rdb, keys):
    batch = [ev(type="love"), ev("a"), ev(type="rating", value=9), ev("b", "skip", value=1)]
    error = assert_error(post_events(client, *batch), 422, "validation_error")
    locs = [d["loc"] for d in error["details"]]
    assert locs == [
        ["body", "events", 0, "type"],
        ["body", "events", 2, "value"],
        ["body", "events", 3, "value"],
    ]
    assert rdb.xlen(keys.events) == 0


def test_event_id_remembered_for_dedup_ttl(client, catalog, rdb, key_prefix, settings):
    post_events(client, ev("a", event_id="t1"))
    ttl = rdb.ttl(f"{key_prefix}:eventid:u1:t1")
    assert settings.dedup_ttl_seconds - 60 < ttl <= settings.dedup_ttl_seconds


def test_event_id_remembered_forever_with_ttl_zero(make_client, rdb, key_prefix):
    client = make_client(dedup_ttl_seconds=0)
    put_items(client, "a")
    post_events(client, ev("a", event_id="t1"))
    assert rdb.ttl(f"{key_prefix}:eventid:u1:t1") == -1
    assert tally(post_events(client, ev("a", event_id="t1"))) == {"accepted": 0, "duplicates": 1}


def test_stored_events_are_answered_when_their_attribution_cannot_be_read(
    client, catalog, rdb, keys, monkeypatch
):
    """The events were stored, then a 503: the client's retry was all duplicates, and the
    events were counted nowhere."""

    async def unreachable(self, request_ids):
        raise RedisConnectionError("gone")

    monkeypatch.setattr(Store, "served_by", unreachable)
    before = metric(client, "reasonrec_feedback_events_total", type="click")

    response = post_events(client, ev("a", request_id="req-1"))

    assert response.status_code == 200, response.text
    assert tally(response) == {"accepted": 1, "duplicates": 0}
    assert rdb.xlen(keys.events) == 1
    assert metric(client, "reasonrec_feedback_events_total", type="click") == before + 1
