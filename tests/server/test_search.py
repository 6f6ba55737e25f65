"""Search (POST /v1/search): the fixed retrievers, the catalog following, filters, the model's
query step with a fake engine (the real one: tests/integration/test_search.py) and its fallbacks,
and bad input. A real Redis backs the store."""

import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from contract.candidates import OVERFETCH
from contract.prompt import Contract, Rendering
from contract.search import (
    RetrieverKind,
    render_search_answer,
    search_answer_budget,
    search_pattern,
)
from contract.tasks import Task
from server.engine import EngineError
from server.schemas import ItemIn
from server.search_index import Encoder, build_search_index, item_text
from tests.server.helpers import assert_error, metric, post_events, until
from tests.server.test_recommend_logic import FakeEngine, use

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


CODED = {f"x{n}": CATALOG[name] for n, name in enumerate(["toy", "babe", "alien", "heat"], 1)}


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

    def test_rank_of_leaves_out_what_it_is_told_to(self) -> None:
        query = "children comedy animation"  # Toy Story, then Babe
        assert self.index.rank_of(query, "babe") == 2
        assert self.index.rank_of(query, "babe", exclude={"toy", "nothing"}) == 1
        assert self.index.rank_of(query, "toy", exclude={"babe"}) == 1
        # a target the gateway would leave out earns no reward (it was credited rank 1)
        assert self.index.rank_of(query, "toy", exclude={"toy"}) is None

    def test_a_reference_finds_the_item_it_names(self) -> None:
        # ids that share no word with their items' text: only the reference's reading finds them
        index = build_search_index(sorted(CODED.items()), RetrieverKind.bm25)
        assert index.expand("comedy #x4") == f"comedy {item_text(CATALOG['heat'])}"
        assert index.search("#x4", 10)[0][0] == "x4"
        assert index.rank_of("#x2", "x2") == 1
        assert index.rank_of("#x2", "x1", exclude={"x2"}) == 1  # its fellow comedy
        assert {item for item, _ in index.search("#comedy", 10)} == {"x1", "x2"}  # a word

    def test_version_names_the_texts(self) -> None:
        again = build_search_index(sorted(CATALOG.items()), RetrieverKind.bm25)
        changed = dict(CATALOG) | {"alien": ItemIn(title="Aliens (1986)")}
        other = build_search_index(sorted(changed.items()), RetrieverKind.bm25)
        assert again.version == self.index.version != other.version


@pytest.mark.slow
def test_dense_finds_meaning_without_shared_words() -> None:
    encoder = Encoder()
    index = build_search_index(sorted(CATALOG.items()), RetrieverKind.dense, encoder)
    hits = index.search("a cartoon for kids", 4)
    assert hits[0][0] == "toy" and len(hits) == 4  # every item has a dense score
    assert index.search("scary space monster", 1)[0][0] == "alien"
    coded = build_search_index(sorted(CODED.items()), RetrieverKind.dense, encoder)
    assert coded.search("#x2", 1)[0][0] == "x2" and coded.rank_of("#x2", "x2") == 1
    scores = [score for _, score in hits]
    assert scores == sorted(scores, reverse=True) and np.all(np.abs(scores) <= 1.0001)
    assert index.rank_of("a cartoon for kids", "toy") == 1
    # items of the same text tie: catalog order, as rank_of counts (faiss gave them reversed)
    twins = build_search_index(
        [(f"d{n}", ItemIn(title="Heat")) for n in range(5)], RetrieverKind.dense, encoder
    )
    assert [item for item, _ in twins.search("heat", 5)] == ["d0", "d1", "d2", "d3", "d4"]
    assert [twins.rank_of("heat", f"d{n}") for n in range(5)] == [1, 2, 3, 4, 5]


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


