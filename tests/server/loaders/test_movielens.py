import json
from pathlib import Path

import pytest

from server.loaders import LoadError
from server.loaders.movielens import read_ml100k, read_ml_latest


def test_ml100k_loads_catalog_users_and_ratings(ml100k: Path, loaded) -> None:
    summary = loaded.write(read_ml100k(ml100k))
    assert (summary.items, summary.users, summary.events) == (1682, 943, 100_000)
    state = loaded.snapshot()
    assert (state["items"], state["users"], state["events"]) == (1682, 943, 100_000)

    toy_story = loaded.redis.hgetall(loaded.keys.item("1"))
    assert toy_story["title"] == "Toy Story (1995)"
    assert json.loads(toy_story["categories"]) == ["Animation", "Children's", "Comedy"]
    assert json.loads(toy_story["attributes"])["year"] == 1995
    # u.item is Latin-1: the accent must survive.
    assert loaded.redis.hget(loaded.keys.item("543"), "title") == "Misérables, Les (1995)"
    assert json.loads(loaded.redis.hget(loaded.keys.user("1"), "attributes")) == {
        "age": 24,
        "gender": "M",
        "occupation": "technician",
        "zip": "85711",
    }
    # The first line of u.data: user 196 rated item 242 with 3 at 881250949 (not positive).
    first = loaded.redis.xrange(loaded.keys.events, count=1)[0][1]
    assert first == {
        "user_id": "196",
        "item_id": "242",
        "type": "rating",
        "value": "3.0",
        "request_id": "",
        "event_id": "ml-100k:196:242:881250949",
        "ts": "881250949.0",
    }
    # Ratings >= 4 are positives: they fill history and popularity.
    positives = sum(score for _, score in state["pop"])
    assert positives == 55_375


def test_ml100k_twice_changes_nothing(ml100k: Path, loaded) -> None:
    loaded.write(read_ml100k(ml100k))
    before = loaded.snapshot()
    again = loaded.write(read_ml100k(ml100k))
    assert (again.events, again.duplicates) == (0, 100_000)
    assert loaded.snapshot() == before


def test_ml100k_missing_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "u.data").write_text("")
    with pytest.raises(LoadError, match=r"u\.item, u\.user, u\.genre"):
        read_ml100k(tmp_path)


@pytest.fixture
def ml_latest(tmp_path: Path) -> Path:
    (tmp_path / "movies.csv").write_text(
        "movieId,title,genres\n"
        '1,"Toy Story (1995)",Adventure|Animation\n'
        '2,"Heat, The (1995)",Action|Crime\n'
        "3,Untitled,(no genres listed)\n"
    )
    (tmp_path / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,1,4.5,964982703\n1,2,2.0,964982800\n7,3,0.5,964990000\n"
    )
    (tmp_path / "tags.csv").write_text(
        "userId,movieId,tag,timestamp\n1,1,pixar,1\n7,1,Pixar,2\n7,1,funny,3\n"
    )
    return tmp_path


def test_ml_latest_reads_csv_files_and_tags(ml_latest: Path, loaded) -> None:
    summary = loaded.write(read_ml_latest(ml_latest))
    assert (summary.items, summary.users, summary.events) == (3, 2, 3)
    toy = loaded.redis.hgetall(loaded.keys.item("1"))
    assert json.loads(toy["categories"]) == ["Adventure", "Animation"]
    assert json.loads(toy["attributes"]) == {"year": 1995, "tags": "pixar, funny"}
    assert loaded.redis.hget(loaded.keys.item("2"), "title") == "Heat, The (1995)"
    assert json.loads(loaded.redis.hget(loaded.keys.item("3"), "categories")) == []
    # Only the 4.5 rating is positive.
    assert loaded.redis.zrange(loaded.keys.history("1"), 0, -1) == ["1"]
    assert loaded.redis.zrange(loaded.keys.history("7"), 0, -1) == []


def test_ml_latest_twice_changes_nothing(ml_latest: Path, loaded) -> None:
    loaded.write(read_ml_latest(ml_latest))
    before = loaded.snapshot()
    assert loaded.write(read_ml_latest(ml_latest)).duplicates == 3
    assert loaded.snapshot() == before


def test_ml_latest_rating_for_unknown_movie_is_an_error(ml_latest: Path, loaded) -> None:
    with (ml_latest / "ratings.csv").open("a") as handle:
        handle.write("1,999,3.0,964990001\n")
    with pytest.raises(LoadError, match="user 1 -> item 999"):
        loaded.write(read_ml_latest(ml_latest))
