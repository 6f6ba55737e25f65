import doctest
import math
import pickle
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contract.answer import Answer
from contract.prompt import Rendering
from contract.rating import parse_rating, render_rating_answer
from contract.search import parse_search, render_search_answer
from reward_rules import terms as terms_module
from reward_rules.terms import (
    TERMS,
    Accuracy,
    Availability,
    CategoryCap,
    Diversity,
    Format,
    Freshness,
    Novelty,
    Promotion,
    RatingAccuracy,
    RatingFormat,
    SearchNdcg,
    split_at_category_cap,
    weighted_sum,
)

CANDIDATES = ["a", "b", "c", "d"]
CATEGORIES = {"a": ["Drama"], "b": ["Drama"], "c": ["Comedy"], "d": ["Drama", "Comedy"]}
COUNTS = {"a": 8, "b": 4, "c": 2, "d": 1, "z": 1}  # total 16: log2(16) = 4 bits at most
LOG3 = math.log2(3)
PROMOTED = {"b", "d", "z"}  # z is not a candidate
UNAVAILABLE = {"c", "z"}
CREATED = {
    "a": 10.0,
    "b": 30.0,
    "c": 20.0,
    "d": 30.0,
    "z": 0.0,
}  # percentiles 1/4, 7/8, 1/2, 7/8, 0

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


class TestPromotion:
    @pytest.mark.parametrize(
        ("answer", "ex", "expected"),
        [
            # no candidate is promoted: does not apply
            (ok("a", "c"), {"candidates": ["a", "c"], "k": 2}, None),
            # nothing ranked: 0
            (ok(), example(), 0.0),
            # both slots promoted: 1
            (ok("b", "d"), example(), 1.0),
            # one of two slots: 1/2, whatever its rank
            (ok("a", "b"), example(), 0.5),
            (ok("b", "a"), example(), 0.5),
            # a short answer is measured against the full k slots: one of two, not one of one
            (ok("b"), example(), 0.5),
            # fewer candidates than k: the slots are the candidates (b of a, b)
            (ok("a", "b"), {"candidates": ["a", "b"], "k": 5}, 0.5),
            # malformed completion: 0
            (bad("b", "d"), example(), 0.0),
            # a promoted item past k, duplicated or not a candidate does not count
            (ok("a", "c", "b"), example(), 0.0),
            (ok("b", "b"), example(), 0.5),
            (ok("z", "b"), example(), 0.5),
            # extra columns are ignored
            (ok("b", "d"), example(user="u1"), 1.0),
        ],
    )
    def test_cases(self, answer: Answer, ex: dict[str, Any], expected: float | None) -> None:
        assert Promotion(PROMOTED)(answer, ex) == pytest.approx(expected)

    @given(answers, examples, st.sets(ids, max_size=4))
    def test_lies_in_unit_interval(
        self, answer: Answer, ex: dict[str, Any], promoted: set[str]
    ) -> None:
        value = Promotion(promoted)(answer, ex)
        assert value is None or 0.0 <= value <= 1.0
        assert (value is None) == promoted.isdisjoint(ex["candidates"])


class TestAvailability:
    @pytest.mark.parametrize(
        ("answer", "ex", "expected"),
        [
            # every candidate available: does not apply
            (ok("a", "b"), {"candidates": ["a", "b"], "k": 2}, None),
            # nothing ranked: 0, an empty answer is not the best one
            (ok(), example(), 0.0),
            # only available items: 1
            (ok("a", "b"), example(), 1.0),
            # one of two unavailable: 1/2
            (ok("c", "a"), example(), 0.5),
            # only an unavailable item: 0
            (ok("c"), example(), 0.0),
            # a short answer of available items: 1 (format, not availability, asks for k)
            (ok("a"), example(), 1.0),
            # malformed completion: 0
            (bad("a", "b"), example(), 0.0),
            # an unavailable item past k does not count
            (ok("a", "b", "c"), example(), 1.0),
            # extra columns are ignored
            (ok("c", "a"), example(user="u1"), 0.5),
        ],
    )
    def test_cases(self, answer: Answer, ex: dict[str, Any], expected: float | None) -> None:
        assert Availability(UNAVAILABLE)(answer, ex) == pytest.approx(expected)

    @given(answers, examples, st.sets(ids, max_size=4))
    def test_lies_in_unit_interval(
        self, answer: Answer, ex: dict[str, Any], unavailable: set[str]
    ) -> None:
        value = Availability(unavailable)(answer, ex)
        assert value is None or 0.0 <= value <= 1.0
        assert (value is None) == unavailable.isdisjoint(ex["candidates"])


