"""POST /v1/rate against the real vLLM engine serving the tiny model trained for every task."""

import pytest

from contract.prompt import Rendering
from contract.rating import STEP_CHARS
from tests.server.helpers import metric

pytestmark = pytest.mark.slow


def rate(gateway, **body):
    return gateway.post("/v1/rate", json=body)


def test_the_active_model_lists_every_task(gateway, tiny_model) -> None:
    versions = gateway.get("/v1/models").json()["versions"]
    [version] = [v for v in versions if v["version"] == tiny_model.version]
    assert sorted(version["tasks"]) == ["rank", "rate", "search"]
    assert {"rate_rmse", "rate_baseline_rmse"} <= set(version["metrics"])


def test_the_model_rates_every_item_and_explains(gateway, tiny_model) -> None:
    before = metric(gateway, "reasonrec_ratings_total", source="llm")
    items = [f"i{n:05d}" for n in range(5)]

    response = rate(gateway, user_id="u00001", item_ids=items, explain=True)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == tiny_model.version
    assert body["source"] == "llm" and body["degraded"] is False
    assert [item["item_id"] for item in body["items"]] == items
    for item in body["items"]:
        assert item["source"] == "llm"
        assert 1 <= item["rating"] <= 5
        reasoning = item["reasoning"]
        # the grammar's steps: non-empty, capped, no tag characters
        assert set(reasoning) == {"user", "item", "match"}
        for step in reasoning.values():
            assert 0 < len(step) <= STEP_CHARS[Rendering.compact] and not {"<", ">"} & set(step)
    assert metric(gateway, "reasonrec_ratings_total", source="llm") == before + 5


def test_ratings_differ_across_users_and_items(gateway) -> None:
    # the expected rating under the model's distribution, not a constant
    ratings = {
        item["rating"]
        for user in ("u00002", "u00003")
        for item in rate(gateway, user_id=user, item_ids=["i00010", "i00011"]).json()["items"]
    }
    assert len(ratings) > 1


def test_a_cold_start_user_is_answered_by_the_model(gateway) -> None:
    body = rate(gateway, user_id="nobody-yet", item_ids=["i00000"]).json()
    assert body["items"][0]["source"] == "llm" and 1 <= body["items"][0]["rating"] <= 5


def test_unknown_items_are_422(gateway) -> None:
    response = rate(gateway, user_id="u00001", item_ids=["i00000", "no-such-item"])
    assert response.status_code == 422
    [detail] = response.json()["error"]["details"]
    assert detail["loc"] == ["body", "item_ids", 1] and detail["type"] == "unknown_item"
