"""The user's lean (`contract.rating.user_lean`): what the rating prompt says about a user's
latest ratings against what the bias model expects of those items; the expected rating served."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contract.rating import LEAN_WINDOW, Stats, expected_rating, user_lean

EVERYONE = Stats(mean=3.0, count=1000)
PLAIN = Stats(mean=3.0, count=100)  # an item rated like everything else: no bias


def test_no_ratings_no_lean() -> None:
    assert user_lean(EVERYONE, []) is None


def test_newest_ratings_weigh_most() -> None:
    # the same four ratings, in two orders: the lean follows the newest
    assert user_lean(EVERYONE, [(5.0, PLAIN), (5.0, PLAIN), (1.0, PLAIN), (1.0, PLAIN)]) < 0
    assert user_lean(EVERYONE, [(1.0, PLAIN), (1.0, PLAIN), (5.0, PLAIN), (5.0, PLAIN)]) > 0


def test_only_the_window_counts() -> None:
    latest = [(4.0, PLAIN)] * LEAN_WINDOW
    assert user_lean(EVERYONE, [(1.0, PLAIN)] * 5 + latest) == user_lean(EVERYONE, latest)


def test_rating_items_as_others_do_is_no_lean() -> None:
    # a loved film rated 4.5 by everyone and rated 4.5 here says nothing about the user
    loved = Stats(mean=4.5, count=10_000)
    assert user_lean(EVERYONE, [(4.5, loved)] * 3) == pytest.approx(0.0, abs=0.01)


def test_one_rating_is_shrunk_towards_none() -> None:
    # one 5 on a plain item: residual 2, weight 1, shrinkage 1
    assert user_lean(EVERYONE, [(5.0, PLAIN)]) == pytest.approx(1.0)


@given(st.lists(st.floats(1, 5), min_size=1, max_size=30))
def test_the_lean_stays_within_the_residuals(values: list[float]) -> None:
    lean = user_lean(EVERYONE, [(v, PLAIN) for v in values])
    window = [v - 3.0 for v in values[-LEAN_WINDOW:]]
    assert min(min(window), 0) - 1e-9 <= lean <= max(max(window), 0) + 1e-9


def test_tokens_that_read_as_one_rating_add_up() -> None:
    """A tokenizer may hold "4" and " 4"; the second overwrote the first."""
    both = expected_rating({"4": math.log(0.25), " 4": math.log(0.25), "2": math.log(0.5)})
    assert both == pytest.approx(3.0)
    assert expected_rating({"x": 0.0, "6": 0.0}) is None


def test_a_log_probability_above_zero_counts_as_certain() -> None:
    """A remote engine's answer is not trusted: exp(1000) would overflow."""
    assert expected_rating({"5": 1000.0, "1": math.log(1e-9)}) == pytest.approx(5.0, abs=1e-6)