class TestSplitAtCategoryCap:
    @pytest.mark.parametrize(
        ("items", "cap", "kept", "skipped"),
        [
            # no cap: everything kept
            (["a", "b", "c"], None, ["a", "b", "c"], []),
            # nothing to walk
            ([], 1, [], []),
            # the second drama is skipped, the comedy after it kept
            (["a", "b", "c"], 1, ["a", "c"], ["b"]),
            # cap 2: two dramas fit
            (["a", "b", "c"], 2, ["a", "b", "c"], []),
            # d (drama and comedy) counts towards both: after it neither a nor c fits
            (["d", "a", "c"], 1, ["d"], ["a", "c"]),
            # an item without categories is never capped
            (["a", "x", "y", "b"], 1, ["a", "x", "y"], ["b"]),
            # a skipped item does not count: b is skipped, so the cap on drama stays at a alone
            (["a", "b", "d"], 1, ["a"], ["b", "d"]),
        ],
    )
    def test_cases(
        self, items: list[str], cap: int | None, kept: list[str], skipped: list[str]
    ) -> None:
        assert split_at_category_cap(items, CATEGORIES, cap) == (kept, skipped)

    @given(st.lists(ids, unique=True), st.integers(1, 3))
    def test_kept_respects_the_cap_and_nothing_is_lost(self, items: list[str], cap: int) -> None:
        kept, skipped = split_at_category_cap(items, CATEGORIES, cap)
        assert sorted(kept + skipped) == sorted(items)
        assert kept == [item for item in items if item in kept]  # order kept
        for category in ("Drama", "Comedy"):
            assert sum(category in CATEGORIES.get(item, ()) for item in kept) <= cap


class TestCategoryCap:
    @pytest.mark.parametrize(
        ("answer", "ex", "cap", "expected"),
        [
            # no cap: does not apply
            (ok("a", "b"), example(), None, None),
            # k <= cap: the cap cannot be exceeded, does not apply
            (ok("a", "b"), example(), 2, None),
            # nothing ranked: 0
            (ok(), example(), 1, 0.0),
            # drama and comedy, cap 1: 1
            (ok("a", "c"), example(), 1, 1.0),
            # two dramas, cap 1: the second is over, 1 - 1/2
            (ok("a", "b"), example(), 1, 0.5),
            # three dramas of three ranked, cap 1: two over, 1 - 2/3
            (ok("a", "b", "d"), example(k=3), 1, 1 / 3),
            # cap 2, k 3: the third drama is over
            (ok("a", "b", "d", "c"), example(k=3), 2, 2 / 3),
            # malformed completion: 0
            (bad("a", "c"), example(), 1, 0.0),
            # an item over the cap past k does not count
            (ok("a", "c", "b"), example(), 1, 1.0),
            # extra columns are ignored
            (ok("a", "b"), example(user="u1"), 1, 0.5),
        ],
    )
    def test_cases(
        self, answer: Answer, ex: dict[str, Any], cap: int | None, expected: float | None
    ) -> None:
        assert CategoryCap(CATEGORIES, cap)(answer, ex) == pytest.approx(expected)

    def test_cap_below_one_is_refused(self) -> None:
        with pytest.raises(ValueError, match="at least 1"):
            CategoryCap(CATEGORIES, 0)

    @given(answers, examples, st.integers(1, 3))
    def test_lies_in_unit_interval(self, answer: Answer, ex: dict[str, Any], cap: int) -> None:
        value = CategoryCap(CATEGORIES, cap)(answer, ex)
        assert value is None or 0.0 <= value <= 1.0
        assert (value is None) == (ex["k"] <= cap)


