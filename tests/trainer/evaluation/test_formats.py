"""`reasonrec eval --format ml-latest | jsonl`: the same EVAL.md split from the same loaders that
`reasonrec load` uses, on tiny files written to tmp_path."""

import json
import re
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from server.loaders import LoadError
from trainer.evaluation.harness import Report
from trainer.evaluation.split import EvalData, EvalFormat, read_eval_data

MOVIES = """movieId,title,genres
1,Toy Story (1995),Adventure|Animation
2,"American President, The (1995)",Comedy|Drama|Romance
3,Heat (1995),Action|Crime
4,Nowhere (1997),(no genres listed)
5,Never Rated (2000),Drama
"""
# user 1: movies 3 and 4 share timestamp 300, 3 listed first; user 7: two ratings, skipped;
# user 10: three ratings out of time order, the 0.5 counts like any other rating
RATINGS = [
    ("1", "1", "4.0", "100"),
    ("10", "3", "0.5", "50"),
    ("1", "3", "2.0", "300"),
    ("7", "1", "5.0", "10"),
    ("1", "2", "3.5", "200"),
    ("10", "1", "4.0", "20"),
    ("1", "4", "1.0", "300"),
    ("7", "2", "5.0", "20"),
    ("10", "2", "3.0", "60"),
]


def write_ml_latest(folder: Path, ratings: list[tuple[str, ...]] = RATINGS) -> Path:
    folder.mkdir()
    (folder / "movies.csv").write_text(MOVIES)
    lines = ["userId,movieId,rating,timestamp", *(",".join(row) for row in ratings)]
    (folder / "ratings.csv").write_text("\n".join(lines) + "\n")
    return folder


def item(item_id: str, *categories: str) -> dict:
    return {
        "kind": "item",
        "item_id": item_id,
        "title": f"Item {item_id}",
        "categories": categories,
    }


def event(user: str, item_id: str, kind: str, at: str) -> dict:
    return {"kind": "event", "user_id": user, "item_id": item_id, "type": kind, "timestamp": at}


def rating(user: str, item_id: str, value: float, at: str) -> dict:
    return event(user, item_id, "rating", at) | {"value": value}


T = "2024-01-01T00:00:0{}Z".format
JSONL = [
    *(item(i, c) for i, c in [("1", "Action"), ("2", "Drama"), ("3", "Comedy"), ("4", "Drama")]),
    item("5"),  # never interacted with, still in the catalog
    {"kind": "user", "user_id": "a", "attributes": {"age": 30}},
    # user a: the purchase of 3 and the rating of 4 share a time, the purchase listed first;
    # the repeated click is one event (same content, same derived id: the store keeps one);
    # impressions, skips and dislikes are not interactions, so 4 stays the test item
    event("a", "1", "click", T(1)),
    event("a", "1", "click", T(1)),
    event("a", "5", "impression", T(2)),
    event("a", "2", "like", T(3)),
    event("a", "3", "purchase", T(5)),
    rating("a", "4", 1.0, T(5)),
    event("a", "2", "skip", T(6)),
    event("a", "5", "dislike", T(7)),
    # user b: four events, two interactions: skipped
    event("b", "1", "click", T(1)),
    event("b", "3", "impression", T(2)),
    event("b", "2", "click", T(3)),
    event("b", "4", "skip", T(4)),
    # user c: listed out of time order, half a second apart
    event("c", "2", "click", "2024-01-01T00:00:01.5Z"),
    event("c", "4", "click", "2024-01-01T00:00:01Z"),
    event("c", "1", "purchase", "2024-01-01T00:00:02Z"),
]


def write_jsonl(path: Path, records: list[dict] = JSONL) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def sequence(data: EvalData, user: str) -> tuple[str, ...]:
    """Train, validation and test items of a user, in order."""
    split = data.split
    return (*split.train[user], split.validation[user], split.test[user])


