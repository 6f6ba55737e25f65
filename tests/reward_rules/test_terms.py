import doctest
import math
import pickle
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reward_rules import answer as answer_module
from reward_rules import terms as terms_module
from reward_rules.answer import Answer, ranked
from reward_rules.terms import (
    TERMS,
    Accuracy,
    Diversity,
    Format,
    Novelty,
    weighted_sum,
)

CANDIDATES = ["a", "b", "c", "d"]
CATEGORIES = {"a": ["Drama"], "b": ["Drama"], "c": ["Comedy"], "d": ["Drama", "Comedy"]}
COUNTS = {"a": 8, "b": 4, "c": 2, "d": 1, "z": 1}  # total 16: log2(16) = 4 bits at most
LOG3 = math.log2(3)

ids = st.sampled_from(["a", "b", "c", "d", "e", "x", "y"])
answers = st.builds(
    Answer,
    rationale=st.text(max_size=5),
    items=st.lists(ids, max_size=8).map(tuple),
    well_formed=st.booleans(),
)
examples = st.fixed_dictionaries(
    {
        "candidates": st.lists(ids, max_size=6, unique=True),
        "positives": st.lists(ids, max_size=3),
        "k": st.integers(1, 5),
    }
)


def ok(*items: str) -> Answer:
    return Answer(rationale="because", items=items, well_formed=True)


def bad(*items: str) -> Answer:
    return Answer(rationale="", items=items, well_formed=False)


def example(k: int = 2, positives: tuple[str, ...] = ("a",), **extra: Any) -> dict[str, Any]:
    return {"candidates": CANDIDATES, "positives": list(positives), "k": k, **extra}


def test_docstring_examples_hold() -> None:
    assert doctest.testmod(terms_module).failed == 0
    assert doctest.testmod(answer_module).failed == 0


class TestRanked:
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
        assert ranked(ok(*items), CANDIDATES, k) == expected

    @given(answers, st.lists(ids, max_size=6), st.integers(1, 5))
    def test_distinct_candidates_in_answer_order(
        self, answer: Answer, candidates: list[str], k: int
    ) -> None:
        out = ranked(answer, candidates, k)
        assert len(out) == len(set(out)) <= k
        assert set(out) <= set(candidates)
        positions = [answer.items.index(item) for item in out]
        assert positions == sorted(positions)


class TestFormat:
    @pytest.mark.parametrize(
        ("answer", "ex", "expected"),
        [
            # malformed completion: 0 whatever it names
            (bad("a", "b"), example(), 0.0),
            # well formed but names nothing: no valid id, 0
            (ok(), example(), 0.0),
            # exactly k distinct candidates: 1
            (ok("a", "b"), example(), 1.0),
            # half of k: 1/2
            (ok("a"), example(), 0.5),
            # a duplicate inside the first k: 1 valid, 1 extra -> 1 / (2 + 1)
            (ok("a", "a"), example(), 1 / 3),
            # a non-candidate: 1 valid, 1 extra -> 1 / 3
            (ok("a", "x"), example(), 1 / 3),
            # k valid ids plus one more than asked for: 2 / (2 + 1)
            (ok("a", "b", "c"), example(), 2 / 3),
            # fewer candidates than k: naming all of them is perfect
            (ok("a", "b", "c", "d"), example(k=6), 1.0),
            # no candidates, nothing written: nothing was asked, nothing wrong
            (ok(), {"candidates": [], "k": 3}, 1.0),
            # extra columns (and missing positives) are ignored
            (ok("a", "b"), {"candidates": CANDIDATES, "k": 2, "user": "u1", "prompt": "…"}, 1.0),
        ],
    )
    def test_cases(self, answer: Answer, ex: dict[str, Any], expected: float) -> None:
        assert Format()(answer, ex) == pytest.approx(expected)

    @given(answers, examples)
    def test_lies_in_unit_interval(self, answer: Answer, ex: dict[str, Any]) -> None:
        assert 0.0 <= Format()(answer, ex) <= 1.0

    @given(answers, examples)
    def test_is_one_only_for_an_exact_answer(self, answer: Answer, ex: dict[str, Any]) -> None:
        target = min(ex["k"], len(ex["candidates"]))
        exact = (
            answer.well_formed
            and len(answer.items) == target
            and len(set(answer.items)) == target
            and set(answer.items) <= set(ex["candidates"])
        )
        assert (Format()(answer, ex) == 1.0) == exact

    @given(st.lists(st.sampled_from(CANDIDATES), unique=True, max_size=3))
    def test_grows_with_each_valid_id(self, items: list[str]) -> None:
        rest = [item for item in CANDIDATES if item not in items]
        ex = example(k=4)
        assert Format()(ok(*items, rest[0]), ex) > Format()(ok(*items), ex)


