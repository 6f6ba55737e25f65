from collections.abc import Callable

import numpy as np
import pytest

from server.loaders import LoadError
from trainer.evaluation.split import Interaction, Split, build_split, load_split, sample_users

# user 1: two events share timestamp 300; the file lists item 2 before item 4
# user 2: only two events, skipped
# user 10: exactly three events, listed out of time order; its rating 1 still counts
ROWS = [
    ("1", "1", 5, 100),
    ("10", "3", 1, 50),
    ("1", "2", 1, 300),
    ("2", "1", 4, 10),
    ("1", "3", 3, 200),
    ("10", "1", 4, 20),
    ("1", "4", 2, 300),
    ("2", "2", 4, 20),
    ("10", "2", 2, 60),
]


@pytest.fixture
def split(make_folder: Callable) -> Split:
    return load_split(make_folder(ROWS))


class TestSplitRules:
    def test_last_is_test_second_last_validation_rest_train(self, split: Split) -> None:
        assert split.train["1"] == ("1", "3")
        assert (split.validation["1"], split.test["1"]) == ("2", "4")

    def test_equal_timestamps_keep_file_order(self, make_folder: Callable) -> None:
        # the same events with the two ties listed the other way round swap validation and test
        swapped = [row for row in ROWS if row[1:] != ("2", 1, 300)]
        swapped.append(("1", "2", 1, 300))
        split = load_split(make_folder(swapped))
        assert (split.validation["1"], split.test["1"]) == ("4", "2")

    def test_users_with_fewer_than_three_interactions_are_skipped(self, split: Split) -> None:
        assert "2" not in split.train and "2" not in split.test
        assert split.users == ("1", "10")  # numeric order, not "1" < "10" < "2" by chance

    def test_three_interactions_leave_one_for_training(self, split: Split) -> None:
        # file order 3@50, 1@20, 2@60 sorts to 1, 3, 2; the rating of 1 is an interaction too
        assert split.train["10"] == ("1",)
        assert (split.validation["10"], split.test["10"]) == ("3", "2")

    def test_history_and_seen_are_training_plus_validation(self, split: Split) -> None:
        assert split.history("1") == ("1", "3", "2")
        assert split.seen("1") == {"1", "2", "3"}
        assert split.history("unknown") == () and split.seen("unknown") == frozenset()

    def test_popularity_counts_training_interactions_of_evaluated_users(self, split: Split) -> None:
        # user 1 trains on 1 and 3, user 10 on 1; user 2 is skipped altogether
        assert split.popularity == {"1": 2, "2": 0, "3": 1, "4": 0, "5": 0, "6": 0}
        assert split.training_interactions == 3

    def test_catalog_and_categories_come_from_u_item(self, split: Split) -> None:
        assert split.catalog == ("1", "2", "3", "4", "5", "6")  # 6 is never rated
        assert split.categories["3"] == {"Drama", "Comedy"}
        assert split.categories["5"] == frozenset()
        assert split.dataset == "ml-100k:ml-tiny"

    def test_catalog_sorts_ids_as_integers_and_adds_items_missing_from_u_item(self) -> None:
        rows = [Interaction("1", item, t) for t, item in enumerate(["10", "9", "x", "2"])]
        split = build_split("tiny", rows, {"9": frozenset({"Drama"})})
        assert split.catalog == ("2", "9", "10", "x")
        assert split.categories["10"] == frozenset()

    def test_a_malformed_rating_is_reported_with_its_file_and_line(
        self, make_folder: Callable
    ) -> None:
        folder = make_folder(ROWS)
        (folder / "u.data").write_text("1\t2\t3\t4\n\n1\t2\t3\n")  # the blank line counts
        with pytest.raises(LoadError, match=r"ml-tiny/u\.data line 3: expected 4 fields"):
            load_split(folder)


def many_users(n: int = 50) -> Split:
    rows = [Interaction(str(u), str(i), i) for u in range(1, n + 1) for i in range(3)]
    return build_split("many", rows, {})


class TestSampleUsers:
    def test_the_same_seed_gives_the_same_users(self) -> None:
        assert sample_users(many_users(), 10, seed=7) == sample_users(many_users(), 10, seed=7)

    def test_another_seed_gives_other_users(self) -> None:
        assert sample_users(many_users(), 10, seed=7) != sample_users(many_users(), 10, seed=8)

    def test_n_distinct_users_in_split_order(self) -> None:
        split = many_users()
        users = sample_users(split, 10, seed=1)
        assert len(set(users)) == 10
        assert users == [user for user in split.users if user in users]

    def test_follows_the_documented_recipe(self) -> None:
        split = many_users()
        chosen = np.random.default_rng(3).choice(len(split.users), size=5, replace=False)
        assert sample_users(split, 5, seed=3) == [split.users[i] for i in sorted(chosen)]

    @pytest.mark.parametrize("n", [50, 51, 1000])
    def test_n_at_or_above_the_user_count_is_a_full_run(self, n: int) -> None:
        assert sample_users(many_users(), n, seed=0) == list(many_users().users)

    def test_zero_users_and_negative_counts(self) -> None:
        assert sample_users(many_users(), 0, seed=0) == []
        with pytest.raises(ValueError, match=">= 0"):
            sample_users(many_users(), -1, seed=0)
