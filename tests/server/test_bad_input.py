"""Bad input never breaks the service: one test (or more) for each defect found by trying the API
as an attacker would (issue "Bad input must never break the service")."""

import json
import signal
from datetime import UTC, datetime, timedelta

import pytest
import redis

from tests.server.helpers import assert_error, metric, post_events, put_items

UNREADABLE = "reasonrec_unreadable_records_total"
FAR_TIMES = [
    "9999-12-31T23:59:59-12:00",
    "0001-01-01T00:00:00+14:00",
    1e300,
    -1e300,
    10**400,  # no float holds it (was a 500)
    -(10**400),
    "32503680000",  # a string of digits is no RFC 3339 text (read as milliseconds: 1971)
    "1700000000000",
]


def _future(**delta: float) -> str:
    return (datetime.now(UTC) + timedelta(**delta)).isoformat()


def _everyone_served(client, *users: str) -> None:
    for user_id in users:
        response = client.post("/v1/recommend", json={"user_id": user_id})
        assert response.status_code == 200, response.text


# 1. One write takes down every recommendation ---------------------------------------------


@pytest.mark.parametrize("when", [*FAR_TIMES, "1799-12-31T23:59:59Z"], ids=repr)
def test_out_of_range_item_time_refused_and_nothing_breaks(client, rdb, key_prefix, when):
    put_items(client, "a")
    error = assert_error(
        client.put("/v1/items/p", json={"title": "P", "created_at": when}), 422, "validation_error"
    )
    assert error["details"][0]["loc"] == ["body", "created_at"]
    assert not rdb.exists(f"{key_prefix}:item:p")
    _everyone_served(client, "u1", "u2")


@pytest.mark.parametrize("when", [*FAR_TIMES, "__future__"], ids=repr)
def test_out_of_range_event_time_refused(client, rdb, key_prefix, when):
    put_items(client, "a")
    when = _future(days=1, hours=2) if when == "__future__" else when
    response = post_events(
        client, {"user_id": "u1", "item_id": "a", "type": "click", "timestamp": when}
    )
    assert_error(response, 422, "validation_error")
    assert rdb.xlen(f"{key_prefix}:events") == 0
    _everyone_served(client, "u1")


def test_times_inside_the_window_accepted(client):
    put_items(client, "a")
    for when in ["1800-01-01T00:00:00Z", _future(hours=23), 0, 1_700_000_000.5]:
        item = client.put("/v1/items/p", json={"title": "P", "created_at": when})
        assert item.status_code == 200, (when, item.text)
        assert client.get("/v1/items/p").json() == item.json()
        event = {"user_id": "u1", "item_id": "a", "type": "click", "timestamp": when}
        assert post_events(client, event).status_code == 200
    # A number is Unix seconds, never milliseconds.
    assert (
        client.put("/v1/items/p", json={"title": "P", "created_at": 1_700_000_000_000}).status_code
        == 422
    )


def test_poisoned_records_are_skipped_and_counted(client, rdb, key_prefix):
    """Records written before the rules existed (or by hand) fail no one else's request."""
    put_items(client, "a", "b", "c")
    post_events(client, {"user_id": "u1", "item_id": "a", "type": "click"})
    before = metric(client, UNREADABLE, kind="item")
    # Far beyond year 9999 once in UTC: what the old API stored for "9999-12-31T23:59:59-12:00".
    rdb.hset(f"{key_prefix}:item:b", "created_at", repr(253402343999.0 + 86400))
    rdb.zadd(f"{key_prefix}:items:created", {"b": 253402343999.0 + 86400})
    rdb.hset(f"{key_prefix}:item:c", "attributes", "{not json")
    rdb.zadd(f"{key_prefix}:user:u1:hist", {"c": 1e300})
    rdb.hset(f"{key_prefix}:user:u2", "attributes", "[1, 2]")
    rdb.sadd(f"{key_prefix}:users", "u2")

    _everyone_served(client, "u1", "u2", "newcomer")
    assert metric(client, UNREADABLE, kind="item") > before
    user = client.get("/v1/users/u1")
    assert user.status_code == 200
    assert [entry["item_id"] for entry in user.json()["history"]] == ["a"]
    assert client.get("/v1/users/u2").json()["attributes"] == {}
    assert_error(client.get("/v1/items/b"), 404, "not_found")
    assert metric(client, UNREADABLE, kind="history") >= 1
    assert metric(client, UNREADABLE, kind="user") >= 1