def test_unavailable_matches_ranked_first_do_not_crowd_out_an_available_one(
    make_client,
) -> None:
    client = make_client()
    items = [
        {"item_id": f"gone{n}", "title": "heist heist heist", "available": False}
        for n in range(OVERFETCH + 2)
    ]
    items.append({"item_id": "ok", "title": "heist movie"})
    assert client.post("/v1/items", json={"items": items}).status_code == 200
    assert [hit["item_id"] for hit in _wait_for(client, "heist", "ok")["items"]] == ["ok"]
    assert [hit["item_id"] for hit in _search(client, query="heist", k=1)["items"]] == ["ok"]


def test_the_catalog_is_searchable_from_the_first_request(make_client) -> None:
    _put_catalog(make_client())
    restarted = make_client(search_refresh_seconds=3600)  # no rebuild after the startup one
    assert [hit["item_id"] for hit in _search(restarted, query="heist")["items"]] == ["heat"]


def test_an_empty_catalog_finds_nothing(client: TestClient) -> None:
    assert _search(client, query="anything")["items"] == []


def test_an_empty_catalog_is_not_rebuilt_until_it_changes(make_client) -> None:
    client = make_client(search_refresh_seconds=0.05)
    builds = metric(client, "reasonrec_search_index_build_seconds_count")
    time.sleep(0.5)  # ten checks of an unchanged, empty catalog
    assert metric(client, "reasonrec_search_index_build_seconds_count") == builds
    _put_catalog(client)
    assert until(lambda: _search(client, query="heist")["items"] != [], 5)


def test_a_catalog_without_an_indexable_word_starts_and_finds_nothing(make_client) -> None:
    # One-letter titles and stopwords leave BM25 no vocabulary: bm25s alone raises on it.
    index = build_search_index(
        [("1", ItemIn(title="A")), ("2", ItemIn(title="the"))], RetrieverKind.bm25
    )
    assert index.search("a the", 10) == [] and index.rank_of("anything", "1") is None
    items = [{"item_id": "1", "title": "A"}, {"item_id": "2", "title": "B"}]
    assert make_client().post("/v1/items", json={"items": items}).status_code == 200
    restarted = make_client()  # builds the index from that catalog before it answers
    assert restarted.get("/healthz").status_code == 200
    assert _search(restarted, query="A B")["items"] == []


def test_a_search_index_that_cannot_be_built_leaves_the_gateway_serving(
    make_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    _put_catalog(make_client())

    def broken(*args, **kwargs):
        raise RuntimeError("index build broke")

    monkeypatch.setattr("server.search_index.build_search_index", broken)
    before = metric(make_client(), "reasonrec_search_index_failures_total")
    restarted = make_client(search_refresh_seconds=3600)
    assert _search(restarted, query="heist")["items"] == []
    assert metric(restarted, "reasonrec_search_index_failures_total") > before  # seen
    assert restarted.post("/v1/recommend", json={"user_id": "u1", "k": 2}).status_code == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"query": ""}, "query"),
        ({"query": "   "}, "query"),
        # Nothing the retriever would see: with a user, their last title was searched instead.
        ({"query": "\u200b", "user_id": "u1"}, "query"),
        ({"query": "<>"}, "query"),
        ({"query": "\u3164 \u3000"}, "query"),  # a Hangul filler, an ideographic space
        ({"query": "x" * 501}, "query"),
        ({"query": "ok", "k": 0}, "k"),
        ({"query": "ok", "k": 51}, "k"),
        ({"query": "ok", "user_id": ""}, "user_id"),
        ({"query": "ok", "unknown": 1}, "unknown"),
        ({}, "body"),  # nothing to search for: neither a query nor a user
        ({"user_id": "u1", "query": None, "k": 0}, "k"),
    ],
)
def test_bad_input_is_422(client: TestClient, body: dict, field: str) -> None:
    error = assert_error(client.post("/v1/search", json=body), 422, "validation_error")
    assert any(field in detail["loc"] for detail in error["details"]), error
    assert all(len(detail["message"]) < 200 for detail in error["details"]), error  # no pattern


