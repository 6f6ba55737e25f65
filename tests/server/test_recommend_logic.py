"""POST /v1/recommend, gateway logic only: a fake engine stands in for vLLM (the real one is in
tests/integration). Storage is the test's real Redis.

The shop: old items p1..p4 and new items n1, n2; s1 and s2, which user u1 has clicked; "gone"
(the most popular and newest, but deleted) and "sold-out" (popular, unavailable). With no item
index yet, u1's retrieval order is popular items with one new item after every three: ORDER.
"""

import asyncio
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from contract.prompt import (
    MAX_RATIONALE_CHARS,
    Contract,
    Rendering,
    answer_pattern,
    render_answer,
)
from contract.tasks import Task
from server.app import create_app
from server.config import Settings
from server.engine import Engine, EngineError, Generation, GenerationRequest
from server.item_index import ItemIndex
from server.recommend import (
    COLD_START_RATIONALE,
    FALLBACK_RATIONALE,
    SPARE_IDS,
    first_pick,
)
from tests.conftest import served_in_thread
from tests.server.helpers import metric, post_events

NOW = datetime.now(UTC).replace(microsecond=0)
ORDER = ["p1", "p2", "p3", "n1", "p4", "n2"]
SEEN = {"s1", "s2"}
NEVER = {"gone", "sold-out"}
CATEGORIES = {
    "p1": "drama",
    "p2": "comedy",
    "p3": "drama",
    "p4": "comedy",
    "n1": "comedy",
    "n2": "drama",
    "s1": "drama",
    "s2": "comedy",
    "gone": "drama",
    "sold-out": "comedy",
}
FALLBACKS = "reasonrec_fallbacks_total"
PARSE_FAILURES = "reasonrec_parse_failures_total"
RECOMMENDATIONS = "reasonrec_recommendations_total"
POSITIVES = "reasonrec_positives_total"


class FakeEngine(Engine):
    """Answers with chosen text (or text made from the request), raises, or is slow."""

    def __init__(
        self,
        text: str | Callable[[GenerationRequest], str] = "",
        error: EngineError | None = None,
        delay: float = 0.0,
        model_version: str = "fake-v1",
    ):
        self.text, self.error, self.delay = text, error, delay
        self.model_version = model_version
        self.requests: list[GenerationRequest] = []

    async def generate(self, request: GenerationRequest) -> Generation:
        self.requests.append(request)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        text = self.text(request) if callable(self.text) else self.text
        return Generation(
            text=text,
            prompt_tokens=len(request.prompt.split()),
            completion_tokens=len(text.split()),
        )

    async def check_health(self) -> None:
        if self.error is not None:
            raise self.error

    async def close(self) -> None:
        return None


def _item(item_id: str, age: timedelta, **fields: Any) -> dict[str, Any]:
    return {
        "item_id": item_id,
        "title": f"Title {item_id}",
        "categories": [CATEGORIES[item_id]],
        "created_at": (NOW - age).isoformat(),
        **fields,
    }


def _clicks(item_id: str, users: int, prefix: str = "fan") -> list[dict[str, Any]]:
    return [{"user_id": f"{prefix}{n}", "item_id": item_id, "type": "click"} for n in range(users)]


def load_shop(client: TestClient) -> None:
    items = [
        *(_item(f"p{n}", timedelta(days=100 + n)) for n in range(1, 5)),
        _item("n1", timedelta(days=1)),
        _item("n2", timedelta(days=2)),
        _item("s1", timedelta(days=200)),
        _item("s2", timedelta(days=200)),
        _item("gone", timedelta(0)),
        _item("sold-out", timedelta(days=300), available=False),
    ]
    assert client.post("/v1/items", json={"items": items}).status_code == 200
    popularity = {"gone": 9, "sold-out": 8, "s1": 5, "p1": 5, "p2": 4, "p3": 3, "p4": 2}
    events = [event for item_id, n in popularity.items() for event in _clicks(item_id, n)]
    # u1 clicked s1 a day before s2.
    events += [
        {"user_id": "u1", "item_id": "s1", "type": "click", "timestamp": _ago(days=2)},
        {"user_id": "u1", "item_id": "s2", "type": "click", "timestamp": _ago(days=1)},
    ]
    assert post_events(client, *events).status_code == 200
    assert client.delete("/v1/items/gone").status_code == 204