class TestFreshness:
    @pytest.mark.parametrize(
        ("answer", "ex", "expected"),
        [
            # nothing ranked: 0
            (ok(), example(), 0.0),
            # the oldest candidate: one of four other items (z) is older, 1/4
            (ok("a"), example(k=1), 0.25),
            # b ties with d at the newest time: 3 older + half a tie of 4, 7/8
            (ok("b"), example(k=1), 7 / 8),
            # the mean over the ranked items: (1/4 + 1/2) / 2
            (ok("a", "c"), example(), 0.375),
            # an item without a creation time scores 0
            (ok("e"), {"candidates": ["e"], "k": 1}, 0.0),
            # malformed completion: 0
            (bad("b"), example(k=1), 0.0),
            # non-candidates and duplicates are not scored
            (ok("x", "c", "c"), example(k=1), 0.5),
            # extra columns are ignored
            (ok("c"), example(k=1, user="u1"), 0.5),
        ],
    )
    def test_cases(self, answer: Answer, ex: dict[str, Any], expected: float) -> None:
        assert Freshness(CREATED)(answer, ex) == pytest.approx(expected)

    @pytest.mark.parametrize(
        "created",
        [
            # no catalog times
            {},
            # one item: nothing to compare with
            {"a": 5.0},
            # every item created at once: none is newer
            {"a": 5.0, "b": 5.0},
        ],
    )
    def test_does_not_apply_without_two_distinct_times(self, created: dict[str, float]) -> None:
        assert Freshness(created)(ok("a"), example(k=1)) is None

    def test_newest_scores_one_and_oldest_zero(self) -> None:
        term = Freshness({"a": 1.0, "b": 1e9, "c": 2e9})  # ranks, not scaled ages
        assert [term(ok(item), example(k=1)) for item in "acb"] == [0.0, 1.0, 0.5]

    @given(answers, examples, st.dictionaries(ids, st.floats(-1e9, 1e9)))
    def test_lies_in_unit_interval(
        self, answer: Answer, ex: dict[str, Any], created: dict[str, float]
    ) -> None:
        value = Freshness(created)(answer, ex)
        assert value is None or 0.0 <= value <= 1.0
        assert (value is None) == (len(set(created.values())) < 2)

    @given(st.dictionaries(ids, st.integers(0, 5), min_size=2))
    def test_newer_items_score_higher(self, created: dict[str, int]) -> None:
        term = Freshness({item: float(t) for item, t in created.items()})
        if term(ok(), example()) is None:
            return
        for older in created:
            for newer in created:
                if created[older] < created[newer]:
                    assert term.score[older] < term.score[newer]


