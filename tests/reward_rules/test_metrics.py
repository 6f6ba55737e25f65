import doctest
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reward_rules import metrics
from reward_rules.metrics import (
    hit_at_k,
    intra_list_distance,
    jaccard_distance,
    max_self_information,
    mean_self_information,
    ndcg_at_k,
    self_information,
)

ids = st.sampled_from([f"i{n}" for n in range(12)])
id_lists = st.lists(ids, max_size=15)
id_sets = st.sets(ids, max_size=12)
category_sets = st.lists(st.sets(st.sampled_from("ABCDE"), max_size=5), max_size=8)
LOG3 = math.log2(3)


def test_docstring_examples_hold() -> None:
    assert doctest.testmod(metrics).failed == 0


class TestNdcg:
    @pytest.mark.parametrize(
        ("ranked", "relevant", "k", "expected"),
        [
            # a relevant id listed twice is one relevant item: found first, ideal
            (["a", "b"], ["a", "a"], 10, 1.0),
            # no relevant items: nothing to find, 0 by definition (not a division by zero)
            (["a", "b"], set(), 10, 0.0),
            # empty list: no hits
            ([], {"a"}, 10, 0.0),
            # one relevant item first: ideal
            (["a", "b"], {"a"}, 10, 1.0),
            # one relevant item at rank 2: 1 / log2(3)
            (["b", "a"], {"a"}, 10, 1 / LOG3),
            # relevant item just outside the top k: 0
            (["b", "c", "a"], {"a"}, 2, 0.0),
            # two relevant, one found first: IDCG counts both (1 + 1/log2 3)
            (["a", "x"], {"a", "b"}, 10, 1 / (1 + 1 / LOG3)),
            # more relevant items than k: IDCG over k hits only, so a full top k is ideal
            (["a", "b"], {"a", "b", "c"}, 2, 1.0),
            # a repeated hit is counted once, so it cannot beat the ideal list
            (["a", "a"], {"a", "b"}, 2, 1 / (1 + 1 / LOG3)),
            # relevant may be any collection (a list here), not only a set
            (["x", "a"], ["a"], 10, 1 / LOG3),
        ],
    )
    def test_cases(self, ranked: list[str], relevant: set[str], k: int, expected: float) -> None:
        assert ndcg_at_k(ranked, relevant, k) == pytest.approx(expected)

    def test_k_below_one_is_refused(self) -> None:
        with pytest.raises(ValueError, match="k must be at least 1"):
            ndcg_at_k(["a"], {"a"}, 0)

    @given(id_lists, id_sets, st.integers(1, 12))
    def test_lies_in_unit_interval(self, ranked: list[str], relevant: set[str], k: int) -> None:
        assert 0.0 <= ndcg_at_k(ranked, relevant, k) <= 1.0 + 1e-12

    @given(id_sets.filter(bool), st.integers(1, 12), id_lists)
    def test_is_one_when_the_top_is_all_relevant(
        self, relevant: set[str], k: int, tail: list[str]
    ) -> None:
        top = sorted(relevant)[: min(k, len(relevant))]
        assert ndcg_at_k(top + tail, relevant, k) == pytest.approx(1.0)

    @given(st.lists(ids, min_size=2, max_size=12, unique=True), st.data())
    def test_grows_when_a_hit_moves_up(self, ranked: list[str], data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(ranked) - 2))
        j = data.draw(st.integers(i + 1, len(ranked) - 1))
        relevant = {ranked[j]}  # a hit at j, a miss at i: swapping them moves the hit up
        k = data.draw(st.integers(1, len(ranked)))
        swapped = list(ranked)
        swapped[i], swapped[j] = swapped[j], swapped[i]
        before, after = ndcg_at_k(ranked, relevant, k), ndcg_at_k(swapped, relevant, k)
        assert after >= before
        if i < k:  # the hit lands inside the top k at a better rank: strictly better
            assert after > before

    @given(id_lists, id_sets, st.integers(1, 12))
    def test_positive_exactly_when_there_is_a_hit(
        self, ranked: list[str], relevant: set[str], k: int
    ) -> None:
        assert (ndcg_at_k(ranked, relevant, k) > 0) == (hit_at_k(ranked, relevant, k) == 1.0)


class TestHit:
    @pytest.mark.parametrize(
        ("ranked", "relevant", "k", "expected"),
        [
            # empty list: a miss
            ([], {"a"}, 10, 0.0),
            # no relevant items: a miss
            (["a"], set(), 10, 0.0),
            # hit at the k-th position counts
            (["x", "a"], {"a"}, 2, 1.0),
            # hit just past k does not
            (["x", "a"], {"a"}, 1, 0.0),
        ],
    )
    def test_cases(self, ranked: list[str], relevant: set[str], k: int, expected: float) -> None:
        assert hit_at_k(ranked, relevant, k) == expected

    def test_k_below_one_is_refused(self) -> None:
        with pytest.raises(ValueError):
            hit_at_k(["a"], {"a"}, -1)