def test_putting_an_item_again_repairs_an_unreadable_creation_time(client, rdb, key_prefix):
    put_items(client, "b", "c")
    first = client.get("/v1/items/c").json()["created_at"]
    for item in ("b", "c"):
        rdb.hset(f"{key_prefix}:item:{item}", "created_at", repr(253402343999.0 + 86400))
    assert_error(client.get("/v1/items/b"), 404, "not_found")

    put = client.put("/v1/items/b", json={"title": "B fixed"})
    posted = client.post("/v1/items", json={"items": [{"item_id": "c", "title": "C fixed"}]})

    assert put.status_code == 200, put.text
    assert put.json()["title"] == "B fixed" and put.json()["created_at"] > first
    assert posted.status_code == 200
    repaired = client.get("/v1/items/c").json()
    assert repaired["title"] == "C fixed"
    put_items(client, "c")  # a readable creation time is kept
    assert client.get("/v1/items/c").json()["created_at"] == repaired["created_at"]


def test_poisoned_rating_records_are_skipped_and_counted(client, rdb, key_prefix):
    put_items(client, "a", "b", "c")
    ratings = [("a", 5.0), ("b", 2.0)]
    events = [{"user_id": "w", "item_id": i, "type": "rating", "value": v} for i, v in ratings]
    assert post_events(client, *events).status_code == 200
    before = metric(client, UNREADABLE, kind="rating")
    stats_before = metric(client, UNREADABLE, kind="rating_stats")
    rdb.hset(f"{key_prefix}:user:w:ratings", "a", "n/a")
    rdb.hset(f"{key_prefix}:ratings:sum", "c", "lots")
    rdb.hset(f"{key_prefix}:ratings:count", "c", "1")
    rdb.hset(f"{key_prefix}:ratings:total", "sum", "nan")
    rdb.hset(f"{key_prefix}:ratings:sum", "a", "1")
    rdb.hset(f"{key_prefix}:ratings:count", "a", "9" * 400)  # a mean too large for a float

    response = client.post("/v1/rate", json={"user_id": "w", "item_ids": ["a", "c"]})

    assert response.status_code == 200, response.text
    assert all(1 <= item["rating"] <= 5 for item in response.json()["items"])
    assert metric(client, UNREADABLE, kind="rating") == before + 1
    assert metric(client, UNREADABLE, kind="rating_stats") == stats_before + 3  # a's, c's, all


def test_an_infinite_popularity_is_skipped_and_counted(client, rdb, key_prefix):
    """Written by hand: every popular item's share was inf/inf or n/inf, one of them NaN, served
    as a null score."""
    put_items(client, "a", "b", "c")
    rdb.zadd(f"{key_prefix}:pop", {"a": float("inf"), "b": 2, "c": 1, "d": float("-inf")})
    before = metric(client, UNREADABLE, kind="popularity")

    response = client.post("/v1/recommend", json={"user_id": "newcomer"})

    assert response.status_code == 200, response.text
    scores = {item["item_id"]: item["score"] for item in response.json()["items"]}
    assert scores == {"b": pytest.approx(2 / 3), "c": pytest.approx(1 / 3), "a": 0.0}
    assert metric(client, UNREADABLE, kind="popularity") == before + 2  # a's and d's


# 2. Admin keys work on their own -----------------------------------------------------------


@pytest.fixture
def keyed(make_client):
    return make_client(api_keys=["k1"], admin_keys=["adm"])