class TestMovieLensLatest:
    def test_split_rules(self, tmp_path: Path) -> None:
        data = read_eval_data(write_ml_latest(tmp_path / "ml-small"), EvalFormat.ml_latest)
        split = data.split
        assert split.train["1"] == ("1", "2")
        assert (split.validation["1"], split.test["1"]) == ("3", "4")
        assert split.train["10"] == ("1",)
        assert (split.validation["10"], split.test["10"]) == ("3", "2")
        assert split.users == ("1", "10")  # user 7 has two ratings

    def test_equal_timestamps_keep_file_order(self, tmp_path: Path) -> None:
        swapped = [row for row in RATINGS if row[:2] != ("1", "3")] + [("1", "3", "2.0", "300")]
        split = read_eval_data(write_ml_latest(tmp_path / "ml", swapped), EvalFormat.ml_latest)
        assert (split.split.validation["1"], split.split.test["1"]) == ("4", "3")

    def test_catalog_categories_and_name_come_from_what_was_read(self, tmp_path: Path) -> None:
        split = read_eval_data(write_ml_latest(tmp_path / "ml-small"), EvalFormat.ml_latest)
        split = split.split
        assert split.catalog == ("1", "2", "3", "4", "5")
        assert split.categories["2"] == {"Comedy", "Drama", "Romance"}
        assert split.categories["4"] == frozenset()  # "(no genres listed)"
        assert split.popularity["1"] == 2 and split.popularity["5"] == 0
        assert split.dataset == "ml-latest:ml-small"

    def test_the_store_gets_the_events_the_split_was_built_from(self, tmp_path: Path) -> None:
        data = read_eval_data(write_ml_latest(tmp_path / "ml-small"), EvalFormat.ml_latest)
        for user in data.split.users:
            assert tuple(e.item_id for e in data.timelines[user]) == sequence(data, user)
        assert data.users == []  # no profiles: the store learns its users from their ratings


class TestJsonl:
    def test_split_rules(self, tmp_path: Path) -> None:
        data = read_eval_data(write_jsonl(tmp_path / "events.jsonl"), EvalFormat.jsonl)
        assert sequence(data, "a") == ("1", "2", "3", "4")
        assert sequence(data, "c") == ("4", "2", "1")
        assert data.split.users == ("a", "c")

    def test_catalog_categories_and_name(self, tmp_path: Path) -> None:
        data = read_eval_data(write_jsonl(tmp_path / "events.jsonl"), EvalFormat.jsonl)
        assert data.split.catalog == ("1", "2", "3", "4", "5")
        assert data.split.categories["1"] == {"Action"}
        assert data.split.categories["5"] == frozenset()
        assert data.split.dataset == "jsonl:events.jsonl"
        assert [user.user_id for user in data.users] == ["a"]

    def test_the_store_gets_the_events_the_split_was_built_from(self, tmp_path: Path) -> None:
        data = read_eval_data(write_jsonl(tmp_path / "events.jsonl"), EvalFormat.jsonl)
        for user in data.split.users:
            assert tuple(e.item_id for e in data.timelines[user]) == sequence(data, user)
        kinds = {e.type for events in data.timelines.values() for e in events}
        assert kinds == {"click", "like", "purchase", "rating"}


def test_event_ids_are_each_users_own_as_in_the_store(tmp_path: Path) -> None:
    """Two users' events under one id are both interactions; one user's id twice is one."""
    same_id = [
        {**event(u, i, "click", T(n)), "event_id": "e1"}
        for n, (u, i) in enumerate(
            [("a", "1"), ("b", "1"), ("b", "2"), ("b", "3"), ("b", "4")], start=1
        )
    ]
    records = [
        *JSONL[:5],
        *same_id,
        *(event("a", i, "click", T(n)) for n, i in [(6, "2"), (7, "3")]),
    ]
    data = read_eval_data(write_jsonl(tmp_path / "ids.jsonl", records), EvalFormat.jsonl)
    assert [e.item_id for e in data.timelines["a"]] == ["1", "2", "3"]
    assert [e.item_id for e in data.timelines["b"]] == ["1"]  # b's own "e1" again: a duplicate


def jsonl_with(tmp_path: Path, *records: dict) -> Path:
    return write_jsonl(tmp_path / "bad.jsonl", [*JSONL[:5], *records])


