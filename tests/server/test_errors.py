"""One error shape, {"error": {"code", "message", "details"}}, for every failure."""

import json

import pytest
import redis
from fastapi.testclient import TestClient
from redis.exceptions import ResponseError

from server.app import create_app
from server.errors import bad_data
from tests.server.helpers import assert_error, metric, post_events, put_items

MAX = 2048  # settings.max_body_bytes in these tests


@pytest.fixture
def small(make_client):
    """An app that takes bodies up to MAX bytes."""
    return make_client(max_body_bytes=MAX)


def _big_items_body(size: int) -> bytes:
    items = [{"item_id": "a", "title": "A", "description": "x" * size}]
    return json.dumps({"items": items}).encode()


def test_unknown_route_404(client):
    for path in ("/nope", "/v1", "/v1/items/a/b", "/v2/items/a"):
        error = assert_error(client.get(path), 404, "not_found")
        assert error["details"] is None


def test_unknown_item_404_details(client):
    error = assert_error(client.get("/v1/items/zzz"), 404, "not_found")
    assert error["message"] == "item 'zzz' does not exist"


def test_method_not_allowed_405(client):
    response = client.patch("/v1/items/a", json={"title": "A"})
    assert_error(response, 405, "method_not_allowed")
    # Starlette names the methods of the first matching route only; PATCH is in none of them.
    assert "PATCH" not in response.headers["allow"]
    assert_error(client.delete("/v1/items"), 405, "method_not_allowed")
    assert_error(client.get("/v1/feedback"), 405, "method_not_allowed")
    assert_error(client.post("/healthz"), 405, "method_not_allowed")


def test_validation_422_details(client):
    response = client.put("/v1/items/a", json={"title": 5, "boost": "lots"})
    error = assert_error(response, 422, "validation_error")
    details = {tuple(d["loc"]): d for d in error["details"]}
    assert set(details) == {("body", "title"), ("body", "boost")}
    for detail in details.values():
        assert set(detail) == {"loc", "message", "type"}
        assert detail["message"] and detail["type"]


def test_an_item_field_named_like_an_event_type_is_named(client):
    """The tag of a feedback event is left out of its path; an item's field is not a tag."""
    batch = {"items": [{"item_id": "x", "title": "T", "rating": 1}]}
    error = assert_error(client.post("/v1/items", json=batch), 422, "validation_error")
    assert [d["loc"] for d in error["details"]] == [["body", "items", 0, "rating"]]


@pytest.mark.parametrize(
    ("method", "path", "body", "loc", "words"),
    [
        ("post", "/v1/rate", {"user_id": "u 1", "item_ids": ["a"]}, ["body", "user_id"], "an id"),
        ("put", "/v1/items/a", {"title": "A", "attributes": {"k k": 1}}, None, "an id"),
        ("get", "/v1/items/%ED%A0%80", None, ["path", "item_id"], "an id"),
        (
            "post",
            "/v1/feedback",
            {"events": [{"user_id": "u", "item_id": "a", "type": "click", "event_id": "order 17"}]},
            ["body", "events", 0, "event_id"],
            "an event id",
        ),
    ],
)
def test_an_id_that_breaks_the_rule_is_told_the_rule_in_words(
    client, method, path, body, loc, words
):
    """The patterns run to 700 and 2,000 characters, quoted once per error: a batch of 1,000
    events with a bad user id answered 2.7 MB."""
    response = getattr(client, method)(path, **({"json": body} if body else {}))
    [detail] = assert_error(response, 422, "validation_error")["details"]
    assert detail["message"].startswith(f"not {words}: printable characters, no whitespace")
    assert detail["type"] == "string_pattern_mismatch" and len(detail["message"]) < 100
    assert loc is None or detail["loc"] == loc


@pytest.mark.parametrize("event", [{"type": "bogus"}, {"type": 5}, {}])
def test_an_event_of_no_known_type_is_told_the_types(client, event):
    """pydantic listed the types as enum reprs (<EventType.rating: 'rating'>, ...), at the
    event's place, not its type's; with no type, "Unable to extract tag"."""
    batch = {"events": [{"user_id": "u", "item_id": "a", **event}]}
    [detail] = assert_error(client.post("/v1/feedback", json=batch), 422, "validation_error")[
        "details"
    ]
    assert detail == {
        "loc": ["body", "events", 0, "type"],
        "message": "type must be one of: impression, click, like, purchase, rating, dislike, skip",
        "type": "event_type",
    }


