"""POST /v1/rate, gateway logic only: a fake engine stands in for vLLM (the real one is in
tests/integration/test_rate.py). Storage is the test's real Redis.

The shop: items a, b, c (drama) and d (comedy). Users r1 and r2 rated them; "new" rated nothing.
"""

import logging
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from contract.prompt import Contract, Rendering
from contract.rating import (
    STEP_CHARS,
    STEPS,
    Stats,
    lean_rating,
    rating_pattern,
    render_rating_answer,
    user_lean,
)
from contract.tasks import Task
from server import metrics
from server.engine import EngineError, Generation, GenerationRequest
from tests.server.helpers import assert_error, metric, post_events
from tests.server.test_recommend_logic import FakeEngine, use

RATINGS = {("r1", "a"): 5.0, ("r1", "b"): 4.0, ("r1", "d"): 2.0, ("r2", "a"): 3.0, ("r2", "c"): 1.0}
ANSWER = render_rating_answer(["likes drama", "a drama", "good fit"], 4)
RATED = "reasonrec_ratings_total"
FALLBACKS = "reasonrec_rate_fallbacks_total"
PARSE_FAILURES = "reasonrec_parse_failures_total"


def _rating(user: str, item: str, value: float, ts: str) -> dict[str, Any]:
    return {"user_id": user, "item_id": item, "type": "rating", "value": value, "timestamp": ts}


@pytest.fixture
def rated(client: TestClient) -> TestClient:
    items = [
        {"item_id": i, "title": f"Title {i}", "categories": ["comedy" if i == "d" else "drama"]}
        for i in "abcd"
    ]
    assert client.post("/v1/items", json={"items": items}).status_code == 200
    events = [
        _rating(user, item, value, f"2026-01-0{n + 1}T00:00:00Z")
        for n, ((user, item), value) in enumerate(RATINGS.items())
    ]
    assert post_events(client, *events).status_code == 200
    return client


def rating_model(text: str = ANSWER, **kwargs: Any) -> FakeEngine:
    engine = FakeEngine(text, **kwargs)
    engine.contract = Contract(rendering=Rendering.compact, tasks=frozenset({Task.rate}))
    return engine


