import asyncio
import math
import random

import numpy as np
import pytest

from contract.search import RetrieverKind
from server import metrics
from server.loaders import id_order
from server.schemas import ItemIn, RecommendedItem, RecommendRequest, RecommendResponse, Source
from server.search_index import build_search_index
from trainer.evaluation.harness import evaluate
from trainer.evaluation.pipeline import PipelineSystem, recommending
from trainer.evaluation.split import Interaction, Split, build_split
from trainer.evaluation.systems import ItemKNN, Popularity, TitleQuery, cosine_similarity


def split_of(sequences: dict[str, list[str]], items: int = 6) -> Split:
    """A split from per-user item sequences in time order; catalog items "1".."items"."""
    rows = [Interaction(u, item, t) for u, seq in sequences.items() for t, item in enumerate(seq)]
    return build_split("tiny", rows, {str(i): frozenset() for i in range(1, items + 1)})


# training: A has 1, 5; B has 3, 6; T has 3, 1 (its validation item is 2, its test item 4).
# popularity: 1 -> 2, 3 -> 2, 5 -> 1, 6 -> 1, 2 and 4 -> 0
SEQUENCES = {
    "A": ["1", "5", "2", "4"],
    "B": ["3", "6", "2", "1"],
    "T": ["3", "1", "2", "4"],
}


class TestPopularity:
    @pytest.mark.parametrize(
        ("user", "k", "expected"),
        [
            # A saw 1, 5 (training) and 2 (validation): 3 leads; 6 before 4 (1 vs 0 interactions)
            ("A", 3, ["3", "6", "4"]),
            # T saw 3, 1, 2: then 5 and 6 tie on 1 interaction, id order; test item 4 is ranked
            ("T", 10, ["5", "6", "4"]),
            # a user the split does not know has seen nothing: 1 and 3 tie, id order
            ("nobody", 2, ["1", "3"]),
        ],
    )
    def test_ranks_by_training_count_then_id(self, user: str, k: int, expected: list[str]) -> None:
        system = Popularity()
        system.fit(split_of(SEQUENCES))
        assert system.recommend(user, k) == expected

    def test_ids_order_as_integers(self) -> None:
        # u saw 1 and 3; the rest tie on 0 training interactions: "2" before "10" though "10" < "2"
        split = split_of({"u": ["1", "3", "4"]}, items=10)
        system = Popularity()
        system.fit(split)
        assert system.recommend("u", 10) == ["2", "4", "5", "6", "7", "8", "9", "10"]


class TestCosine:
    def test_matches_the_definition(self) -> None:
        # users x items; item sets: 0 {u0, u1}, 1 {u0, u1, u2}, 2 {u0, u2}, 3 {} (never used)
        matrix = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [0, 1, 1, 0]], dtype=np.float32)
        sim = cosine_similarity(matrix)
        expected = np.array(
            [
                [0, 2 / math.sqrt(6), 1 / 2, 0],
                [2 / math.sqrt(6), 0, 2 / math.sqrt(6), 0],
                [1 / 2, 2 / math.sqrt(6), 0, 0],
                [0, 0, 0, 0],
            ]
        )
        np.testing.assert_allclose(sim, expected)

    def test_ratings_count_as_binary_interactions(self) -> None:
        graded = np.array([[5, 1], [2, 0]], dtype=np.float32)
        np.testing.assert_allclose(cosine_similarity(graded), cosine_similarity(graded > 0))


# training: A 1, 3, 7; B 1, 4, 8; C 3, 4, 2; T 3, 6 (T's validation item 4, test item 8).
# cosine: sim(3,1) = 1/sqrt(6), sim(3,7) = sim(3,2) = 1/sqrt(3), sim(4,1) = 1/2,
# sim(4,8) = sim(4,2) = 1/sqrt(2), 6 co-occurs with nothing T has not seen.
# popularity: 3 -> 3; 1, 4 -> 2; 2, 6, 7, 8 -> 1; 5 -> 0
KNN_SEQUENCES = {
    "A": ["1", "3", "7", "4", "8"],
    "B": ["1", "4", "8", "3", "5"],
    "C": ["3", "4", "2", "5", "8"],
    "T": ["3", "6", "4", "8"],
}