@pytest.mark.parametrize("value", [[1], {"a": 1}, 2**64, "x" * 257, None])
def test_an_attribute_value_of_no_kind_taken_is_one_error_at_its_place(client, value):
    """One error per member of the union was answered, each at a made-up place ending in
    pydantic's internal names ("function-after[forbid_inf_nan_check(), ...]")."""
    response = client.put("/v1/users/u9", json={"attributes": {"k": value}})
    [detail] = assert_error(response, 422, "validation_error")["details"]
    assert detail["loc"] == ["body", "attributes", "k"]
    assert detail["message"] == (
        "a boolean, a 64-bit integer, a finite number or a string of at most 256 characters"
    )


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "text/plain"},
        {"Content-Type": "application/x-www-form-urlencoded"},
        {"Content-Type": "application/json", "Content-Encoding": "gzip"},
    ],
)
def test_a_body_that_is_not_plain_json_415(client, headers):
    response = client.put("/v1/items/a", content=b'{"title": "A"}', headers=headers)
    error = assert_error(response, 415, "unsupported_media_type")
    assert "JSON" in error["message"] or "uncompressed" in error["message"]


def test_json_with_a_charset_or_a_json_suffix_is_read(client):
    for kind in ("application/json; charset=utf-8", "application/merge-patch+json"):
        response = client.put(
            "/v1/items/a", content=b'{"title": "A"}', headers={"Content-Type": kind}
        )
        assert response.status_code == 200, (kind, response.text)


def test_malformed_json_422(client):
    response = client.put(
        "/v1/items/a", content=b'{"title": "A",', headers={"Content-Type": "application/json"}
    )
    error = assert_error(response, 422, "validation_error")
    assert error["details"][0]["type"] == "json_invalid"
    assert_error(client.get("/v1/items/a"), 404, "not_found")


def test_missing_body_422(client):
    assert_error(client.put("/v1/items/a"), 422, "validation_error")
    assert_error(client.post("/v1/feedback"), 422, "validation_error")


