"""Search (POST /v1/search): the fixed retrievers, the catalog following, filters and bad input.

Every query goes to the retriever as written until a version is trained to rewrite queries, so
these tests hold for any active model; a real Redis backs the store."""

import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from contract.search import RetrieverKind
from server.schemas import ItemIn
from server.search_index import Encoder, build_search_index, item_text
from tests.server.helpers import assert_error, metric, post_events

CATALOG = {
    "toy": ItemIn(title="Toy Story (1995)", categories=["Animation", "Children's", "Comedy"]),
    "heat": ItemIn(
        title="Heat (1995)",
        categories=["Action", "Crime"],
        description="Professional bank robbers and the detective who hunts them",
        attributes={"director": "Michael Mann", "year": 1995, "tags": "heist, los angeles"},
    ),
    "alien": ItemIn(title="Alien (1979)", categories=["Horror", "Sci-Fi"]),
    "babe": ItemIn(title="Babe (1995)", categories=["Children's", "Comedy", "Drama"]),
}


def test_item_text_holds_what_a_query_names() -> None:
    text = item_text(CATALOG["heat"])
    for words in ("Heat (1995)", "Action Crime", "bank robbers", "Michael Mann", "heist"):
        assert words in text
    assert "1995 1995" not in text  # numbers among attributes say nothing a query would


class TestBm25:
    index = build_search_index(sorted(CATALOG.items()), RetrieverKind.bm25)

    def test_ranks_matches_only(self) -> None:
        hits = self.index.search("bank heist", 10)
        assert [item for item, _ in hits] == ["heat"]
        assert self.index.search("zzz unknown words", 10) == []
        assert self.index.search("the of and", 10) == []  # stopwords only

    def test_more_shared_words_rank_higher(self) -> None:
        ids = [item for item, _ in self.index.search("children comedy animation", 10)]
        assert ids == ["toy", "babe"]

    def test_rank_of_agrees_with_search(self) -> None:
        for query in ("children comedy", "1995", "horror"):
            for rank, (item, _) in enumerate(self.index.search(query, 10), start=1):
                assert self.index.rank_of(query, item) == rank
        assert self.index.rank_of("horror", "toy") is None

    def test_version_names_the_texts(self) -> None:
        again = build_search_index(sorted(CATALOG.items()), RetrieverKind.bm25)
        changed = dict(CATALOG) | {"alien": ItemIn(title="Aliens (1986)")}
        other = build_search_index(sorted(changed.items()), RetrieverKind.bm25)
        assert again.version == self.index.version != other.version


@pytest.mark.slow
def test_dense_finds_meaning_without_shared_words() -> None:
    index = build_search_index(sorted(CATALOG.items()), RetrieverKind.dense, Encoder())
    hits = index.search("a cartoon for kids", 4)
    assert hits[0][0] == "toy" and len(hits) == 4  # every item has a dense score
    assert index.search("scary space monster", 1)[0][0] == "alien"
    scores = [score for _, score in hits]
    assert scores == sorted(scores, reverse=True) and np.all(np.abs(scores) <= 1.0001)
    assert index.rank_of("a cartoon for kids", "toy") == 1


def _put_catalog(client: TestClient) -> None:
    items = [{"item_id": i, **item.model_dump(exclude_none=True)} for i, item in CATALOG.items()]
    assert client.post("/v1/items", json={"items": items}).status_code == 200


def _search(client: TestClient, **body) -> dict:
    response = client.post("/v1/search", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _wait_for(client: TestClient, query: str, item: str, seconds: float = 10) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        body = _search(client, query=query)
        if any(hit["item_id"] == item for hit in body["items"]) or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


@pytest.fixture
def searching(make_client) -> TestClient:
    client = make_client(search_refresh_seconds=0.05)
    _put_catalog(client)
    _wait_for(client, "bank heist", "heat")
    return client


def test_search_without_a_model_sends_the_query_as_written(searching: TestClient) -> None:
    before = metric(searching, "reasonrec_search_fallbacks_total", reason="no_model")
    body = _search(searching, query="Bank heist", k=5)
    assert body["query"] == "Bank heist" and body["retriever"] == "bm25"
    assert (body["source"], body["degraded"], body["model_version"]) == ("fallback", True, None)
    assert [(hit["item_id"], hit["rank"], hit["title"]) for hit in body["items"]] == [
        ("heat", 1, "Heat (1995)")
    ]
    assert body["items"][0]["score"] > 0 and body["request_id"]
    assert metric(searching, "reasonrec_search_fallbacks_total", reason="no_model") == before + 1
    assert metric(searching, "reasonrec_searches_total", source="fallback") >= 1


def test_k_caps_the_list(searching: TestClient) -> None:
    assert len(_search(searching, query="1995", k=1)["items"]) == 1
    assert len(_search(searching, query="1995", k=50)["items"]) == 3


def test_new_and_changed_items_are_searchable_without_a_restart(searching: TestClient) -> None:
    put = searching.put("/v1/items/fargo", json={"title": "Fargo (1996)", "categories": ["Crime"]})
    assert put.status_code == 200
    assert _wait_for(searching, "fargo", "fargo")["items"][0]["item_id"] == "fargo"
    searching.put("/v1/items/fargo", json={"title": "Fargo (1996)", "description": "snow"})
    assert _wait_for(searching, "snow", "fargo")["items"][0]["item_id"] == "fargo"
    assert metric(searching, "reasonrec_search_index_items") == len(CATALOG) + 1


def test_hidden_unavailable_and_seen_items_are_left_out(searching: TestClient) -> None:
    assert searching.delete("/v1/items/toy").status_code == 204
    unavailable = CATALOG["babe"].model_dump(exclude_none=True) | {"available": False}
    assert searching.put("/v1/items/babe", json=unavailable).status_code == 200
    assert _search(searching, query="children comedy")["items"] == []
    post_events(searching, {"user_id": "u1", "item_id": "heat", "type": "click"})
    assert _search(searching, query="heist", user_id="u1")["items"] == []
    assert [hit["item_id"] for hit in _search(searching, query="heist")["items"]] == ["heat"]
    shown = _search(searching, query="heist", user_id="u1", exclude_seen=False)["items"]
    assert [hit["item_id"] for hit in shown] == ["heat"]
    assert [hit["item_id"] for hit in _search(searching, query="heist", user_id="u2")["items"]] == [
        "heat"
    ]


def test_the_catalog_is_searchable_from_the_first_request(make_client) -> None:
    _put_catalog(make_client())
    restarted = make_client(search_refresh_seconds=3600)  # no rebuild after the startup one
    assert [hit["item_id"] for hit in _search(restarted, query="heist")["items"]] == ["heat"]


def test_an_empty_catalog_finds_nothing(client: TestClient) -> None:
    assert _search(client, query="anything")["items"] == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"query": ""}, "query"),
        ({"query": "   "}, "query"),
        ({"query": "x" * 501}, "query"),
        ({"query": "ok", "k": 0}, "k"),
        ({"query": "ok", "k": 51}, "k"),
        ({"query": "ok", "user_id": ""}, "user_id"),
        ({"query": "ok", "unknown": 1}, "unknown"),
        ({}, "query"),
    ],
)
def test_bad_input_is_422(client: TestClient, body: dict, field: str) -> None:
    error = assert_error(client.post("/v1/search", json=body), 422, "validation_error")
    assert any(field in detail["loc"] for detail in error["details"]), error
