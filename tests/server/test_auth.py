"""API keys: with REASONREC_API_KEYS set, every /v1 route needs one; health routes stay open."""

import pytest
from fastapi.testclient import TestClient

from tests.server.helpers import assert_error

KEYS = ["k1", "k2"]

V1_CALLS = [
    ("get", "/v1/items/a", None),
    ("put", "/v1/items/a", {"title": "A"}),
    ("post", "/v1/items", {"items": [{"item_id": "a", "title": "A"}]}),
    ("delete", "/v1/items/a", None),
    ("get", "/v1/users/u1", None),
    ("put", "/v1/users/u1", {"attributes": {}}),
    ("post", "/v1/feedback", {"events": [{"user_id": "u", "item_id": "a", "type": "click"}]}),
]


@pytest.fixture
def secured(make_client):
    return make_client(api_keys=KEYS)


def _call(client, method, path, body, headers=None):
    return client.request(method, path, json=body, headers=headers or {})


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"X-API-Key": "wrong"},
        {"Authorization": "Basic k1"},
        {"Authorization": "Bearer"},
        {"Authorization": "k1"},
        {"X-API-Key": ""},
        {"X-API-Key": "k1x"},
    ],
    ids=[
        "none",
        "bad-bearer",
        "bad-x-api-key",
        "basic",
        "empty-bearer",
        "no-scheme",
        "empty",
        "ext",
    ],
)
def test_v1_routes_need_a_valid_key(secured, rdb, key_prefix, headers):
    for method, path, body in V1_CALLS:
        response = _call(secured, method, path, body, headers)
        error = assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
        assert "k1" not in error["message"]
    # Nothing was written.
    assert list(rdb.scan_iter(match=f"{key_prefix}:*")) == []


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer k1"},
        {"Authorization": "bearer k2"},
        {"X-API-Key": "k1"},
        {"X-API-Key": "k2"},
        {"Authorization": "Bearer k1", "X-API-Key": "wrong"},
    ],
    ids=["bearer", "bearer-lowercase", "x-api-key", "second-key", "bearer-wins"],
)
def test_v1_routes_accept_a_valid_key(secured, headers):
    statuses = [_call(secured, m, p, b, headers).status_code for m, p, b in V1_CALLS]
    # Each GET runs before its item or user exists.
    assert statuses == [404, 200, 200, 204, 404, 200, 200]


def test_health_routes_stay_open(secured):
    assert secured.get("/healthz").status_code == 200
    assert secured.get("/readyz").status_code == 200
    assert secured.get("/metrics").status_code == 200


def test_no_keys_means_no_auth(client):
    assert client.put("/v1/items/a", json={"title": "A"}).status_code == 200
    assert client.get("/v1/items/a", headers={"X-API-Key": "anything"}).status_code == 200


def test_auth_checked_before_body_validation(secured):
    response = secured.post("/v1/feedback", json={"events": []})
    assert_error(response, 401, "unauthorized")


def test_a_request_without_a_key_is_refused_before_its_body_is_read(secured):
    """FastAPI reads and parses the whole body before any dependency runs: a client with no key
    made the gateway parse up to 8 MiB, and was answered 422 or 400, not 401."""
    for body in (b"{not json", b"[" * 100_000):
        response = secured.post(
            "/v1/feedback", content=body, headers={"Content-Type": "application/json"}
        )
        assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.headers["x-request-id"]
    with_key = secured.post(
        "/v1/feedback",
        content=b"{not json",
        headers={"Content-Type": "application/json", "X-API-Key": KEYS[0]},
    )
    assert_error(with_key, 422, "validation_error")  # a known key: the body is read


def test_behind_a_root_path_too(secured):
    """uvicorn --root-path /api: the path arrives as /api/v1/..., the route is still /v1/..."""
    behind = TestClient(secured.app, root_path="/api")
    response = behind.post(
        "/api/v1/feedback", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert_error(response, 401, "unauthorized")


@pytest.mark.parametrize(
    ("host", "keys", "warned"),
    [
        ("0.0.0.0", [], True),
        ("10.1.2.3", [], True),
        ("gateway.internal", [], True),
        ("0.0.0.0", KEYS, False),
        ("127.0.0.1", [], False),  # the embedded default: this machine only
        ("::1", [], False),
        ("localhost", [], False),
    ],
)
def test_an_open_address_without_keys_is_warned_of_at_startup(
    make_client, caplog: pytest.LogCaptureFixture, host: str, keys: list[str], warned: bool
) -> None:
    with caplog.at_level("WARNING", logger="server.app"):
        make_client(host=host, api_keys=keys)
    assert any("no API keys" in message for message in caplog.messages) == warned