class TestUnusableData:
    def test_a_folder_without_the_files(self, tmp_path: Path) -> None:
        with pytest.raises(LoadError, match=r"is missing ratings\.csv, movies\.csv"):
            read_eval_data(tmp_path, EvalFormat.ml_latest)

    def test_a_file_for_a_folder_format(self, tmp_path: Path) -> None:
        with pytest.raises(LoadError, match="is not a folder"):
            read_eval_data(write_jsonl(tmp_path / "events.jsonl"), EvalFormat.ml_100k)

    def test_a_folder_for_jsonl(self, tmp_path: Path) -> None:
        with pytest.raises(LoadError, match="is not a file"):
            read_eval_data(tmp_path, EvalFormat.jsonl)

    def test_malformed_csv(self, tmp_path: Path) -> None:
        folder = write_ml_latest(tmp_path / "ml")
        (folder / "ratings.csv").write_text("user,movie,rating,timestamp\n1,1,4.0,100\n")
        # Users are read by the header's userId too, with the catalog: refused before any event.
        match = r"ratings\.csv line 1: the header has no column userId, movieId$"
        with pytest.raises(LoadError, match=match):
            read_eval_data(folder, EvalFormat.ml_latest)

    def test_malformed_catalog(self, tmp_path: Path) -> None:
        folder = write_ml_latest(tmp_path / "ml")
        (folder / "movies.csv").write_text("movieId,title\n1,Toy Story (1995)\n")
        match = r"movies\.csv line 1: the header has no column genres$"
        with pytest.raises(LoadError, match=match):
            read_eval_data(folder, EvalFormat.ml_latest)

    def test_no_items(self, tmp_path: Path) -> None:
        with pytest.raises(LoadError, match="no items"):
            read_eval_data(write_jsonl(tmp_path / "empty.jsonl", []), EvalFormat.jsonl)

    def test_no_user_with_three_interactions(self, tmp_path: Path) -> None:
        path = jsonl_with(tmp_path, event("a", "1", "click", T(1)), event("a", "2", "click", T(2)))
        with pytest.raises(LoadError, match="no user has 3 or more interactions"):
            read_eval_data(path, EvalFormat.jsonl)

    def test_an_interaction_with_an_unknown_item(self, tmp_path: Path) -> None:
        path = jsonl_with(tmp_path, event("a", "9", "click", T(1)))
        with pytest.raises(LoadError, match=r"1 interaction\(s\) name items that are not in"):
            read_eval_data(path, EvalFormat.jsonl)

    def test_an_interaction_without_a_timestamp(self, tmp_path: Path) -> None:
        untimed = {"kind": "event", "user_id": "a", "item_id": "1", "type": "like"}
        with pytest.raises(LoadError, match=r"1 interaction\(s\) have no timestamp"):
            read_eval_data(jsonl_with(tmp_path, untimed), EvalFormat.jsonl)


def plain(output: str) -> str:
    """CLI output without the error panel's frame and line breaks."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


class TestCommand:
    def test_refuses_an_unknown_format(self, tmp_path: Path) -> None:
        result = CliRunner().invoke(app, ["eval", "--format", "csv", str(tmp_path)])
        assert result.exit_code == 2
        assert "'csv' is not one of 'ml-100k', 'ml-latest', 'jsonl'" in plain(result.output)

    def test_unusable_data_is_a_message_not_a_traceback(self, tmp_path: Path) -> None:
        result = CliRunner().invoke(app, ["eval", "--format", "ml-latest", str(tmp_path)])
        assert result.exit_code == 2
        assert "is missing ratings.csv, movies.csv" in plain(result.output)
        assert "Traceback" not in result.output

    @pytest.mark.parametrize("where", [".", "absent/report.json"])
    def test_a_report_path_that_cannot_be_written_is_refused_before_any_work(
        self, tmp_path: Path, where: str
    ) -> None:
        path = write_jsonl(tmp_path / "events.jsonl")
        args = ["eval", "--format", "jsonl", str(path), "--json", str(tmp_path / where)]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2
        assert "cannot be written" in plain(result.output)

    def test_passes_the_data_it_read_to_the_run(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        runs = []

        def run_eval(data: EvalData, *args: object) -> Report:
            runs.append(data)
            return Report(dataset=data.split.dataset, protocol="test", users=0, systems={})

        # the real module trains a model; the command imports it only once the data is read
        fake = types.ModuleType("trainer.evaluation.run")
        fake.run_eval = run_eval  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "trainer.evaluation.run", fake)
        path = write_jsonl(tmp_path / "events.jsonl")
        result = CliRunner().invoke(app, ["eval", "--format", "jsonl", str(path)])
        assert result.exit_code == 0, result.output
        assert [data.split.dataset for data in runs] == ["jsonl:events.jsonl"]
        assert "jsonl:events.jsonl, 0 users" in result.output