def test_body_at_limit_accepted(small):
    body = _big_items_body(0)
    body = _big_items_body(MAX - len(body))
    assert len(body) == MAX
    response = small.post("/v1/items", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text


def test_body_over_limit_with_content_length_413(small):
    body = _big_items_body(MAX)
    response = small.post("/v1/items", content=body, headers={"Content-Type": "application/json"})
    assert "transfer-encoding" not in response.request.headers
    assert int(response.request.headers["content-length"]) > MAX
    error = assert_error(response, 413, "payload_too_large")
    assert str(MAX) in error["message"]
    assert_error(small.get("/v1/items/a"), 404, "not_found")


def test_body_over_limit_chunked_413(small):
    body = _big_items_body(MAX * 4)

    def chunks():
        for start in range(0, len(body), 512):
            yield body[start : start + 512]

    response = small.post(
        "/v1/items", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    error = assert_error(response, 413, "payload_too_large")
    assert str(MAX) in error["message"]
    assert_error(small.get("/v1/items/a"), 404, "not_found")


def test_chunked_body_under_limit_accepted(small):
    body = json.dumps({"items": [{"item_id": "a", "title": "A"}]}).encode()

    def chunks():
        yield body[:10]
        yield body[10:]

    response = small.post(
        "/v1/items", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200, response.text
    assert small.get("/v1/items/a").json()["title"] == "A"


def test_feedback_over_limit_413(small, rdb, key_prefix):
    put_items(small, "a")
    events = [{"user_id": "u", "item_id": "a", "type": "click"}] * 100
    assert_error(small.post("/v1/feedback", json={"events": events}), 413, "payload_too_large")
    assert rdb.xlen(f"{key_prefix}:events") == 0


@pytest.fixture
def failing(settings):
    """An app with a route that fails unexpectedly, with a secret in the exception."""
    app = create_app(settings)

    async def fail() -> None:
        raise RuntimeError("secret: not json")

    app.add_api_route("/v1/fail", fail)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def test_unexpected_error_500_without_traceback(failing):
    response = failing.get("/v1/fail")
    error = assert_error(response, 500, "internal_error")
    assert error["details"] is None
    assert "RuntimeError" not in response.text
    assert "not json" not in response.text
    assert 'File "' not in response.text


def test_unexpected_error_500_carries_request_id(failing):
    response = failing.get("/v1/fail", headers={"X-Request-ID": "req-500"})
    assert response.status_code == 500
    assert response.headers.get("x-client-request-id") == "req-500"
    assert len(response.headers["x-request-id"]) == 32


def test_a_key_of_the_wrong_type_is_bad_data_not_an_outage(client, settings):
    """Written by hand or by another program: a 503 would have clients retry for good and point
    alerts at a Redis that answers."""
    redis.Redis.from_url(settings.redis_url).set(f"{settings.key_prefix}:item:zz", "a string")
    response = client.get("/v1/items/zz")
    assert_error(response, 500, "internal_error")
    assert "retry-after" not in response.headers
    assert client.get("/readyz").status_code == 200  # Redis itself is fine


def test_a_key_of_the_wrong_type_read_in_a_pipeline_or_a_script_is_bad_data(client, settings):
    """Redis words it `Command # 1 (HGET ...) of pipeline caused error: WRONGTYPE ...` there."""
    put_items(client, "a")
    rdb = redis.Redis.from_url(settings.redis_url)
    rdb.set(f"{settings.key_prefix}:user:uu", "a string")  # read in a pipeline
    assert_error(client.get("/v1/users/uu"), 500, "internal_error")
    rdb.set(f"{settings.key_prefix}:user:uu:seen", "a string")  # written by the feedback script
    response = client.post(
        "/v1/feedback", json={"events": [{"user_id": "uu", "item_id": "a", "type": "click"}]}
    )
    error = assert_error(response, 500, "internal_error")
    assert len(error["details"]["event_ids"]) == 1


@pytest.mark.parametrize(
    "script",
    [
        "return redis.call('HINCRBYFLOAT', KEYS[1], 'f', 1)",
        "return redis.call('HINCRBY', KEYS[1], 'f', 1)",
        "return tonumber(redis.call('HGET', KEYS[1], 'f')) + 1",  # a Lua error of the script
        "return redis.call('SADD', KEYS[1], 'a')",  # WRONGTYPE, as before
    ],
)
def test_a_script_failing_on_a_stored_value_is_bad_data(rdb, key_prefix, script):
    """Alone or in a pipeline, as Redis words it (6 and 7 word it apart): it was a 503, which
    sends clients retrying for good and counts an outage of a Redis that answers."""
    key = f"{key_prefix}:h"
    rdb.hset(key, "f", "lots")
    with pytest.raises(ResponseError) as alone:
        rdb.eval(script, 1, key)
    with rdb.pipeline(transaction=False) as pipe, pytest.raises(ResponseError) as piped:
        pipe.eval(script, 1, key)
        pipe.execute()
    assert bad_data(alone.value), alone.value
    assert bad_data(piped.value), piped.value


def test_a_script_refused_for_want_of_memory_is_no_bad_data(make_client, redis_process):
    """Redis names the script in that error too: it is Redis's state, not the data's, a 503."""
    client = make_client(redis_url=redis_process.url)
    put_items(client, "a")
    outages = metric(client, "reasonrec_redis_errors_total")
    with redis.Redis.from_url(redis_process.url) as own:
        own.config_set("maxmemory", 1)
        with pytest.raises(ResponseError) as caught:
            own.eval("return redis.call('SET', KEYS[1], 'v')", 1, "k")
        assert not bad_data(caught.value), caught.value
        response = post_events(client, {"user_id": "u", "item_id": "a", "type": "click"})
        own.config_set("maxmemory", 0)
    assert_error(response, 503, "storage_unavailable")
    assert metric(client, "reasonrec_redis_errors_total") == outages + 1
