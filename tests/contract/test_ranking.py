"""The one first-k rule behind served lists, SFT targets and rewards (contract.ranking)."""

import doctest

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contract import ranking
from contract.answer import Answer
from contract.ranking import Blend, first_k, repair, served_order, target_items

CANDIDATES = ["a", "b", "c", "d"]
ids = st.sampled_from(["a", "b", "c", "d", "e", "x", "y"])
answers = st.builds(
    Answer,
    rationale=st.just(""),
    items=st.lists(ids, max_size=8).map(tuple),
    well_formed=st.booleans(),
)


def test_docstring_examples_hold() -> None:
    assert doctest.testmod(ranking).failed == 0


class TestFirstK:
    @pytest.mark.parametrize(
        ("items", "k", "expected"),
        [
            # nothing written: nothing ranked
            ((), 3, []),
            # the answer's order is kept, cut at k
            (("c", "a", "b"), 2, ["c", "a"]),
            # duplicates are dropped and do not use up a slot
            (("a", "a", "b"), 2, ["a", "b"]),
            # non-candidates are dropped and do not use up a slot
            (("x", "b", "y", "c"), 2, ["b", "c"]),
            # fewer valid ids than k: all of them
            (("b",), 3, ["b"]),
        ],
    )
    def test_cases(self, items: tuple[str, ...], k: int, expected: list[str]) -> None:
        assert first_k(items, CANDIDATES, k) == expected

    @given(answers, st.lists(ids, max_size=6), st.integers(1, 5))
    def test_distinct_candidates_in_answer_order(
        self, answer: Answer, candidates: list[str], k: int
    ) -> None:
        out = first_k(answer.items, candidates, k)
        assert len(out) == len(set(out)) <= k
        assert set(out) <= set(candidates)
        positions = [answer.items.index(item) for item in out]
        assert positions == sorted(positions)


RETRIEVAL = ["a", "b", "c", "d"]


@pytest.mark.parametrize(
    ("items", "well_formed", "k", "expected", "repaired"),
    [
        # A clean answer of k ids: kept as is.
        (("c", "a"), True, 2, ["c", "a"], False),
        # More than k: the first k, not a repair.
        (("d", "c", "b"), True, 2, ["d", "c"], False),
        # Duplicates dropped and backfilled in retrieval order.
        (("c", "c"), True, 2, ["c", "a"], True),
        # Non-candidates dropped and backfilled.
        (("zz", "b"), True, 2, ["b", "a"], True),
        # Malformed, even with usable ids: the ids are used, the answer counts as repaired.
        (("d", "c"), False, 2, ["d", "c"], True),
        # Nothing usable: the retrieval order.
        ((), False, 3, ["a", "b", "c"], True),
        # k above the candidates: every candidate once; complete, so not a repair.
        (("b", "d", "a", "c"), True, 10, ["b", "d", "a", "c"], False),
        # k above the candidates and too few named: backfilled with the rest.
        (("d",), True, 10, ["d", "a", "b", "c"], True),
        # A duplicate beyond the first k distinct ones does not matter.
        (("a", "b", "a"), True, 2, ["a", "b"], False),
    ],
)
def test_repair(
    items: tuple[str, ...], well_formed: bool, k: int, expected: list[str], repaired: bool
) -> None:
    got = repair(Answer(rationale="", items=items, well_formed=well_formed), RETRIEVAL, k)
    assert got == (expected, repaired)


def test_repair_with_no_candidates() -> None:
    assert repair(Answer(rationale="", items=("a",), well_formed=True), [], 3) == ([], False)


