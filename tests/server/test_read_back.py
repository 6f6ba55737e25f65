"""Property tests: whatever the API accepts reads back as written, and recommendations still answer
200 for every user afterwards. Inputs are drawn from far wider than the API allows (any
characters, any times and zones, non-finite numbers, long values); what it refuses must be refused
with a 4xx, what it accepts must survive a round trip."""

import json
from datetime import UTC, datetime, timedelta, timezone
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st


def mostly(valid: st.SearchStrategy, wild: st.SearchStrategy) -> st.SearchStrategy:
    """Valid-looking values three times in four, so that most examples reach the read-back."""
    return st.one_of(valid, valid, valid, wild)


def _zoned(moment: datetime, minutes: int) -> str:
    return moment.replace(tzinfo=timezone(timedelta(minutes=minutes))).isoformat()


zoned_times = st.builds(
    _zoned,
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9998, 12, 31)),
    st.integers(min_value=-14 * 60 + 1, max_value=14 * 60 - 1),
)
recent = st.datetimes(min_value=datetime(1800, 1, 2), max_value=datetime(2026, 1, 1))
ids = mostly(
    st.from_regex(r"[A-Za-z0-9_.~@-]{1,12}", fullmatch=True), st.text(min_size=1, max_size=12)
)
times = st.one_of(
    st.none(),
    st.builds(_zoned, recent, st.integers(min_value=-12 * 60, max_value=12 * 60)),
    st.floats(min_value=-5e9, max_value=1.7e9),
    st.floats(),
    st.integers(min_value=-(10**13), max_value=10**13),
    zoned_times,
)
values = mostly(
    st.one_of(
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=256),
    ),
    st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.floats(), st.text(max_size=300)),
)
keys = mostly(st.from_regex(r"[a-z_]{1,10}", fullmatch=True), st.text(max_size=70))
attributes = st.dictionaries(keys, values, max_size=8) | st.dictionaries(keys, values, max_size=70)
items = st.fixed_dictionaries(
    {"title": mostly(st.text(min_size=1, max_size=40), st.text(max_size=1)), "created_at": times},
    optional={
        "categories": st.lists(st.text(min_size=1, max_size=20), max_size=4),
        "attributes": attributes,
        "description": st.text(max_size=60),
        "boost": mostly(st.floats(min_value=0, max_value=10), st.floats()),
        "available": st.booleans(),
    },
)
event_types = st.sampled_from(
    ["click", "like", "purchase", "rating", "dislike", "skip", "impression"]
)

FUZZ = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _path(kind: str, ident: str) -> str:
    return f"/v1/{kind}/{quote(ident, safe='')}"


def _send(client, method: str, path: str, body: dict):
    """As text: httpx's json= refuses NaN and Infinity, which clients can still send."""
    content = json.dumps(body, allow_nan=True).encode()
    return client.request(
        method, path, content=content, headers={"content-type": "application/json"}
    )


def _served(client, *users: str) -> None:
    for user_id in users:
        response = client.post("/v1/recommend", json={"user_id": user_id, "k": 5})
        assert response.status_code == 200, response.text


@FUZZ
@given(item_id=ids, item=items)
def test_any_accepted_item_reads_back(client, item_id, item):
    response = _send(client, "PUT", _path("items", item_id), item)
    hypothesis_event(f"status {response.status_code}")
    assert response.status_code in (200, 404, 405, 414, 422), response.text
    if response.status_code == 200:
        stored = client.get(_path("items", item_id))
        assert stored.status_code == 200
        assert stored.json() == response.json()
        assert stored.json()["title"] == item["title"]
        assert stored.json()["attributes"] == item.get("attributes", {})
        if isinstance(item["created_at"], str):
            sent = datetime.fromisoformat(item["created_at"]).astimezone(UTC)
            assert datetime.fromisoformat(stored.json()["created_at"]) == sent
    _served(client, "anyone")


@FUZZ
@given(user_id=ids, profile=attributes)
def test_any_accepted_user_reads_back(client, user_id, profile):
    response = _send(client, "PUT", _path("users", user_id), {"attributes": profile})
    hypothesis_event(f"status {response.status_code}")
    assert response.status_code in (200, 404, 405, 414, 422), response.text
    if response.status_code == 200:
        stored = client.get(_path("users", user_id))
        assert stored.status_code == 200
        assert stored.json()["attributes"] == profile
        _served(client, user_id)


@FUZZ
@given(
    user_id=ids,
    kind=event_types,
    value=st.one_of(st.none(), st.floats(), st.integers(-3, 9)),
    when=times,
    event_id=st.one_of(st.none(), st.text(max_size=10)),
)
def test_any_accepted_event_reads_back(client, user_id, kind, value, when, event_id):
    client.put("/v1/items/liked", json={"title": "Liked"})
    event = {"user_id": user_id, "item_id": "liked", "type": kind}
    extras = {"value": value, "timestamp": when, "event_id": event_id}
    event |= {key: extra for key, extra in extras.items() if extra is not None}
    response = _send(client, "POST", "/v1/feedback", {"events": [event]})
    hypothesis_event(f"status {response.status_code}")
    assert response.status_code in (200, 422), response.text
    # An event id sent in an earlier example makes this one a duplicate: stored once, before.
    if response.status_code == 200 and response.json()["accepted"] == 1:
        user = client.get(_path("users", user_id))
        assert user.status_code == 200
        positive = kind in ("click", "like", "purchase") or (kind == "rating" and value >= 4)
        if positive:
            assert "liked" in [entry["item_id"] for entry in user.json()["history"]]
    if response.status_code == 200:
        _served(client, user_id, "anyone")