def rate(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/rate", json={"user_id": "r1", "item_ids": ["c"], **body})
    assert response.status_code == 200, response.text
    return response.json()


def expected_baseline(user: str, item: str) -> float:
    """The lean baseline by hand, from RATINGS (in time order)."""

    def stats(of: str) -> Stats:
        values = [v for (_, i), v in RATINGS.items() if i == of]
        return Stats.of(sum(values), len(values))

    everyone = Stats.of(sum(RATINGS.values()), len(RATINGS))
    mine = [(v, stats(i)) for (u, i), v in RATINGS.items() if u == user]
    return lean_rating(everyone, stats(item), user_lean(everyone, mine))


def test_no_model_rates_with_the_lean_baseline(rated: TestClient) -> None:
    use(rated, None)
    before = metric(rated, FALLBACKS, reason="no_model")

    body = rate(rated, item_ids=["c", "d"])

    assert [item["item_id"] for item in body["items"]] == ["c", "d"]
    assert [item["rating"] for item in body["items"]] == [
        pytest.approx(expected_baseline("r1", "c"), abs=1e-3),
        pytest.approx(expected_baseline("r1", "d"), abs=1e-3),
    ]
    assert body["source"] == "fallback" and body["degraded"] is True
    assert all(item["source"] == "fallback" for item in body["items"])
    assert metric(rated, FALLBACKS, reason="no_model") == before + 2


def test_the_baseline_moves_with_the_users_ratings(rated: TestClient) -> None:
    use(rated, None)
    # r1 rates above the average, so their prediction for c sits above a cold-start user's
    assert rate(rated)["items"][0]["rating"] > rate(rated, user_id="new")["items"][0]["rating"]


def test_the_baseline_follows_the_latest_ratings_most(rated: TestClient) -> None:
    use(rated, None)
    # "up" and "down" give a and b the same ratings in opposite orders: the newest weighs most
    events = [
        _rating("up", "a", 1.0, "2026-02-01T00:00:00Z"),
        _rating("up", "b", 5.0, "2026-02-02T00:00:00Z"),
        _rating("down", "b", 5.0, "2026-02-01T00:00:00Z"),
        _rating("down", "a", 1.0, "2026-02-02T00:00:00Z"),
    ]
    assert post_events(rated, *events).status_code == 200

    up, down = (rate(rated, user_id=user)["items"][0]["rating"] for user in ("up", "down"))

    assert up > rate(rated, user_id="new")["items"][0]["rating"] > down


def test_the_model_rates_and_explains(rated: TestClient) -> None:
    engine = rating_model()
    use(rated, engine)
    before = metric(rated, RATED, source="llm", model_version="fake-v1")

    body = rate(rated, explain=True)

    [item] = body["items"]
    assert item == {
        "item_id": "c",
        "rating": 4.0,
        "source": "llm",
        "reasoning": {"user": "likes drama", "item": "a drama", "match": "good fit"},
    }
    assert body["source"] == "llm" and body["degraded"] is False
    assert body["model_version"] == "fake-v1"
    [request] = engine.requests
    assert request.regex == rating_pattern(Rendering.compact)
    # the compact prompt: r1's ratings oldest first, their mean and lean, c's mean over r2's
    # rating. The lean by hand: global mean 3.0, item biases a 2/27, b 1/26, d -1/26; residuals
    # 1.926, 0.962, -0.962 weighted 0.5, 0.707, 1 (newest last), over their sum plus 1: +0.21.
    assert request.prompt.splitlines()[1:] == [
        "#a=5, #b=4, #d=2",
        "user mean=3.7 n=3 lean=+0.2",
        "item #c mean=1.0 n=1",
    ]
    assert metric(rated, RATED, source="llm", model_version="fake-v1") == before + 1
    assert rate(rated)["items"][0]["reasoning"] is None  # explain defaults to false


class LogprobEngine(FakeEngine):
    """Answers like the real engine: the tokens and each step's log-probabilities."""

    async def generate(self, request: GenerationRequest) -> Generation:
        self.requests.append(request)
        steps = ["<user>", "x", "</user>", "<item>", "y", "</item>", "<match>", "z", "</match>"]
        tokens = [*steps, "<rat", "ing>", "4", "</rating>"]
        rating_step = {"4": -0.5108, "5": -0.9163}  # p = 0.6 and 0.4
        logprobs = [{token: 0.0} for token in tokens]
        logprobs[tokens.index("4")] = rating_step
        return Generation(
            text="".join(tokens),
            prompt_tokens=10,
            completion_tokens=len(tokens),
            tokens=tokens,
            top_logprobs=logprobs,
        )


def test_the_served_rating_is_the_mean_of_the_models_distribution(rated: TestClient) -> None:
    engine = LogprobEngine()
    engine.contract = Contract(tasks=frozenset({Task.rate}))
    use(rated, engine)

    [item] = rate(rated)["items"]

    assert item["rating"] == pytest.approx(4.4, abs=1e-3)  # 0.6 * 4 + 0.4 * 5, not the written 4
    assert engine.requests[0].logprobs is not None


def test_a_rich_model_gets_a_rich_prompt(rated: TestClient) -> None:
    engine = rating_model()
    engine.contract = Contract(rendering=Rendering.rich, tasks=frozenset({Task.rate}))
    use(rated, engine)

    rate(rated)

    prompt = engine.requests[0].prompt
    # room for the longest answer the grammar admits (the ranking budget, 192, cut it short)
    longest = "".join(f"<{step}>{'x' * STEP_CHARS[Rendering.rich]}</{step}>" for step in STEPS)
    assert engine.requests[0].max_tokens > len(longest + "<rating>4</rating>")
    assert "The user rates: 3.7 on average over 3 ratings." in prompt
    assert "Lately they rate 0.2 above what others give such items." in prompt
    assert "- #a | Title a | drama | rated 5" in prompt
    assert prompt.rstrip().endswith("Others rate it: 1.0 on average over 1 ratings.")


def test_a_model_not_trained_to_rate_is_refused(rated: TestClient) -> None:
    engine = FakeEngine(ANSWER)  # a ranking model's contract
    use(rated, engine)

    response = rated.post("/v1/rate", json={"user_id": "r1", "item_ids": ["c"]})

    error = assert_error(response, 409, "task_unsupported")
    assert "not trained to rate" in error["message"] and "--task rate" in error["message"]
    assert engine.requests == []


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: rating_model(error=EngineError("down")), "engine_error"),
        (lambda: rating_model(delay=1.0), "timeout"),
        (lambda: rating_model("no tags at all"), "malformed"),
    ],
)
def test_an_engine_failure_falls_back_per_item(
    rated: TestClient, make: Any, reason: str, make_client: Any
) -> None:
    client = make_client(llm_timeout_ms=100) if reason == "timeout" else rated
    if client is not rated:
        client.post("/v1/items", json={"items": [{"item_id": "c", "title": "c"}]})
    use(client, make())
    before = metric(client, FALLBACKS, reason=reason)
    failures = metric(client, PARSE_FAILURES, task="rate")

    body = rate(client)

    assert body["items"][0]["source"] == "fallback" and body["degraded"] is True
    assert metric(client, FALLBACKS, reason=reason) == before + 1
    parsed = reason == "malformed"  # an answer came, without a rating: the model's failure
    assert metric(client, PARSE_FAILURES, task="rate") == failures + parsed