@pytest.mark.parametrize(
    ("answer_items", "well_formed", "scores", "served", "repaired"),
    [
        # enough scores from a well-formed answer: they order the list
        (("p3", "p1"), True, {"p2": -0.1, "p1": -1.0, "p3": -2.0}, ["p2", "p1"], False),
        # too few scores: the answer's own ids, repaired as before
        (("p3", "p3"), True, {"p2": -0.1}, ["p3", "p1"], True),
        # a malformed answer is repaired whatever the scores
        ((), False, {"p2": -0.1, "p1": -1.0}, ["p1", "p2"], True),
    ],
)
def test_served_order(
    answer_items: tuple[str, ...],
    well_formed: bool,
    scores: dict[str, float],
    served: list[str],
    repaired: bool,
) -> None:
    answer = Answer(rationale="r", items=answer_items, well_formed=well_formed)

    assert served_order(answer, scores, ["p1", "p2", "p3"], 2) == (served, repaired)


@pytest.mark.parametrize(
    ("prior", "served"),
    [
        (0.0, ["p3", "p2", "p1"]),  # the model alone
        # p3 loses log(3) = 1.10 to p1, p2 loses log(2) = 0.69: p2 (-0.31) > p1 (-0.5) > p3
        (1.0, ["p2", "p1", "p3"]),
        (100.0, ["p1", "p2", "p3"]),  # the retrieval order
    ],
)
def test_a_retrieval_prior_leans_the_served_order_on_retrieval(
    prior: float, served: list[str]
) -> None:
    answer = Answer(rationale="r", items=("p1",), well_formed=True)
    scores = {"p1": -0.5, "p2": 0.38, "p3": 0.4}

    blend = Blend(retrieval_prior=prior)

    assert served_order(answer, scores, ["p1", "p2", "p3"], 3, blend) == (served, False)


@pytest.mark.parametrize(
    ("penalty", "served"),
    [
        (0.0, ["hit", "mid", "niche"]),  # the model alone
        # hit loses 1.0, mid 0.25, niche 0: mid (-0.45) > hit (-0.5) > niche (-0.6)
        (1.0, ["mid", "hit", "niche"]),
        (10.0, ["niche", "mid", "hit"]),  # popularity taken back entirely
    ],
)
def test_a_popularity_penalty_takes_back_what_many_chose(penalty: float, served: list[str]) -> None:
    answer = Answer(rationale="r", items=("hit",), well_formed=True)
    scores = {"hit": 0.5, "mid": -0.2, "niche": -0.6}
    popularity = {"hit": 1.0, "mid": 0.25, "niche": 0.0}
    blend = Blend(popularity_penalty=penalty)

    got = served_order(answer, scores, ["hit", "mid", "niche"], 3, blend, popularity)

    assert got == (served, False)


def test_an_item_of_unknown_popularity_counts_as_never_chosen() -> None:
    answer = Answer(rationale="r", items=("a",), well_formed=True)
    blend = Blend(popularity_penalty=1.0)

    got = served_order(answer, {"a": 0.0, "new": -0.5}, ["a", "new"], 2, blend, {"a": 1.0})

    assert got == (["new", "a"], False)


class TestTargetItems:
    @pytest.mark.parametrize(
        ("candidates", "positives", "k", "expected"),
        [
            # positives first, in the order they happened, then the retrieval order
            (["a", "b", "c", "d"], ["c", "a"], 3, ["c", "a", "b"]),
            # a positive that is not a candidate cannot be named
            (["a", "b", "c"], ["z", "b"], 2, ["b", "a"]),
            # more positives than k: the earliest ones
            (["a", "b", "c"], ["c", "b", "a"], 2, ["c", "b"]),
            # no positives: the retrieval order
            (["a", "b", "c"], [], 2, ["a", "b"]),
            # a repeated positive counts once
            (["a", "b", "c"], ["b", "b"], 2, ["b", "a"]),
            # k larger than the candidates: all of them, once
            (["a", "b"], ["b"], 5, ["b", "a"]),
        ],
    )
    def test_order(
        self, candidates: list[str], positives: list[str], k: int, expected: list[str]
    ) -> None:
        assert target_items(candidates, positives, k) == expected
