"""POST /v1/search against the real vLLM engine serving the tiny model trained for every task:
the model writes the query under the search grammar, the retriever ranks with it."""

import pytest

from contract.prompt import Rendering
from contract.search import QUERY_CHARS, THINK_CHARS
from tests.server.helpers import metric

pytestmark = pytest.mark.slow


def search(gateway, **body) -> dict:
    response = gateway.post("/v1/search", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def seen(gateway, user: str) -> set[str]:
    return {entry["item_id"] for entry in gateway.get(f"/v1/users/{user}").json()["history"]}


def test_the_model_adds_its_query_to_what_was_typed(gateway, tiny_model) -> None:
    labels = {"source": "llm", "model_version": tiny_model.version}
    before = metric(gateway, "reasonrec_searches_total", **labels)

    body = search(gateway, user_id="u00001", query="drama", k=5, explain=True)

    assert (body["source"], body["degraded"]) == ("llm", False)
    assert body["model_version"] == tiny_model.version and body["typed"] == "drama"
    # the retriever got the typed words, then the model's (well formed: a word at least)
    written = body["query"].removeprefix("drama ")
    assert body["query"].startswith("drama ") and any(c.isalnum() for c in written)
    assert len(written) <= QUERY_CHARS[Rendering.compact]
    assert 0 < len(body["reasoning"]) <= THINK_CHARS[Rendering.compact]
    assert len(body["items"]) <= 5
    assert not {item["item_id"] for item in body["items"]} & seen(gateway, "u00001")
    assert metric(gateway, "reasonrec_searches_total", **labels) == before + 1


def test_with_no_query_the_model_writes_what_comes_next(gateway, tiny_model) -> None:
    body = search(gateway, user_id="u00002")
    assert body["source"] == "llm" and body["typed"] is None and body["reasoning"] is None
    assert any(c.isalnum() for c in body["query"])
    assert not {item["item_id"] for item in body["items"]} & seen(gateway, "u00002")


def test_without_a_user_the_model_still_writes_from_the_query(gateway) -> None:
    body = search(gateway, query="comedy")
    assert body["source"] == "llm" and body["query"].startswith("comedy")


def test_the_version_records_the_search_validation_of_the_published_stage(tiny_model) -> None:
    metrics = tiny_model.metrics
    published = "search_grpo_ndcg@10" if metrics["search_grpo_kept"] else "search_sft_ndcg@10"
    assert metrics["search_ndcg@10"] == metrics[published]
    assert metrics["search_validation_users"] > 0 and "search_raw_ndcg@10" in metrics
