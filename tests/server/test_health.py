"""Health, readiness, Redis outages, Prometheus metrics and request ids."""

import asyncio
import re
import signal
import threading
import time
import warnings

import httpx
import pytest
import redis

from server.routes import health
from tests.conftest import RedisProcess
from tests.server.helpers import assert_error, metric, post_events, put_items
from tests.server.test_recommend_logic import FakeEngine, use

REQUESTS = "reasonrec_http_requests_total"
DURATION_COUNT = "reasonrec_http_request_duration_seconds_count"
REDIS_ERRORS = "reasonrec_redis_errors_total"


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    # No model is active under a fresh prefix: serving works, in the retrieval order.
    assert response.json() == {
        "status": "degraded",
        "checks": {"redis": "ok", "engine": "no active model: run `reasonrec bootstrap`"},
        "model_version": None,
    }


class SilentEngine(FakeEngine):
    """A remote server that took the health check's connection and never answers."""

    async def check_health(self) -> None:
        await asyncio.sleep(3600)


def test_readyz_does_not_wait_on_an_engine_that_never_answers(client, monkeypatch):
    monkeypatch.setattr(health, "HEALTH_SECONDS", 0.2)
    use(client, SilentEngine())
    started = time.monotonic()

    response = client.get("/readyz")

    assert time.monotonic() - started < 5
    assert response.status_code == 200  # degraded: serving goes on in the retrieval order
    assert response.json()["checks"]["engine"] == "unreachable"


@pytest.fixture
def outage_client(make_client, redis_process):
    """An app on a Redis of the test's own, which the test stops and starts."""
    return make_client(redis_url=redis_process.url)


def test_redis_down_then_back(outage_client, redis_process, caplog):
    client = outage_client
    assert client.get("/readyz").status_code == 200
    assert client.put("/v1/items/a", json={"title": "A"}).status_code == 200
    response = post_events(client, {"user_id": "u0", "item_id": "a", "type": "click"})
    assert response.json()["accepted"] == 1
    errors_before = metric(client, REDIS_ERRORS)

    redis_process.stop()

    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not_ready"
    assert body["checks"]["redis"] == "unreachable"  # no address or error text to strangers

    calls = [
        client.get("/v1/items/a"),
        client.put("/v1/items/b", json={"title": "B"}),
        client.post("/v1/items", json={"items": [{"item_id": "c", "title": "C"}]}),
        client.delete("/v1/items/a"),
        client.get("/v1/users/u1"),
        client.put("/v1/users/u1", json={}),
        post_events(client, {"user_id": "u1", "item_id": "a", "type": "click"}),
    ]
    for response in calls:
        error = assert_error(response, 503, "storage_unavailable")
        assert response.headers["retry-after"] == "1"
        assert "Error" not in error["message"]
        assert str(redis_process.port) not in response.text
    assert metric(client, REDIS_ERRORS) >= errors_before + len(calls)
    # What strangers are not told, the log says: which server, and what went wrong with it.
    reasons = [r.reason for r in caplog.records if r.getMessage() == "redis unavailable"]
    assert reasons and all(str(redis_process.port) in reason for reason in reasons)
    assert reasons[0].startswith("ConnectionError: ")
    # Health and metrics do not need Redis.
    assert client.get("/healthz").status_code == 200

    redis_process.start()

    # Same app and client: it reconnects by itself. The new server is empty.
    assert client.get("/readyz").status_code == 200
    assert client.get("/readyz").json()["checks"]["redis"] == "ok"
    assert_error(client.get("/v1/items/a"), 404, "not_found")
    assert client.put("/v1/items/a", json={"title": "A"}).status_code == 200
    assert client.get("/v1/items/a").json()["title"] == "A"
    # The new server has not cached the feedback script: it is loaded again.
    response = post_events(client, {"user_id": "u1", "item_id": "a", "type": "click"})
    assert response.json()["accepted"] == 1
    assert [h["item_id"] for h in client.get("/v1/users/u1").json()["history"]] == ["a"]