def test_a_request_the_engine_fails_on_logs_one_line_not_one_per_item(
    rated: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    use(rated, rating_model(error=EngineError("connection refused")))

    with caplog.at_level(logging.INFO, logger="server"):
        body = rate(rated, item_ids=["a", "b", "c", "d"])

    assert [item["source"] for item in body["items"]] == ["fallback"] * 4
    [line] = [r for r in caplog.records if r.name.startswith("server.rate")]
    assert line.levelname == "WARNING" and line.getMessage() == "items rated by the fallback"
    assert (line.reasons, line.items, line.error) == ({"engine_error": 4}, 4, "connection refused")


def test_a_cold_start_user_is_answered(rated: TestClient) -> None:
    engine = rating_model()
    use(rated, engine)

    body = rate(rated, user_id="nobody")

    assert body["items"][0]["source"] == "llm"
    assert engine.requests[0].prompt.splitlines()[1:3] == ["", "user mean=none n=0 lean=none"]


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"user_id": "r1", "item_ids": []}, ["body", "item_ids"]),
        ({"user_id": "r1", "item_ids": [f"i{n}" for n in range(51)]}, ["body", "item_ids"]),
        ({"user_id": "r1", "item_ids": ["a", "a"]}, ["body", "item_ids"]),
        ({"user_id": "r1", "item_ids": ["a"], "explain": "yes"}, ["body", "explain"]),
        ({"item_ids": ["a"]}, ["body", "user_id"]),
        ({"user_id": "r1", "item_ids": ["a"], "k": 3}, ["body", "k"]),
    ],
)
def test_bad_input_is_422(rated: TestClient, body: dict[str, Any], where: list[Any]) -> None:
    error = assert_error(rated.post("/v1/rate", json=body), 422, "validation_error")
    assert any(detail["loc"][: len(where)] == where for detail in error["details"]), error


def test_a_repeated_item_is_named(rated: TestClient) -> None:
    ids = ["a", "b", "a", "c", "b", "b"]
    error = assert_error(
        rated.post("/v1/rate", json={"user_id": "r1", "item_ids": ids}), 422, "validation_error"
    )
    [detail] = error["details"]
    assert detail["loc"] == ["body", "item_ids"], detail
    assert detail["type"] == "repeated_item", detail
    assert detail["message"] == "item_ids must be distinct: a, b given more than once", detail