class TestIntraListDistance:
    @pytest.mark.parametrize(
        ("sets", "expected"),
        [
            # empty list: no pairs, 0
            ([], 0.0),
            # one item: no pairs, 0
            ([{"A"}], 0.0),
            # identical category sets: distance 0
            ([{"A", "B"}, {"B", "A"}], 0.0),
            # disjoint sets: distance 1
            ([{"A"}, {"B"}], 1.0),
            # half overlap: 1 - 1/2
            ([{"A"}, {"A", "B"}], 0.5),
            # two items without categories are alike (not 0/0)
            ([set(), set()], 0.0),
            # an item without categories against one with: nothing shared, 1
            ([set(), {"A"}], 1.0),
            # three items: the mean of the three pairs (0.5 + 1 + 1) / 3
            ([{"A"}, {"A", "B"}, {"C"}], 2.5 / 3),
            # lists and tuples work like sets; repeated categories count once
            ([["A", "A"], ("A",)], 0.0),
        ],
    )
    def test_cases(self, sets: list[set[str]], expected: float) -> None:
        assert intra_list_distance(sets) == pytest.approx(expected)

    @given(category_sets)
    def test_lies_in_unit_interval(self, sets: list[set[str]]) -> None:
        assert 0.0 <= intra_list_distance(sets) <= 1.0

    @given(category_sets, st.randoms())
    def test_does_not_depend_on_the_order(self, sets: list[set[str]], rng) -> None:
        shuffled = list(sets)
        rng.shuffle(shuffled)
        assert intra_list_distance(shuffled) == pytest.approx(intra_list_distance(sets))

    @given(st.sets(st.sampled_from("ABCDE")), st.sets(st.sampled_from("ABCDE")))
    def test_jaccard_distance_is_symmetric_and_zero_on_itself(self, a: set, b: set) -> None:
        assert jaccard_distance(a, b) == jaccard_distance(b, a)
        assert jaccard_distance(a, a) == 0.0


class TestSelfInformation:
    @pytest.mark.parametrize(
        ("count", "total", "expected"),
        [
            # an item with every interaction carries no information
            (8, 8, 0.0),
            # share 1/8: 3 bits
            (1, 8, 3.0),
            # share 2/8: 2 bits
            (2, 8, 2.0),
            # never seen in training: smoothed to a count of 1, as rare as the rarest seen item
            (0, 8, 3.0),
            # no training data at all: everything is equally (un)informative, 0 bits
            (0, 0, 0.0),
        ],
    )
    def test_cases(self, count: int, total: int, expected: float) -> None:
        assert self_information(count, total) == pytest.approx(expected)

    @pytest.mark.parametrize(("count", "total"), [(-1, 5), (6, 5)])
    def test_impossible_counts_are_refused(self, count: int, total: int) -> None:
        with pytest.raises(ValueError, match="count"):
            self_information(count, total)

    @given(st.integers(1, 10_000), st.data())
    def test_matches_eval_md_for_observed_items(self, total: int, data: st.DataObject) -> None:
        count = data.draw(st.integers(1, total))
        assert self_information(count, total) == pytest.approx(-math.log2(count / total))

    @given(st.integers(0, 1000), st.data())
    def test_bounded_and_falls_with_popularity(self, total: int, data: st.DataObject) -> None:
        count = data.draw(st.integers(0, total))
        value = self_information(count, total)
        assert 0.0 <= value <= max_self_information(total)
        if count < total:
            assert self_information(count + 1, total) <= value

    @pytest.mark.parametrize(
        ("items", "expected"),
        [
            # empty list: 0, not a division by zero
            ([], 0.0),
            # one item with share 4/8: 1 bit
            (["a"], 1.0),
            # the mean over the list: (1 + 2) / 2
            (["a", "b"], 1.5),
            # an item missing from the counts is an unseen item: log2(8) bits
            (["missing"], 3.0),
            # repeats count every time they are listed
            (["a", "a", "b"], 4 / 3),
        ],
    )
    def test_mean_cases(self, items: list[str], expected: float) -> None:
        counts = {"a": 4, "b": 2, "c": 2}
        assert mean_self_information(items, counts) == pytest.approx(expected)
        assert mean_self_information(items, counts, total=8) == pytest.approx(expected)