class TestAccuracy:
    @pytest.mark.parametrize(
        ("answer", "ex", "expected"),
        [
            # no positives: does not apply
            (ok("a", "b"), example(positives=()), None),
            # positives that are not candidates cannot be ranked: does not apply
            (ok("a", "b"), example(positives=("zz",)), None),
            # the positive first: 1
            (ok("a", "b"), example(), 1.0),
            # the positive second: 1 / log2(3)
            (ok("b", "a"), example(), 1 / LOG3),
            # the positive past k: 0
            (ok("b", "c", "a"), example(), 0.0),
            # malformed completion: 0, its content is not trusted
            (bad("a", "b"), example(), 0.0),
            # a duplicate or non-candidate before the positive does not push it down
            (ok("x", "b", "b", "a"), example(), 1 / LOG3),
            # a positive outside the candidates is left out of the ideal list
            (ok("a", "b"), example(positives=("a", "zz")), 1.0),
            # extra columns are ignored
            (ok("a"), example(k=1, user="u1", history=["q"]), 1.0),
        ],
    )
    def test_cases(self, answer: Answer, ex: dict[str, Any], expected: float | None) -> None:
        assert Accuracy()(answer, ex) == pytest.approx(expected)

    @given(answers, examples)
    def test_lies_in_unit_interval(self, answer: Answer, ex: dict[str, Any]) -> None:
        value = Accuracy()(answer, ex)
        assert value is None or 0.0 <= value <= 1.0 + 1e-12
        assert (value is None) == (not set(ex["positives"]) & set(ex["candidates"]))


class TestDiversity:
    @pytest.mark.parametrize(
        ("answer", "ex", "expected"),
        [
            # k = 1: a single item cannot be diverse, does not apply
            (ok("a"), example(k=1), None),
            # nothing ranked: 0
            (ok(), example(), 0.0),
            # one ranked item: no pairs, 0
            (ok("a", "x"), example(), 0.0),
            # two dramas: 0
            (ok("a", "b"), example(), 0.0),
            # drama and comedy: 1
            (ok("a", "c"), example(), 1.0),
            # drama against drama+comedy: 1/2
            (ok("a", "d"), example(), 0.5),
            # malformed completion: 0
            (bad("a", "c"), example(), 0.0),
            # only the first k ranked items count (c is third)
            (ok("a", "b", "c"), example(), 0.0),
            # an item without known categories: nothing shared with a drama, 1
            (ok("a", "e"), {"candidates": ["a", "e"], "k": 2}, 1.0),
            # extra columns are ignored
            (ok("a", "c"), example(user="u1"), 1.0),
        ],
    )
    def test_cases(self, answer: Answer, ex: dict[str, Any], expected: float | None) -> None:
        assert Diversity(CATEGORIES)(answer, ex) == pytest.approx(expected)

    @given(answers, examples)
    def test_lies_in_unit_interval(self, answer: Answer, ex: dict[str, Any]) -> None:
        value = Diversity(CATEGORIES)(answer, ex)
        assert value is None or 0.0 <= value <= 1.0


class TestNovelty:
    @pytest.mark.parametrize(
        ("answer", "ex", "expected"),
        [
            # nothing ranked: 0
            (ok(), example(), 0.0),
            # the most popular item (share 1/2): 1 bit of 4
            (ok("a"), example(k=1), 0.25),
            # a seen-once item: the maximum, 1
            (ok("d"), example(k=1), 1.0),
            # the mean over the ranked items: (1 + 2) / 2 bits of 4
            (ok("a", "b"), example(), 0.375),
            # an item never seen in training counts as seen once: 1
            (ok("e"), {"candidates": ["e"], "k": 1}, 1.0),
            # malformed completion: 0
            (bad("d"), example(k=1), 0.0),
            # non-candidates and duplicates are not scored
            (ok("x", "d", "d"), example(k=1), 1.0),
            # extra columns are ignored
            (ok("d"), example(k=1, user="u1"), 1.0),
        ],
    )
    def test_cases(self, answer: Answer, ex: dict[str, Any], expected: float) -> None:
        assert Novelty(COUNTS)(answer, ex) == pytest.approx(expected)

    def test_no_training_data_gives_zero(self) -> None:
        # total 0 (or 1): every item is equally popular, nothing to normalise by
        assert Novelty({})(ok("a"), example(k=1)) == 0.0
        assert Novelty({"a": 1})(ok("a"), example(k=1)) == 0.0

    @given(answers, examples, st.dictionaries(ids, st.integers(0, 50)))
    def test_lies_in_unit_interval(
        self, answer: Answer, ex: dict[str, Any], counts: dict[str, int]
    ) -> None:
        assert 0.0 <= Novelty(counts)(answer, ex) <= 1.0 + 1e-12


class TestRegistryAndSum:
    def test_registry_names_every_term_by_its_name(self) -> None:
        expected = {"format": Format, "accuracy": Accuracy, "diversity": Diversity}
        assert expected | {"novelty": Novelty} == TERMS
        assert all(cls.name == name for name, cls in TERMS.items())

    @pytest.mark.parametrize(
        "term", [Format(), Accuracy(), Diversity(CATEGORIES), Novelty(COUNTS)], ids=str
    )
    def test_terms_survive_pickling(self, term: Any) -> None:
        # GRPO workers receive the terms pickled; the copy must score like the original
        copy = pickle.loads(pickle.dumps(term))
        ex = example(positives=("b",))
        assert copy(ok("a", "b"), ex) == term(ok("a", "b"), ex)

    @pytest.mark.parametrize(
        ("ex", "expected"),
        [
            # every term applies: 0.5 * 1 + 2 * (1 / log2 3)
            (example(positives=("b",)), 0.5 + 2 / LOG3),
            # accuracy does not apply (no positives): format alone
            (example(positives=()), 0.5),
        ],
    )
    def test_weighted_sum_skips_terms_that_do_not_apply(
        self, ex: dict[str, Any], expected: float
    ) -> None:
        value = weighted_sum([(Format(), 0.5), (Accuracy(), 2.0)], ok("a", "b"), ex)
        assert value == pytest.approx(expected)

    def test_weighted_sum_of_nothing_is_zero(self) -> None:
        assert weighted_sum([], ok("a"), example()) == 0.0