def _activate(client, key: str | None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.post("/v1/models/activate", json={"version": "v-none"}, headers=headers)


def test_admin_key_alone_opens_admin_routes(keyed):
    # Past both checks: the version does not exist.
    assert_error(_activate(keyed, "adm"), 404, "not_found")
    assert keyed.get("/v1/models", headers={"X-API-Key": "adm"}).status_code == 200


def test_api_key_on_an_admin_route_is_forbidden(keyed):
    error = assert_error(_activate(keyed, "k1"), 403, "forbidden")
    assert "admin key" in error["message"]


@pytest.mark.parametrize("key", [None, "nope"])
def test_no_or_unknown_key_on_an_admin_route_is_unauthorized(keyed, key):
    assert_error(_activate(keyed, key), 401, "unauthorized")


# 3. Prompt injection and unbounded values --------------------------------------------------


@pytest.mark.parametrize(
    "attributes",
    [
        {"bio": "x" * 257},
        {f"k{i}": i for i in range(65)},
        {"k" * 65: 1},
        {"bad key": 1},
        {"nested": {"a": 1}},
        {"list": [1]},
        {"big": 2**63},
    ],
    ids=["long-value", "too-many", "long-key", "space-in-key", "object", "array", "int64"],
)
def test_unbounded_attributes_refused(client, rdb, key_prefix, attributes):
    assert_error(
        client.put("/v1/users/u1", json={"attributes": attributes}), 422, "validation_error"
    )
    assert_error(
        client.put("/v1/items/i1", json={"title": "T", "attributes": attributes}),
        422,
        "validation_error",
    )
    assert not rdb.exists(f"{key_prefix}:user:u1", f"{key_prefix}:item:i1")


def test_two_megabyte_attribute_refused(client):
    body = {"attributes": {"bio": "x" * 2_000_000}}
    assert_error(client.put("/v1/users/u1", json=body), 422, "validation_error")


def test_largest_profile_keeps_impressions_small(client, rdb, key_prefix):
    put_items(client, "a", "b")
    attributes = {f"k{i:02}": "v\n" * 128 for i in range(64)}
    assert client.put("/v1/users/u1", json={"attributes": attributes}).status_code == 200
    _everyone_served(client, "u1")
    [(_, entry)] = rdb.xrevrange(f"{key_prefix}:impressions", count=1)
    assert sum(len(value) for value in entry.values()) < 8_000


# 5. NaN and Infinity -------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_refused(client, token):
    body = f'{{"attributes": {{"score": {token}}}}}'.encode()
    headers = {"content-type": "application/json"}
    assert_error(client.put("/v1/users/u1", content=body, headers=headers), 422, "validation_error")
    item = f'{{"title": "T", "boost": {token}}}'.encode()
    assert_error(client.put("/v1/items/i1", content=item, headers=headers), 422, "validation_error")


# 6. Invisible characters in ids ------------------------------------------------------------


@pytest.mark.parametrize(
    "bad_id",
    [
        "a\x00b",
        "a\x1bb",
        "a\u202eb",
        "a\u200bb",
        "\ufeffa",
        "a\u2066b",
        "a\x85b",
        "a b",
        "a:b",
        ".",
        "..",
        "a\U000e0041b",
        "\u3164",
        "a\u034fb",
        "a\ufe0fb",
        "\u2800",
        "a\u0600b",
        "a\U0001d173b",
        "a\ue000b",
    ],
    ids=[
        "nul",
        "esc",
        "bidi-override",
        "zero-width-space",
        "bom",
        "isolate",
        "nel",
        "space",
        "colon",
        "dot-segment",
        "dot-dot-segment",
        "tag-character",
        "hangul-filler",
        "grapheme-joiner",
        "variation-selector",
        "braille-blank",
        "arabic-number-sign",
        "musical-format",
        "private-use",
    ],
)
def test_invisible_or_reserved_characters_in_ids_refused(client, rdb, key_prefix, bad_id):
    put_items(client, "a")
    assert_error(
        client.post("/v1/items", json={"items": [{"item_id": bad_id, "title": "T"}]}),
        422,
        "validation_error",
    )
    assert_error(
        post_events(client, {"user_id": bad_id, "item_id": "a", "type": "click"}),
        422,
        "validation_error",
    )
    assert_error(client.post("/v1/recommend", json={"user_id": bad_id}), 422, "validation_error")
    for rate in ({"user_id": bad_id, "item_ids": ["a"]}, {"user_id": "u", "item_ids": [bad_id]}):
        assert_error(client.post("/v1/rate", json=rate), 422, "validation_error")
    assert rdb.scard(f"{key_prefix}:items") == 1


def test_printable_unicode_ids_accepted(client):
    for item_id in ["café", "cafe\u0301", "東京", "a.b-c_d~e@f", "...", ".a", "..a", "a.", "😀"]:
        assert client.put(f"/v1/items/{item_id}", json={"title": "T"}).status_code == 200
        assert client.get(f"/v1/items/{item_id}").json()["item_id"] == item_id


# 7. Long URLs and what /readyz tells strangers ---------------------------------------------


def test_long_url_gets_a_json_414(client):
    response = client.get("/v1/items/" + "a" * 9000)
    assert_error(response, 414, "uri_too_long")
    assert response.headers["x-request-id"]


# 8. A write that times out is safe to retry ------------------------------------------------


def test_feedback_503_names_the_event_ids_to_retry_with(make_client, redis_process, key_prefix):
    client = make_client(redis_url=redis_process.url, redis_timeout_seconds=0.3)
    put_items(client, "a")
    event = {"user_id": "u1", "item_id": "a", "type": "click"}
    redis_process.proc.send_signal(signal.SIGSTOP)
    try:
        error = assert_error(post_events(client, event), 503, "storage_unavailable")
    finally:
        redis_process.proc.send_signal(signal.SIGCONT)
    [event_id] = error["details"]["event_ids"]
    # The write was queued before the timeout: it lands once Redis runs again.
    retried = post_events(client, {**event, "event_id": event_id})
    assert retried.status_code == 200
    assert retried.json()["event_ids"] == [event_id]
    with redis.Redis.from_url(redis_process.url, decode_responses=True) as own:
        stream = own.xrange(f"{key_prefix}:events")
    assert [fields["event_id"] for _, fields in stream] == [event_id]


def test_assigned_event_ids_are_returned_and_forgotten_after_a_day(client, rdb, key_prefix):
    put_items(client, "a")
    sent = [
        {"user_id": "u1", "item_id": "a", "type": "click"},
        {"user_id": "u1", "item_id": "a", "type": "like", "event_id": "mine"},
    ]
    body = post_events(client, *sent).json()
    assigned, mine = body["event_ids"]
    assert mine == "mine" and len(assigned) == 32
    assert 0 < rdb.ttl(f"{key_prefix}:eventid:u1:{assigned}") <= 86_400
    assert rdb.ttl(f"{key_prefix}:eventid:u1:mine") > 86_400  # REASONREC_DEDUP_TTL_SECONDS: 30 days
    again = post_events(client, {**sent[0], "event_id": assigned}, sent[1]).json()
    assert (again["accepted"], again["duplicates"]) == (0, 2)


# 9. The OpenAPI document tells the truth ---------------------------------------------------


def test_openapi_declares_security_errors_and_accepted_types(client):
    document = client.get("/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}
    put_item = document["paths"]["/v1/items/{item_id}"]["put"]
    assert {"400", "401", "413", "414", "422", "500", "503"} <= set(put_item["responses"])
    assert len(put_item["security"]) == 2  # either scheme will do
    activate = document["paths"]["/v1/models/activate"]["post"]
    assert {"401", "403", "404", "409"} <= set(activate["responses"])
    schemas = document["components"]["schemas"]
    assert "value" in schemas["RatingEvent"]["required"]
    timestamp = schemas["RatingEvent"]["properties"]["timestamp"]["anyOf"]
    assert {part["type"] for part in timestamp} == {"string", "number"}
    assert "propertyNames" in schemas["UserIn"]["properties"]["attributes"]


def test_405_allow_names_every_method_of_the_path(client):
    response = client.delete("/v1/users/u1")
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "GET, PUT"


# 10. Cold-start rationale: tests/server/test_recommend_logic.py,
# test_fallback_rationale_says_what_the_list_is_ranked_by.


def test_error_details_are_json_everywhere(client):
    response = client.post(
        "/v1/items", content=b"\xff\xfe not json", headers={"content-type": "application/json"}
    )
    assert response.status_code in (400, 422)
    assert json.loads(response.text)["error"]["code"]


def test_an_id_holding_an_encoded_slash_is_not_another_ids_record(client) -> None:
    """An id of "0/" arrives decoded, "/v1/users/0/": it was redirected to "/v1/users/0" and
    wrote user 0 (a property test found it)."""
    written = client.put("/v1/users/0%2F", json={"attributes": {"plan": "gold"}})

    assert written.status_code == 404
    assert client.get("/v1/users/0").status_code == 404