class TestRegistryAndSum:
    def test_registry_names_every_term_by_its_name(self) -> None:
        expected = {"format": Format, "accuracy": Accuracy, "diversity": Diversity}
        business = {"promotion": Promotion, "availability": Availability}
        business |= {"category_cap": CategoryCap, "freshness": Freshness}
        rating = {"rating_format": RatingFormat, "rating_accuracy": RatingAccuracy}
        assert expected | {"novelty": Novelty} | business | rating == TERMS
        assert all(cls.name == name for name, cls in TERMS.items())

    @pytest.mark.parametrize(
        "term",
        [
            Format(),
            Accuracy(),
            Diversity(CATEGORIES),
            Novelty(COUNTS),
            Promotion(PROMOTED),
            Availability(UNAVAILABLE),
            CategoryCap(CATEGORIES, 1),
            Freshness(CREATED),
        ],
        ids=lambda term: term.name,
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


class TestRatingTerms:
    """METHODS.md §2: format +1 / -1, accuracy 1 - |predicted - true| / 2 only when well formed."""

    @pytest.mark.parametrize(
        ("text", "true", "fmt", "accuracy"),
        [
            ("<user>a</user><item>b</item><match>c</match><rating>4</rating>", 4, 1.0, 1.0),
            ("<user>a</user><item>b</item><match>c</match><rating>3</rating>", 4, 1.0, 0.5),
            ("<user>a</user><item>b</item><match>c</match><rating>1</rating>", 5, 1.0, -1.0),
            ("<user>a</user><item>b</item><match>c</match><rating>4.5</rating>", 4, 1.0, 0.75),
            ("<user>a</user><item>b</item><match>c</match><rating>6</rating>", 4, -1.0, 0.0),
            ("<user>a</user><item>b</item><match>c</match><rating>0</rating>", 1, -1.0, 0.0),
            ("<user>a</user><item>b</item><match> </match><rating>4</rating>", 4, -1.0, 0.0),
            ("<item>b</item><user>a</user><match>c</match><rating>4</rating>", 4, -1.0, 0.0),
            (
                "<user>a</user><user>a</user><item>b</item><match>c</match><rating>4</rating>",
                4,
                -1.0,
                0.0,
            ),
            ("<user>a</user><item>b</item><match>c</match><rating>four</rating>", 4, -1.0, 0.0),
            ("<user>a</user><item>b</item><match>c</match>", 4, -1.0, 0.0),
            ("", 3, -1.0, 0.0),
        ],
    )
    def test_table(self, text: str, true: float, fmt: float, accuracy: float) -> None:
        answer = parse_rating(text)
        assert RatingFormat()(answer, {"rating": true}) == fmt
        assert RatingAccuracy()(answer, {"rating": true}) == accuracy

    @given(
        st.integers(1, 5),
        st.floats(1, 5),
        st.lists(st.text(alphabet="abc xyz.,+-", min_size=1, max_size=12), min_size=3, max_size=3),
    )
    def test_well_formed_answers_score_in_range(
        self, written: int, true: float, steps: list[str]
    ) -> None:
        answer = parse_rating(render_rating_answer(steps, written))
        assert RatingFormat()(answer, {}) == 1.0
        value = RatingAccuracy()(answer, {"rating": true})
        assert -1.0 <= value <= 1.0
        assert value == pytest.approx(1 - abs(written - true) / 2)
        # the total METHODS.md gives: in [-1, 2], and more for a closer rating
        closer = RatingAccuracy()(
            parse_rating(render_rating_answer(steps, round(true))), {"rating": true}
        )
        assert closer >= value - 1e-9

    @given(st.floats(0, 10), st.integers(1, 5))
    def test_a_true_rating_outside_one_to_five_keeps_the_reward_in_range(
        self, true: float, written: int
    ) -> None:
        answer = parse_rating(render_rating_answer(["a", "b", "c"], written))
        assert -1.0 <= RatingAccuracy()(answer, {"rating": true}) <= 1.0

    @given(st.text(max_size=80))
    def test_any_text_scores_within_bounds(self, text: str) -> None:
        answer = parse_rating(text)
        fmt, accuracy = RatingFormat()(answer, {}), RatingAccuracy()(answer, {"rating": 3})
        assert fmt in (-1.0, 1.0)
        assert -1.0 <= accuracy <= 1.0
        assert fmt == 1.0 or accuracy == 0.0


class RankedList:
    """A retriever stand-in: a fixed list per query; `calls` records what it was asked."""

    def __init__(self, lists: dict[str, list[str]]):
        self.lists, self.calls = lists, []

    def __call__(self, query: str, item: str, exclude) -> int | None:
        self.calls.append((query, item, set(exclude)))
        ranked = [i for i in self.lists.get(query, []) if i not in exclude]
        return ranked.index(item) + 1 if item in ranked else None


SEARCH_LISTS = {"heat": ["heat", "toy"], "toy": ["heat", "x", "toy"], "comedy toy": ["toy"]}


class TestSearchNdcg:
    """METHODS.md §3: -2 malformed; else 0.1 + NDCG@k of the held-out item in the list."""

    @pytest.mark.parametrize(
        ("text", "typed", "seen", "k", "reward"),
        [
            ("<think>a</think><answer>toy</answer>", "", [], 10, 0.1 + 1 / math.log2(4)),
            ("<think>a</think><answer>toy</answer>", "", ["heat"], 10, 0.1 + 1 / math.log2(3)),
            ("<think>a</think><answer>heat</answer>", "", [], 10, 0.1 + 1 / math.log2(3)),
            ("<think>a</think><answer>toy</answer>", "comedy", [], 10, 1.1),  # typed goes first
            ("<think>a</think><answer>toy</answer>", "", [], 2, 0.1),  # ranked below k
            ("<think>a</think><answer>alien</answer>", "", [], 10, 0.1),  # not retrieved
            ("<think>a</think><answer>  </answer>", "", [], 10, -2.0),
            ("<answer>toy</answer>", "", [], 10, -2.0),
            ("", "", [], 10, -2.0),
        ],
    )
    def test_table(self, text: str, typed: str, seen: list, k: int, reward: float) -> None:
        term = SearchNdcg(RankedList(SEARCH_LISTS), k)
        example = {"item_id": "toy", "typed": typed, "seen": seen}
        assert term(parse_search(text), example) == pytest.approx(reward)

    def test_the_retriever_is_asked_once_with_the_seen_items_left_out(self) -> None:
        retriever = RankedList(SEARCH_LISTS)
        answer = parse_search("<think>a</think><answer>toy</answer>")
        SearchNdcg(retriever)(answer, {"item_id": "toy", "typed": "comedy", "seen": ["heat"]})
        assert retriever.calls == [("comedy toy", "toy", {"heat"})]

    @given(st.text(max_size=80), st.integers(1, 30))
    def test_any_text_scores_minus_two_or_within_the_format_and_ndcg(
        self, text: str, rank: int
    ) -> None:
        term = SearchNdcg(lambda query, item, seen: rank, k=10)
        value = term(parse_search(text), {"item_id": "x"})
        assert value == -2.0 or 0.1 <= value <= 1.1

    @given(
        st.from_regex(r"[a-z][a-z ]{0,30}", fullmatch=True),
        st.integers(1, 50),
        st.integers(1, 50),
    )
    def test_a_higher_rank_earns_more(self, query: str, better: int, worse: int) -> None:
        better, worse = sorted((better, worse))
        answer = parse_search(render_search_answer("r", query, Rendering.compact))

        def reward(rank: int) -> float:
            return SearchNdcg(lambda q, item, seen: rank, k=20)(answer, {"item_id": "x"})

        assert reward(better) >= reward(worse) >= 0.1