def _ago(**delta: float) -> str:
    return (NOW - timedelta(**delta)).isoformat()


@pytest.fixture
def shop(client: TestClient) -> TestClient:
    load_shop(client)
    return client


def use(client: TestClient, engine: Engine | None) -> None:
    client.app.state.serving.engine = engine


def recommend(client: TestClient, headers: dict[str, str] | None = None, **body: Any) -> Any:
    response = client.post("/v1/recommend", json={"user_id": "u1", **body}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def ids(body: dict[str, Any]) -> list[str]:
    return [item["item_id"] for item in body["items"]]


def shown(prompt: str) -> list[str]:
    """The candidate ids the prompt lists, in its order."""
    lines = prompt.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Candidates (")) + 1
    return [line.split(" | ")[0].removeprefix("#") for line in lines[start:] if line]


def answer(*item_ids: str) -> str:
    return render_answer("likes drama", list(item_ids))


def last_impression(rdb: redis.Redis, key_prefix: str) -> dict[str, str]:
    [(_, fields)] = rdb.xrevrange(f"{key_prefix}:impressions", count=1)
    return fields


# The LLM answered ------------------------------------------------------------------------------


def test_well_formed_answer_is_served_in_its_order(shop: TestClient) -> None:
    engine = FakeEngine(answer("n2", "p3", "p1"), model_version="fake-order")
    use(shop, engine)
    failures = metric(shop, PARSE_FAILURES, task="rank")

    body = recommend(shop, k=3)

    assert ids(body) == ["n2", "p3", "p1"]
    assert [item["rank"] for item in body["items"]] == [1, 2, 3]
    assert body["source"] == "llm" and body["degraded"] is False
    assert body["model_version"] == "fake-order"
    assert body["rationale"] == "likes drama"
    assert body["items"][0]["title"] == "Title n2"
    assert body["items"][0]["categories"] == ["drama"]
    assert metric(shop, PARSE_FAILURES, task="rank") == failures
    assert len(engine.requests) == 1


@pytest.mark.parametrize(
    ("text", "k", "expected", "repaired", "source"),
    [
        # Duplicates dropped, backfilled from the retrieval order.
        (answer("p3", "p3", "n2"), 3, ["p3", "n2", "p1"], True, "llm"),
        # Non-candidates ignored: seen, hidden, unavailable and unknown ids.
        (answer("s1", "gone", "p2", "sold-out", "zz"), 3, ["p2", "p1", "p3"], True, "llm"),
        # Every id invalid: the retrieval order, as the fallback (it was served as the model's).
        (answer("zz", "yy", "xx"), 3, ORDER[:3], True, "fallback"),
        # More ids than asked: the first k, nothing to repair.
        (answer("p4", "p3", "p2", "p1"), 3, ["p4", "p3", "p2"], False, "llm"),
        # Ids without the mark are not read.
        ("<think>x</think><answer>p4, #p3</answer>", 2, ["p3", "p1"], True, "llm"),
        # Free text naming items: the retrieval order.
        ("I would pick #p4 and #p3.", 2, ORDER[:2], True, "fallback"),
        # Nothing at all.
        ("", 2, ORDER[:2], True, "fallback"),
        # Cut by the token budget: the ids before the cut, the one cut short (#p2?) left out.
        ("<think>x</think><answer>#p4, #p3, #p", 3, ["p4", "p3", "p1"], True, "llm"),
        # k above the candidates: every candidate once, answer first.
        (answer("n2"), 50, ["n2", "p1", "p2", "p3", "n1", "p4"], True, "llm"),
    ],
)
def test_answers_are_repaired(
    shop: TestClient, text: str, k: int, expected: list[str], repaired: bool, source: str
) -> None:
    use(shop, FakeEngine(text))
    failures = metric(shop, PARSE_FAILURES, task="rank")

    body = recommend(shop, k=k)

    assert ids(body) == expected
    assert body["source"] == source
    assert metric(shop, PARSE_FAILURES, task="rank") == failures + (1 if repaired else 0)


def test_malformed_answer_still_serves_the_retrieval_order(
    shop: TestClient, rdb: redis.Redis, key_prefix: str
) -> None:
    raw = "Sorry, I cannot help with that."
    use(shop, FakeEngine(raw))
    failures = metric(shop, PARSE_FAILURES, task="rank")

    body = recommend(shop, k=4)

    assert ids(body) == ORDER[:4]
    assert (body["source"], body["degraded"]) == ("fallback", True)  # nothing of it was used
    assert metric(shop, PARSE_FAILURES, task="rank") == failures + 1
    # The raw output is logged, for debugging and training.
    assert last_impression(rdb, key_prefix)["output"] == raw


def test_explain_false_leaves_out_the_rationale(shop: TestClient) -> None:
    use(shop, FakeEngine(answer("p1")))
    assert recommend(shop, k=1, explain=False)["rationale"] is None


# Fallbacks -------------------------------------------------------------------------------------


def test_engine_error_falls_back(shop: TestClient, rdb: redis.Redis, key_prefix: str) -> None:
    use(shop, FakeEngine(error=EngineError("engine answered 503"), model_version="fake-down"))
    before = metric(shop, FALLBACKS, reason="engine_error")

    body = recommend(shop, k=3)

    assert ids(body) == ORDER[:3]
    assert body["source"] == "fallback" and body["degraded"] is True
    assert body["rationale"] == COLD_START_RATIONALE  # no index yet: popular and new items
    assert body["model_version"] == "fake-down"
    assert metric(shop, FALLBACKS, reason="engine_error") == before + 1
    assert last_impression(rdb, key_prefix)["fallback_reason"] == "engine_error"


def test_a_down_engine_leaves_the_gateway_ready_but_degraded(shop: TestClient) -> None:
    """Every gateway shares the engine: failing readiness would take them all out of service
    when each can still answer in the retrieval order."""
    use(shop, FakeEngine(error=EngineError("engine unreachable"), model_version="fake-down"))

    ready = shop.get("/readyz")

    assert ready.status_code == 200
    assert ready.json() == {
        "status": "degraded",
        "checks": {"redis": "ok", "engine": "unreachable"},
        "model_version": "fake-down",
    }


def test_slow_engine_times_out(
    make_client: Callable[..., TestClient], rdb: redis.Redis, key_prefix: str
) -> None:
    client = make_client(llm_timeout_ms=50)
    load_shop(client)
    use(client, FakeEngine(answer("p4", "p3"), delay=5.0))
    before = metric(client, FALLBACKS, reason="timeout")

    body = recommend(client, k=2)

    assert ids(body) == ORDER[:2]
    assert body["source"] == "fallback" and body["degraded"] is True
    # The budget, not the engine's 5 s, bounds the request.
    assert body["latency_ms"] < 2000
    assert metric(client, FALLBACKS, reason="timeout") == before + 1
    assert last_impression(rdb, key_prefix)["fallback_reason"] == "timeout"


def test_no_engine_serves_the_retrieval_order(shop: TestClient) -> None:
    use(shop, None)
    before = metric(shop, FALLBACKS, reason="no_model")

    body = recommend(shop, k=10)

    assert ids(body) == ORDER
    assert body["source"] == "fallback" and body["degraded"] is True
    assert body["model_version"] is None
    assert metric(shop, FALLBACKS, reason="no_model") == before + 1


def test_a_model_not_trained_to_rank_is_never_asked(shop: TestClient) -> None:
    engine = FakeEngine(answer("p3"))
    engine.contract = Contract(tasks=frozenset())  # as a rating-only model's manifest would say
    use(shop, engine)
    before = metric(shop, FALLBACKS, reason="task_unsupported")

    body = recommend(shop, k=10)

    assert engine.requests == []
    assert ids(body) == ORDER and body["source"] == "fallback"
    assert metric(shop, FALLBACKS, reason="task_unsupported") == before + 1


def test_empty_catalog(client: TestClient, rdb: redis.Redis, key_prefix: str) -> None:
    engine = FakeEngine(answer("p1"))
    use(client, engine)
    before = metric(client, FALLBACKS, reason="no_candidates")

    body = recommend(client, k=5)

    assert body["items"] == []
    assert body["source"] == "fallback" and body["degraded"] is True
    assert metric(client, FALLBACKS, reason="no_candidates") == before + 1
    assert engine.requests == []  # nothing to rank: the engine is not asked
    impression = last_impression(rdb, key_prefix)
    assert impression["fallback_reason"] == "no_candidates"
    assert json.loads(impression["candidates"]) == []


def test_positives_are_credited_to_the_version_that_served_the_list(
    shop: TestClient, rdb: redis.Redis, key_prefix: str
) -> None:
    use(shop, FakeEngine(answer("p1", "p2"), model_version="fake-credit"))
    request_id = recommend(shop, k=2)["request_id"]
    served = {"user_id": "u1", "item_id": "p1", "request_id": request_id}
    before = metric(shop, POSITIVES, model_version="fake-credit")

    post_events(
        shop,
        {**served, "type": "click", "event_id": "credit-1"},
        {**served, "type": "click", "event_id": "credit-1"},  # a duplicate: not counted again
        {**served, "type": "dislike"},  # not a positive
        {**served, "type": "purchase", "request_id": "never-served"},
        {"user_id": "u1", "item_id": "p2", "type": "like"},  # organic: no request id
        {**served, "user_id": "mallory", "type": "click"},  # another user's: never this list's
    )

    assert metric(shop, POSITIVES, model_version="fake-credit") == before + 1
    assert rdb.ttl(f"{key_prefix}:shown:{request_id}") > 0  # forgotten after attribution


def test_lists_served_before_users_were_kept_are_still_credited(
    shop: TestClient, rdb: redis.Redis, key_prefix: str
) -> None:
    """An attribution key of the release before holds the version alone, under `served:`."""
    rdb.set(f"{key_prefix}:served:old-request", "fake-old", ex=3600)
    before = metric(shop, POSITIVES, model_version="fake-old")

    post_events(
        shop, {"user_id": "u1", "item_id": "p1", "type": "click", "request_id": "old-request"}
    )

    assert metric(shop, POSITIVES, model_version="fake-old") == before + 1
    # A value written by hand without its space: the events are stored all the same.
    rdb.set(f"{key_prefix}:shown:hand-made", "garbage", ex=3600)
    click = {"user_id": "garbage", "item_id": "p1", "type": "click", "request_id": "hand-made"}
    assert post_events(shop, click).status_code == 200


# What the engine is asked ----------------------------------------------------------------------


def test_the_regex_names_exactly_the_candidates_in_the_prompt(shop: TestClient) -> None:
    engine = FakeEngine(answer("p1", "p2"))
    use(shop, engine)

    body = recommend(shop, k=2)

    [request] = engine.requests
    assert request.request_id == body["request_id"]
    # Ids written as text: the longest answer the regex admits fits the budget, one token a byte.
    longest = render_answer("x" * MAX_RATIONALE_CHARS, sorted(ORDER, key=len)[-(2 + SPARE_IDS) :])
    assert request.max_tokens > len(longest.encode()) > shop.app.state.settings.max_answer_tokens
    assert shown(request.prompt) == ORDER
    assert request.regex == answer_pattern(ORDER, 2, SPARE_IDS)
    one = answer_pattern(shown(request.prompt), 1)
    for item_id in CATEGORIES:
        accepted = re.fullmatch(one, answer(item_id)) is not None
        assert accepted is (item_id in ORDER), item_id


def test_the_prompt_shows_the_users_history(shop: TestClient) -> None:
    engine = FakeEngine(answer("p1"))
    use(shop, engine)
    recommend(shop, k=1)
    prompt = engine.requests[0].prompt
    history = prompt[prompt.index("History, oldest first:") : prompt.index("Candidates (")]
    assert history.index("#s1 | Title s1") < history.index("#s2 | Title s2")
    assert "Candidates (6):" in prompt
    assert "User: new user" in prompt  # u1 has events but no attributes


def test_a_compact_model_gets_a_compact_prompt_and_the_same_regex(
    shop: TestClient, rdb: redis.Redis, key_prefix: str
) -> None:
    # The rendering comes from the engine's contract (its manifest), not from a setting.
    engine = FakeEngine(answer("p3", "p1"))
    engine.contract = Contract(rendering=Rendering.compact, history=50)
    use(shop, engine)

    body = recommend(shop, k=2)

    [request] = engine.requests
    assert request.prompt == "\n#s1, #s2\n"  # no profile, the history as item references
    assert request.regex == answer_pattern(ORDER, 2, SPARE_IDS)  # candidates: grammar only
    assert ids(body) == ["p3", "p1"]
    assert last_impression(rdb, key_prefix)["rendering"] == "compact"


def test_a_compact_model_sees_more_history_than_retrieval_queries_with(
    shop: TestClient, rdb: redis.Redis, key_prefix: str
) -> None:
    shop.app.state.settings.prompt_history = 1  # retrieval reads only the latest item, s2
    engine = FakeEngine(answer("p1"))
    engine.contract = Contract(rendering=Rendering.compact, history=50)
    use(shop, engine)

    recommend(shop, k=1, exclude_seen=False)

    [request] = engine.requests
    assert request.prompt == "\n#s1, #s2\n"
    # s1 is outside retrieval's history but in the prompt's: never also a candidate (training
    # never offers an item its prompt shows as history; the prompt offered s1 as both)
    assert "s1" not in json.loads(last_impression(rdb, key_prefix)["candidates"])


@pytest.mark.parametrize("with_engine", [True, False])
def test_hidden_unavailable_and_seen_items_never_offered(
    shop: TestClient, with_engine: bool
) -> None:
    # An engine that names every forbidden item, then the rest; or none (fallback).
    engine = FakeEngine(answer(*NEVER, *SEEN, *ORDER)) if with_engine else None
    use(shop, engine)

    body = recommend(shop, k=50)

    assert set(ids(body)) == set(ORDER)
    if engine is not None:
        assert not (NEVER | SEEN) & set(shown(engine.requests[0].prompt))


def test_exclude_seen_false_readmits_seen_items_outside_the_history(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(prompt_history=1)  # the prompt shows s2 only
    load_shop(client)

    with_seen = recommend(client, k=50, exclude_seen=False)
    without = recommend(client, k=50)

    assert "s1" in ids(with_seen)
    assert not SEEN & set(ids(without))
    assert not NEVER & set(ids(with_seen))


@pytest.mark.parametrize(
    ("categories", "expected"),
    [
        (["comedy"], ["p2", "n1", "p4"]),  # retrieval order within the category
        (["drama"], ["p1", "p3", "n2"]),
        (["comedy", "drama"], ORDER),  # any of them
        (["horror"], []),  # none: empty, not an error
    ],
)
def test_categories_filter(shop: TestClient, categories: list[str], expected: list[str]) -> None:
    engine = FakeEngine(answer(*reversed(ORDER)))
    use(shop, engine)

    body = recommend(shop, k=10, categories=categories)

    # The engine's order among the allowed ones (backfilled by nothing: all were named).
    assert ids(body) == [i for i in reversed(ORDER) if i in expected]
    if expected:
        assert shown(engine.requests[0].prompt) == expected


def test_k_above_the_candidates_setting_is_served_in_full(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(candidates=2)
    load_shop(client)

    assert len(ids(recommend(client, k=4))) == 4


# Impressions and metrics -----------------------------------------------------------------------


def test_fallback_rationale_says_what_the_list_is_ranked_by(shop: TestClient) -> None:
    # An index that knows u1's history (s1, s2): u1's fallback is ranked by it, a new user's is
    # not (issue: cold-start users were told "Ranked by similarity to your recent history").
    item_ids = ["s1", "s2", "p1", "p2", "p3", "p4"]
    vectors = np.eye(len(item_ids), dtype=np.float32) + 0.1
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    shop.app.state.serving.index = ItemIndex(
        item_ids, vectors, np.zeros(len(item_ids), np.float32), {}
    )
    use(shop, None)

    assert recommend(shop, user_id="u1")["rationale"] == FALLBACK_RATIONALE
    assert recommend(shop, user_id="newcomer")["rationale"] == COLD_START_RATIONALE


def test_impression_logged_with_the_request_id(
    shop: TestClient, rdb: redis.Redis, key_prefix: str
) -> None:
    text = answer("p3", "n1")
    engine = FakeEngine(text, model_version="fake-imp")
    use(shop, engine)

    response = shop.post(
        "/v1/recommend", json={"user_id": "u1", "k": 2}, headers={"X-Request-ID": "req-42"}
    )

    assert response.status_code == 200
    request_id = response.json()["request_id"]
    assert response.headers["x-request-id"] == request_id != "req-42"
    assert response.headers["x-client-request-id"] == "req-42"
    entry = last_impression(rdb, key_prefix)
    assert entry["request_id"] == request_id
    assert entry["user_id"] == "u1"
    assert entry["model_version"] == "fake-imp"
    assert entry["source"] == "llm" and entry["fallback_reason"] == ""
    assert json.loads(entry["items"]) == ["p3", "n1"]
    assert entry["k"] == "2"
    assert json.loads(entry["candidates"]) == ORDER
    assert entry["prompt"] == engine.requests[0].prompt
    assert entry["output"] == text
    assert abs(float(entry["ts"]) - datetime.now(UTC).timestamp()) < 60


def test_a_list_whose_client_left_is_not_logged_as_an_impression(
    settings: Settings, rdb: redis.Redis, key_prefix: str
) -> None:
    app = create_app(settings)
    with served_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        load_shop(client)
        app.state.serving.engine = FakeEngine(answer("p3", "n1"), delay=1.0)
        with pytest.raises(httpx.ReadTimeout):  # the client stops waiting
            client.post("/v1/recommend", json={"user_id": "u1", "k": 2}, timeout=0.3)
        waited = client.post("/v1/recommend", json={"user_id": "u2", "k": 2})

    logged = [fields["user_id"] for _, fields in rdb.xrange(f"{key_prefix}:impressions")]
    assert waited.status_code == 200 and logged == ["u2"]


class HeldEngine(FakeEngine):
    """Fails its first `failing` calls at once; answers the others after a minute unless
    cancelled first (vLLM then aborts the request)."""

    def __init__(self, failing: int = 0) -> None:
        super().__init__(answer("p3", "n1"))
        self.contract = Contract(tasks=frozenset({Task.rank, Task.rate, Task.search}))
        self.failing = failing
        self.held, self.cancelled = threading.Event(), threading.Event()

    async def generate(self, request: GenerationRequest) -> Generation:
        self.requests.append(request)
        if len(self.requests) <= self.failing:
            raise EngineError("engine answered 503")
        self.held.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return await super().generate(request)


# What a request counts when it is answered: one its client left counts in none of them.
COUNTED = [
    "reasonrec_recommendations_total",
    "reasonrec_fallbacks_total",
    "reasonrec_ratings_total",
    "reasonrec_rate_fallbacks_total",
    "reasonrec_searches_total",
    "reasonrec_search_fallbacks_total",
]


@pytest.mark.parametrize(
    ("route", "body", "failing"),
    [
        ("/v1/recommend", {"user_id": "u1", "k": 2}, 0),
        # one item's call failed at once: its fallback was counted, the request never was
        ("/v1/rate", {"user_id": "u1", "item_ids": ["p1", "p2"]}, 1),
        ("/v1/search", {"user_id": "u1", "query": "title"}, 0),
    ],
)
def test_a_request_whose_client_left_stops_its_engine_call(
    settings: Settings, route: str, body: dict[str, Any], failing: int
) -> None:
    """Starlette ran a handler to its end though nobody waited: a client that gave up and
    retried kept the engine working for both, up to REASONREC_LLM_TIMEOUT_MS."""
    app = create_app(settings.model_copy(update={"llm_timeout_ms": 120_000}))
    engine = HeldEngine(failing)
    with served_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        load_shop(client)
        app.state.serving.engine = engine
        gone = {"route": route, "status": "499"}
        before = metric(client, "reasonrec_http_requests_total", **gone)
        counted = {name: metric(client, name) for name in COUNTED}
        timed = metric(client, "reasonrec_engine_seconds_count")
        _leave_once_held(url, route, body, engine.held)
        assert engine.cancelled.wait(10)
        deadline = time.monotonic() + 10  # counted once the handler has returned
        while metric(client, "reasonrec_http_requests_total", **gone) == before:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert metric(client, "reasonrec_http_requests_total", **gone) == before + 1
        assert {name: metric(client, name) for name in COUNTED} == counted
        # a call cut short says nothing of the engine's speed; the failed one does
        assert metric(client, "reasonrec_engine_seconds_count") == timed + failing


def _leave_once_held(url: str, route: str, body: dict[str, Any], held: threading.Event) -> None:
    """Send the request, and close the connection once the engine holds it."""
    payload = json.dumps(body).encode()
    head = f"POST {route} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(payload)}\r\n\r\n"
    host, port = httpx.URL(url).host, httpx.URL(url).port
    with socket.create_connection((host, port)) as connection:
        connection.sendall(head.encode() + payload)
        assert held.wait(30)


def test_generated_request_id_is_the_same_everywhere(
    shop: TestClient, rdb: redis.Redis, key_prefix: str
) -> None:
    use(shop, None)
    response = shop.post("/v1/recommend", json={"user_id": "u1"})
    request_id = response.headers["x-request-id"]
    assert request_id and response.json()["request_id"] == request_id
    assert last_impression(rdb, key_prefix)["request_id"] == request_id


def test_one_impression_per_request(shop: TestClient, rdb: redis.Redis, key_prefix: str) -> None:
    use(shop, FakeEngine(answer("p1")))
    for _ in range(3):
        recommend(shop, k=1)
    assert rdb.xlen(f"{key_prefix}:impressions") == 3


def test_recommendations_counted_by_source_and_model_version(shop: TestClient) -> None:
    version = f"fake-{uuid.uuid4().hex[:8]}"
    llm = {"source": "llm", "model_version": version}
    fallback = {"source": "fallback", "model_version": version}
    use(shop, FakeEngine(answer("p1"), model_version=version))

    recommend(shop, k=1)
    recommend(shop, k=1)
    use(shop, FakeEngine(error=EngineError("down"), model_version=version))
    recommend(shop, k=1)

    assert metric(shop, RECOMMENDATIONS, **llm) == 2
    assert metric(shop, RECOMMENDATIONS, **fallback) == 1


# The business policy ---------------------------------------------------------------------------


@pytest.fixture
def capped_shop(make_client: Callable[..., TestClient], tmp_path: Any) -> TestClient:
    """The shop under a policy file: one item per category, promoted items three pages up."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "constraints:\n  max_per_category: 1\n  boost:\n    promoted: 3\n", encoding="utf-8"
    )
    client = make_client(policy_file=policy)
    load_shop(client)
    return client


def test_policy_caps_categories_and_backfills(capped_shop: TestClient) -> None:
    use(capped_shop, FakeEngine(answer("p1", "p3")))  # two dramas: the second breaks the cap
    body = recommend(capped_shop, k=2)
    assert ids(body) == ["p1", "p2"]  # p3 dropped; the retrieval order's first comedy fills in
    assert body["source"] == "llm"


def test_policy_boosts_promoted_items_on_fallback_too(capped_shop: TestClient) -> None:
    promoted = _item("n2", timedelta(days=2), promoted=True)
    assert capped_shop.post("/v1/items", json={"items": [promoted]}).status_code == 200
    use(capped_shop, None)
    assert ids(recommend(capped_shop, k=2)) == ["n2", "p2"]  # n2 (drama) up a page, then comedy


def test_invalid_policy_file_stops_the_gateway(
    make_client: Callable[..., TestClient], tmp_path: Any
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("weights:\n  accuracy: -1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"policy.yaml:2:"):
        make_client(policy_file=policy)


# Ordering by the first pick's log-probabilities ---------------------------------------------


def generation(text: str, first: dict[str, float]) -> Generation:
    tokens = ["<think>", "x", "</think>", "<answer>", "#p1", "</answer>"]
    steps: list[dict[str, float]] = [{}] * len(tokens)
    steps[4] = first
    return Generation(
        text=text, prompt_tokens=1, completion_tokens=6, tokens=tokens, top_logprobs=steps
    )


def test_first_pick_ranks_candidates_by_their_log_probability() -> None:
    result = generation("", {"#p2": -0.5, "#p1": -0.2, "#zz": -0.1, "#p3": float("-inf")})

    # Not a candidate (zz) or not allowed (-inf) is never served.
    assert first_pick(result, ["p1", "p2", "p3"]) == {"p2": -0.5, "p1": -0.2}


def test_first_pick_reads_an_answer_tag_spelled_in_pieces() -> None:
    # a pretrained tokenizer given `<answer>` as a token may still write it as `<`, `answer`, `>`
    tokens = ["<think>", "x", "</think>", "<", "answer", ">", "#p1", "</answer>"]
    steps: list[dict[str, float]] = [{}] * len(tokens)
    steps[6] = {"#p1": -0.1, "#p2": -0.3}
    result = Generation(
        text="", prompt_tokens=1, completion_tokens=8, tokens=tokens, top_logprobs=steps
    )

    assert first_pick(result, ["p1", "p2"]) == {"p1": -0.1, "p2": -0.3}


def test_first_pick_needs_the_answer_step() -> None:
    result = Generation(text="", prompt_tokens=1, completion_tokens=1, tokens=["x"])

    assert first_pick(result, ["p1"]) == {}


class OneTokenItems:
    """What the gateway asks of `ItemTokens`: ids 100, 101, ... for the candidates, none for
    the `untokenised` ones (added after the model was trained)."""

    def __init__(self, untokenised: frozenset[str] = frozenset()):
        self.untokenised = untokenised

    def nameable(self, candidate_ids: list[str]) -> list[str]:
        return [item_id for item_id in candidate_ids if item_id not in self.untokenised]

    def allowed(self, candidate_ids: list[str]) -> list[int] | None:
        if self.untokenised & set(candidate_ids):
            return None
        return [100 + n for n in range(len(candidate_ids))]


class ItemTokenEngine(FakeEngine):
    """A fake engine whose model has one token per item, answering with first-pick scores."""

    def __init__(self, first: dict[str, float], untokenised: frozenset[str] = frozenset()):
        super().__init__(lambda request: answer("p1", "p2", "p3"))
        self.first = first
        self.items = OneTokenItems(untokenised)

    async def generate(self, request: GenerationRequest) -> Generation:
        result = await super().generate(request)
        return generation(result.text, self.first)


def test_a_single_token_model_is_constrained_and_served_by_its_first_pick(
    shop: TestClient,
) -> None:
    engine = ItemTokenEngine({"#p3": -0.1, "#n1": -0.3, "#p1": -0.5})
    use(shop, engine)

    body = recommend(shop, k=3)

    [request] = engine.requests
    assert request.allowed_token_ids == [100 + n for n in range(len(ORDER))]
    assert request.presence_penalty == 2.0  # a repeated id is a repeated token
    assert request.logprobs == len(ORDER)  # every candidate's first-pick score
    assert ids(body) == ["p3", "n1", "p1"]  # not the answer's p1, p2, p3


def test_an_item_added_after_training_leaves_the_others_constrained(shop: TestClient) -> None:
    """n1 has no token in the model: the answer may not spell it, the other candidates keep
    their token restriction and first-pick scores, and n1 stays in the reserve."""
    first = {"#p3": -0.1, "#p1": -0.5, "#p2": -0.7, "#p4": -0.9, "#n2": -1.0}
    engine = ItemTokenEngine(first, untokenised=frozenset({"n1"}))
    use(shop, engine)

    body = recommend(shop, k=len(ORDER))

    [request] = engine.requests
    named = [item_id for item_id in ORDER if item_id != "n1"]
    assert "n1" in shown(request.prompt)
    assert request.regex == answer_pattern(named, len(ORDER), SPARE_IDS)
    assert request.allowed_token_ids == [100 + n for n in range(len(named))]
    assert request.logprobs == len(named)
    assert ids(body) == ["p3", "p1", "p2", "p4", "n2", "n1"]
    assert body["source"] == "llm"


def test_a_model_without_item_tokens_asks_for_no_logprobs(shop: TestClient) -> None:
    engine = FakeEngine(answer("p2", "p1"))
    use(shop, engine)

    assert ids(recommend(shop, k=2)) == ["p2", "p1"]
    [request] = engine.requests
    assert request.allowed_token_ids is None and request.logprobs is None
    # Its ids are digits that other ids and the rationale share: no penalty on repeated tokens.
    assert request.presence_penalty == 0.0