def test_requests_counted_by_route_template(client):
    def count(route, method, status):
        return metric(client, REQUESTS, route=route, method=method, status=status)

    item_route = "/v1/items/{item_id}"
    before = {
        "put": count(item_route, "PUT", "200"),
        "get": count(item_route, "GET", "200"),
        "missing": count(item_route, "GET", "404"),
        "batch": count("/v1/items", "POST", "200"),
        "unmatched": count("unmatched", "GET", "404"),
        "duration": metric(client, DURATION_COUNT, route=item_route),
    }
    client.put("/v1/items/x1", json={"title": "A"})
    client.put("/v1/items/x2", json={"title": "B"})
    client.get("/v1/items/x1")
    client.get("/v1/items/nothing-here")
    client.post("/v1/items", json={"items": [{"item_id": "x3", "title": "C"}]})
    client.get("/no/such/route")
    assert count(item_route, "PUT", "200") == before["put"] + 2
    assert count(item_route, "GET", "200") == before["get"] + 1
    assert count(item_route, "GET", "404") == before["missing"] + 1
    assert count("/v1/items", "POST", "200") == before["batch"] + 1
    assert count("unmatched", "GET", "404") == before["unmatched"] + 1
    assert metric(client, DURATION_COUNT, route=item_route) == before["duration"] + 4
    # Concrete ids never become labels, nor methods a client makes up.
    client.request("PROPFIND", "/v1/items/x1")
    client.request("FOO1", "/healthz")
    text = client.get("/metrics").text
    assert 'route="/v1/items/x1"' not in text
    assert 'method="PROPFIND"' not in text and 'method="FOO1"' not in text
    assert count(item_route, "OTHER", "405") >= 1


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
def test_health_answers_head_as_uptime_checkers_send_it(client, path):
    head, get = client.head(path), client.get(path)
    assert (head.status_code, head.content) == (get.status_code, b"")
    assert head.headers["content-type"] == get.headers["content-type"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        operations = client.get("/openapi.json").json()["paths"][path]
    assert list(operations) == ["get"]  # one operation: no duplicate operation id
    assert not [w for w in caught if "Duplicate Operation ID" in str(w.message)]


def test_metrics_exposition(client):
    put_items(client, "a")
    post_events(client, {"user_id": "u", "item_id": "a", "type": "click"})
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in (
        "reasonrec_http_requests_total",
        "reasonrec_http_request_duration_seconds_bucket",
        "reasonrec_feedback_events_total",
        "reasonrec_redis_errors_total",
    ):
        assert re.search(rf"^{name}[{{ ]", text, re.MULTILINE), name
    assert 'reasonrec_feedback_events_total{type="click"}' in text
    assert 'route="/v1/feedback"' in text


def test_request_id_generated(client):
    first = client.get("/healthz").headers["x-request-id"]
    second = client.get("/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert first != second


def test_client_request_id_kept_beside_a_unique_one(client):
    headers = {"X-Request-ID": "abc-123"}
    responses = [
        client.get("/healthz", headers=headers),
        client.get("/v1/items/none", headers=headers),
        client.put("/v1/items/a", json={"title": ""}, headers=headers),
    ]
    assert [r.status_code for r in responses] == [200, 404, 422]
    assert all(r.headers["x-client-request-id"] == "abc-123" for r in responses)
    # Two requests never share a request id, whatever the client sends.
    assert len({r.headers["x-request-id"] for r in responses}) == 3


@pytest.mark.parametrize("sent", ["x" * 129, "a b", "a\tb", "<script>", "id,other", "é"], ids=repr)
def test_bad_client_request_id_ignored(client, sent):
    response = client.get("/healthz", headers={"X-Request-ID": sent.encode("utf-8")})
    assert response.status_code == 200
    assert "x-client-request-id" not in response.headers
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


def test_request_id_on_every_kind_of_response(make_client):
    client = make_client(api_keys=["k1"], max_body_bytes=1024)
    responses = [
        client.get("/metrics"),
        client.get("/readyz"),
        client.get("/nope"),
        client.get("/v1/items/a"),  # 401
        # With a key: one without is refused (401) before its method or body is looked at.
        client.patch("/v1/items/a", headers={"X-API-Key": "k1"}),  # 405
        client.post("/v1/items", content=b"x" * 2000, headers={"X-API-Key": "k1"}),  # 413
    ]
    assert [r.status_code for r in responses] == [200, 200, 404, 401, 405, 413]
    for response in responses:
        assert response.headers["x-request-id"]
        assert len(response.headers.get_list("x-request-id")) == 1


def test_request_id_on_503(outage_client, redis_process):
    redis_process.stop()
    response = outage_client.get("/v1/items/a", headers={"X-Request-ID": "down-1"})
    assert response.status_code == 503
    assert response.headers["x-client-request-id"] == "down-1"


def test_app_starts_with_redis_down(make_client, redis_process):
    redis_process.stop()
    client = make_client(redis_url=redis_process.url)
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503
    assert_error(client.get("/v1/items/a"), 503, "storage_unavailable")
    redis_process.start()
    assert client.get("/readyz").status_code == 200
    assert_error(client.get("/v1/items/a"), 404, "not_found")


def test_redis_hanging_times_out_with_503(make_client, redis_process):
    """A Redis that stops answering (SIGSTOP) costs a request its timeout, then 503."""
    client = make_client(redis_url=redis_process.url, redis_timeout_seconds=0.2)
    client.put("/v1/items/a", json={"title": "A"})
    client.put("/v1/items/b", json={"title": "B"})
    redis_process.proc.send_signal(signal.SIGSTOP)
    try:
        start = time.perf_counter()
        assert_error(client.get("/v1/items/a"), 503, "storage_unavailable")
        assert time.perf_counter() - start < 2
        assert client.get("/readyz").status_code == 503
    finally:
        redis_process.proc.send_signal(signal.SIGCONT)
    # No reply of the timed-out commands is read as the answer to a later one.
    for _ in range(3):
        assert client.get("/v1/items/b").json()["title"] == "B"
        assert client.get("/v1/items/a").json()["title"] == "A"
        assert client.get("/readyz").json()["checks"]["redis"] == "ok"


def test_killed_redis_loses_no_acknowledged_event(live_server, tmp_path, key_prefix):
    """Redis SIGKILLed and restarted from its append-only file under a stream of feedback: JSON
    503s during the outage, the same gateway recovers without a restart, and every event it
    acknowledged is in the stream once."""
    own = RedisProcess(tmp_path / "aof", appendonly=True)
    own.workdir.mkdir()
    own.start()
    url = live_server(REASONREC_REDIS_URL=own.url, REASONREC_REDIS_TIMEOUT_SECONDS="0.5")
    acknowledged: list[str] = []
    refused: list[httpx.Response] = []
    stop = threading.Event()

    def send(client: httpx.Client) -> None:
        while not stop.is_set():
            event = {"user_id": f"u{len(acknowledged) % 7}", "item_id": "a", "type": "click"}
            response = client.post("/v1/feedback", json={"events": [event]})
            if response.status_code == 200:
                acknowledged.extend(response.json()["event_ids"])
            else:
                refused.append(response)

    with httpx.Client(base_url=url, timeout=10) as client:
        assert client.put("/v1/items/a", json={"title": "A"}).status_code == 200
        sender = threading.Thread(target=send, args=(client,))
        sender.start()
        try:
            time.sleep(1)
            own.kill()
            time.sleep(1.5)
            own.start()
            time.sleep(1.5)
            recovered = len(acknowledged)
            time.sleep(1)
        finally:
            stop.set()
            sender.join(timeout=30)
    with redis.Redis.from_url(own.url, decode_responses=True) as check:
        stream = [fields["event_id"] for _, fields in check.xrange(f"{key_prefix}:events")]
    own.stop()

    assert refused, "the outage was never noticed"
    for response in refused:
        assert_error(response, 503, "storage_unavailable")
    assert len(acknowledged) > recovered > 0, "nothing acknowledged after Redis came back"
    assert set(acknowledged) <= set(stream)
    assert len(stream) == len(set(stream))