def test_unknown_and_deleted_items_are_named_one_by_one(rated: TestClient) -> None:
    use(rated, rating_model())
    assert rated.delete("/v1/items/b").status_code == 204

    response = rated.post("/v1/rate", json={"user_id": "r1", "item_ids": ["a", "zz", "b"]})

    error = assert_error(response, 422, "validation_error")
    assert [(d["loc"], d["type"]) for d in error["details"]] == [
        (["body", "item_ids", 1], "unknown_item"),
        (["body", "item_ids", 2], "unknown_item"),
    ]


def test_store_keeps_each_users_latest_rating_and_every_rating_in_the_sums(
    rated: TestClient,
) -> None:
    # r1 rates a again (1 instead of 5), then an out-of-order older 2 arrives
    post_events(
        rated,
        _rating("r1", "a", 1.0, "2026-02-01T00:00:00Z"),
        _rating("r1", "a", 2.0, "2025-12-01T00:00:00Z"),
    )
    engine = rating_model()
    use(rated, engine)

    rate(rated, item_ids=["a"])

    lines = engine.requests[0].prompt.splitlines()
    assert lines[1] == "#b=4, #d=2, #a=1"  # the latest rating, newest last
    assert lines[2].startswith("user mean=2.3 n=3 lean=-")  # the newest rating is a 1
    assert lines[3] == "item #a mean=2.8 n=4"  # 5, 3, 1, 2: every rating event counts


def test_a_late_older_rating_never_replaces_a_newer_one_trimmed_from_the_prompts(
    make_client: Callable[..., TestClient], rdb, key_prefix: str
) -> None:
    client = make_client(history_size=2)
    items = [{"item_id": i, "title": f"Title {i}"} for i in "abc"]
    assert client.post("/v1/items", json={"items": items}).status_code == 200
    for n, (item, value) in enumerate([("a", 5.0), ("b", 3.0), ("c", 4.0)]):
        post_events(client, _rating("w", item, value, f"2026-01-0{n + 1}T00:00:00Z"))
    assert rdb.zrange(f"{key_prefix}:user:w:rated", 0, -1) == ["b", "c"]  # a trimmed

    post_events(client, _rating("w", "a", 1.0, "2025-12-01T00:00:00Z"))

    assert rdb.hget(f"{key_prefix}:user:w:ratings", "a") == "5.0"
    assert rdb.zrange(f"{key_prefix}:user:w:rated", 0, -1) == ["b", "c"]


def test_ratings_at_one_time_keep_the_order_they_arrived_in(
    client: TestClient, rdb, key_prefix: str
) -> None:
    # The lean baseline weighs the latest ratings most: "latest" among ties is arrival order, as
    # training reads it, not the item ids' order.
    items = [{"item_id": i, "title": f"Title {i}"} for i in "abc"]
    assert client.post("/v1/items", json={"items": items}).status_code == 200
    at = "2026-01-01T00:00:00Z"
    post_events(client, *(_rating("w", item, 4.0, at) for item in "cab"))
    assert rdb.zrange(f"{key_prefix}:user:w:rated", 0, -1) == ["c", "a", "b"]


def test_the_served_rating_mixes_the_model_and_the_baseline_by_the_versions_weight(
    rated: TestClient,
) -> None:
    engine = rating_model()  # writes 4
    engine.contract = engine.contract.model_copy(update={"rating_weight": 0.25})
    use(rated, engine)

    [item] = rate(rated)["items"]

    expected = 0.25 * 4 + 0.75 * expected_baseline("r1", "c")
    assert item["rating"] == pytest.approx(expected, abs=1e-3) and item["source"] == "llm"


def test_the_rate_fallback_series_exist_for_the_reasons_it_falls_back_for() -> None:
    """Each at 0 from the start, so that ratios over them evaluate; none for a reason the route
    never falls back for (a model not trained to rate gets a 409)."""
    (family,) = metrics.RATE_FALLBACKS.collect()
    reasons = {sample.labels["reason"] for sample in family.samples}
    assert reasons == {"no_model", "timeout", "engine_error", "malformed"}