FALLBACKS = "reasonrec_search_fallbacks_total"
WRITTEN = render_search_answer("#heat they like crime", "bank robbers", Rendering.compact)


def search_model(text: str = WRITTEN, **kwargs) -> FakeEngine:
    engine = FakeEngine(text, **kwargs)
    engine.contract = Contract(
        rendering=Rendering.compact, history=5, tasks=frozenset({Task.rank, Task.search})
    )
    return engine


@pytest.fixture
def watched(searching: TestClient) -> TestClient:
    """u1 watched Alien, then Toy Story."""
    post_events(
        searching,
        {"user_id": "u1", "item_id": "alien", "type": "click", "timestamp": "2026-01-01T00:00:00Z"},
        {"user_id": "u1", "item_id": "toy", "type": "click", "timestamp": "2026-01-02T00:00:00Z"},
    )
    return searching


def test_a_search_model_writes_the_query_from_the_users_history(watched: TestClient) -> None:
    engine = search_model()
    use(watched, engine)

    body = _search(watched, query="1995", user_id="u1", explain=True)

    [request] = engine.requests
    assert request.prompt == "\n#alien, #toy\nsearch 1995\n"
    assert request.regex == search_pattern(Rendering.compact)
    assert request.max_tokens >= search_answer_budget(Rendering.compact)  # above the 192 default
    assert body["typed"] == "1995" and body["query"] == "1995 bank robbers"
    assert (body["source"], body["degraded"], body["model_version"]) == ("llm", False, "fake-v1")
    assert body["reasoning"] == "#heat they like crime"
    assert body["items"][0]["item_id"] == "heat"
    assert "toy" not in [hit["item_id"] for hit in body["items"]]  # seen
    assert metric(watched, "reasonrec_searches_total", source="llm", model_version="fake-v1") == 1
    assert _search(watched, query="1995", user_id="u1")["reasoning"] is None  # not asked for


def test_with_no_query_the_model_says_what_comes_next(watched: TestClient) -> None:
    use(watched, search_model(render_search_answer("r", "a cartoon babe", Rendering.compact)))
    body = _search(watched, user_id="u1")
    assert body["typed"] is None and body["query"] == "a cartoon babe"
    assert [hit["item_id"] for hit in body["items"]] == ["babe"]


def test_with_no_query_and_no_model_the_last_title_is_the_query(watched: TestClient) -> None:
    use(watched, None)
    body = _search(watched, user_id="u1")
    assert body["query"] == "Toy Story (1995)" and body["source"] == "fallback"
    assert {hit["item_id"] for hit in body["items"]} == {"heat", "babe"}  # 1995; Toy Story seen
    assert _search(watched, user_id="nobody")["items"] == []  # no history: nothing to go on


@pytest.mark.parametrize(
    ("engine", "reason"),
    [
        (lambda: search_model("<think>x</think><answer>", delay=0.0), "malformed"),
        (lambda: search_model(error=EngineError("engine answered 503")), "engine_error"),
        (lambda: search_model(delay=5.0), "timeout"),
        (lambda: FakeEngine(WRITTEN), "task_unsupported"),  # a version not trained to search
    ],
)
def test_the_typed_query_goes_as_written_when_the_model_cannot_help(
    make_client, engine, reason: str
) -> None:
    client = make_client(search_refresh_seconds=0.05, llm_timeout_ms=200)
    _put_catalog(client)
    _wait_for(client, "bank heist", "heat")
    use(client, engine())
    before = metric(client, FALLBACKS, reason=reason)
    failures = metric(client, "reasonrec_parse_failures_total", task="search")

    body = _search(client, query="Bank heist", user_id="u9")

    assert (body["query"], body["source"], body["degraded"]) == ("Bank heist", "fallback", True)
    assert [hit["item_id"] for hit in body["items"]] == ["heat"]
    assert metric(client, FALLBACKS, reason=reason) == before + 1
    parsed = reason == "malformed"
    assert metric(client, "reasonrec_parse_failures_total", task="search") == failures + parsed