class TestItemKNN:
    @pytest.mark.parametrize(
        ("system", "expected"),
        [
            # seeds 3, 6, 4 (training + validation): 2 = 0.58 + 0.71, 1 = 0.41 + 0.5, 8 = 0.71
            (ItemKNN(), ["2", "1", "8"]),
            # seed 4 only: 2 and 8 tie at 0.71 and on popularity, id order; then 1 = 0.5
            (ItemKNN(history=1), ["2", "8", "1"]),
            # training seeds 3, 6: 2 and 7 tie at 0.58 and on popularity, id order; 1 = 0.41
            (ItemKNN(include_validation=False), ["2", "7", "1"]),
            # seed 6 only scores nothing: popularity (1), then id order among 2, 7, 8
            (ItemKNN(history=1, include_validation=False), ["1", "2", "7"]),
        ],
        ids=["default", "last-1", "train-only", "last-train-1"],
    )
    def test_scores_from_the_last_items(self, system: ItemKNN, expected: list[str]) -> None:
        system.fit(split_of(KNN_SEQUENCES, items=8))
        assert system.recommend("T", 3) == expected

    def test_refuses_an_empty_history_window(self) -> None:
        with pytest.raises(ValueError, match="history"):
            ItemKNN(history=0)

    @pytest.mark.parametrize(("history", "include_validation"), [(20, True), (2, True), (3, False)])
    def test_agrees_with_a_plain_python_reference(
        self, history: int, include_validation: bool
    ) -> None:
        rng = random.Random(5)
        catalog = [str(i) for i in range(1, 16)]
        sequences = {str(u): rng.sample(catalog, rng.randint(3, 9)) for u in range(30)}
        split = split_of(sequences, items=15)
        system = ItemKNN(history=history, include_validation=include_validation)
        system.fit(split)
        for user in split.users:
            known = split.history(user) if include_validation else split.train[user]
            expected = reference_knn(split, known[-history:], split.seen(user), 5)
            assert system.recommend(user, 5) == expected, user


def reference_knn(split: Split, seeds: tuple[str, ...], seen: frozenset, k: int) -> list[str]:
    """EVAL.md's item-kNN written out with sets: cosine of training user sets, summed."""
    holders: dict[str, set[str]] = {item: set() for item in split.catalog}
    for user, items in split.train.items():
        for item in items:
            holders[item].add(user)

    def cosine(a: str, b: str) -> float:
        if a == b or not holders[a] or not holders[b]:
            return 0.0
        return len(holders[a] & holders[b]) / math.sqrt(len(holders[a]) * len(holders[b]))

    scores = {item: sum(cosine(seed, item) for seed in seeds) for item in split.catalog}
    ranked = sorted(
        (item for item in split.catalog if item not in seen),
        # rounding removes summation-order noise so that exact ties fall to the tie-breakers
        key=lambda item: (-round(scores[item], 9), -split.popularity[item], id_order(item)),
    )
    return ranked[:k]


# T's last item (validation) is 2, "Star Wars": BM25 finds 4 and 6, which share a word.
TITLES = {
    "1": "Fargo",
    "2": "Star Wars",
    "3": "Heat",
    "4": "Return of the Star Jedi",
    "5": "Babe",
    "6": "Wars of the Roses",
}


class TestTitleQuery:
    def system(self, kind: RetrieverKind = RetrieverKind.bm25) -> TitleQuery:
        items = [(i, ItemIn(title=title)) for i, title in TITLES.items()]
        index = build_search_index(items, kind)
        system = TitleQuery(index, TITLES)
        system.fit(split_of(SEQUENCES))
        return system

    def test_ranks_what_the_last_title_matches_minus_seen_items(self) -> None:
        system = self.system()
        assert system.name == "title query (bm25)"
        ranked = system.recommend("T", 10)
        assert set(ranked) == {"4", "6"}  # 2 itself is seen; the others share no word
        assert system.recommend("B", 10) == ["4"]  # B's last item is 2 too, and B has seen 6
        assert system.recommend("nobody", 10) == []

    def test_k_caps_the_list(self) -> None:
        assert len(self.system().recommend("T", 1)) == 1


@pytest.mark.parametrize("task", ["rank", "search"])
def test_a_pipeline_counts_the_answers_its_path_repaired(task: str) -> None:
    async def serve(engine: object, user: str, k: int) -> tuple[list[str], float, bool]:
        if user == "u2":  # one answer of three needed repair, on this path's task
            metrics.PARSE_FAILURES.labels(task).inc()
        return ["a"], 1.0, False

    metrics.PARSE_FAILURES.labels("rate").inc()  # before this system served: not its own
    with asyncio.Runner() as runner:
        system = PipelineSystem("reasonrec", serve, runner)
        system.prepare(["u1", "u2", "u3"], 10)
    assert system.repairs == 1


class Answering:
    """A recommender that answers `u2` in fallback (its engine failed) and the others with it."""

    async def recommend(
        self, request: RecommendRequest, request_id: str, engine: object, index: object
    ) -> RecommendResponse:
        return RecommendResponse(
            request_id=request_id,
            user_id=request.user_id,
            model_version="v1",
            items=[RecommendedItem(item_id="a", rank=1, score=1.0, title="A", categories=[])],
            rationale=None,
            source=Source.fallback if request.user_id == "u2" else Source.llm,
            degraded=request.user_id == "u2",
            latency_ms=1.0,
        )


def test_the_report_says_how_many_answers_fell_back() -> None:
    split = build_split(
        "tiny",
        [Interaction(u, item, t) for u in ("u1", "u2") for t, item in enumerate("bca")],
        {item: frozenset() for item in "abc"},
    )
    with asyncio.Runner() as runner:
        system = recommending("reasonrec", Answering(), None, runner)  # type: ignore[arg-type]
        report = evaluate(split, [system], split.users, progress=False)
    assert report.systems["reasonrec"]["fallback_rate"] == 0.5
