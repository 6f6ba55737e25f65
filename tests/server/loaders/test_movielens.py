import json
from pathlib import Path

import pytest

from server.loaders import LoadError, id_order, read_checked
from server.loaders.movielens import read_ml100k, read_ml_latest
from tests.trainer.evaluation.conftest import write_folder


def test_ml100k_loads_catalog_users_and_ratings_once(ml100k: Path, loaded) -> None:
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

    # One test, as a load of the 100,000 ratings takes seconds: loading them again adds nothing.
    again = loaded.write(read_ml100k(ml100k))
    assert (again.events, again.duplicates) == (0, 100_000)
    assert loaded.snapshot() == state


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
    # No profiles there: its users come with their ratings (said as 0 users).
    assert (summary.items, summary.users, summary.events) == (3, 2, 3)
    assert loaded.redis.smembers(loaded.keys.users) == {"1", "7"}  # with their ratings
    toy = loaded.redis.hgetall(loaded.keys.item("1"))
    assert json.loads(toy["categories"]) == ["Adventure", "Animation"]
    assert json.loads(toy["attributes"]) == {"year": 1995, "tags": "pixar, funny"}
    assert loaded.redis.hget(loaded.keys.item("2"), "title") == "Heat, The (1995)"
    assert json.loads(loaded.redis.hget(loaded.keys.item("3"), "categories")) == []
    # Only the 4.5 rating is positive.
    assert loaded.redis.zrange(loaded.keys.history("1"), 0, -1) == ["1"]
    assert loaded.redis.zrange(loaded.keys.history("7"), 0, -1) == []


def test_ml_latest_quote_left_open_is_an_error_naming_its_line(ml_latest: Path) -> None:
    """The rows after it were read into one title: items lost, and no error."""
    movies = (ml_latest / "movies.csv").read_text().replace('"Toy Story (1995)"', '"Toy Story')
    (ml_latest / "movies.csv").write_text(movies)
    with pytest.raises(LoadError, match=r"movies\.csv line 2: a quote opened here is not closed"):
        read_checked(read_ml_latest, ml_latest, "ml-latest")


def test_ml_latest_blank_lines_between_rows_are_skipped(ml_latest: Path, loaded) -> None:
    for name in ("movies.csv", "ratings.csv", "tags.csv"):
        header, _, rows = (ml_latest / name).read_text().partition("\n")
        (ml_latest / name).write_text(header + "\n\r\n" + rows.replace("\n", "\n\n", 1))
    assert loaded.write(read_ml_latest(ml_latest)).events == 3


def test_ml_latest_keeps_the_profiles_of_users_already_there(ml_latest: Path, loaded) -> None:
    """ml-latest has no profiles: its users were written with none, erasing the attributes of
    a user of that id loaded from ml-100k or set with PUT /v1/users."""
    loaded.redis.hset(loaded.keys.user("1"), "attributes", json.dumps({"age": 24}))
    loaded.write(read_ml_latest(ml_latest))
    assert json.loads(loaded.redis.hget(loaded.keys.user("1"), "attributes")) == {"age": 24}


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


def test_ml100k_files_re_saved_as_utf8_with_a_byte_order_mark_load_the_same(
    tmp_path: Path,
) -> None:
    rows = [("1", "1", 5, 100), ("1", "2", 4, 200), ("2", "1", 3, 300)]
    plain = read_ml100k(write_folder(tmp_path / "plain", rows))
    saved = write_folder(tmp_path / "saved", rows)
    for name in ("u.data", "u.user", "u.item"):  # as an editor re-saves them
        text = (saved / name).read_bytes().decode("latin-1")
        (saved / name).write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    again = read_ml100k(saved)
    assert [u.user_id for u in again.users] == [u.user_id for u in plain.users] == ["1", "2"]
    assert [e.user_id for e in again.events] == ["1", "1", "2"]
    assert [i.title for i in again.items] == [i.title for i in plain.items]
    assert again.items[0].title.startswith("Café")


def test_ml_latest_files_with_a_byte_order_mark_and_columns_in_another_order(
    ml_latest: Path, loaded
) -> None:
    for name in ("movies.csv", "ratings.csv"):
        (ml_latest / name).write_bytes(b"\xef\xbb\xbf" + (ml_latest / name).read_bytes())
    (ml_latest / "ratings.csv").write_text(
        "\ufeffmovieId,userId,rating,timestamp\n1,1,4.5,964982703\n3,7,0.5,964990000\n"
    )
    assert loaded.write(read_ml_latest(ml_latest)).events == 2
    assert loaded.redis.smembers(loaded.keys.users) == {"1", "7"}


def test_a_short_csv_row_is_a_load_error_naming_its_line(ml_latest: Path) -> None:
    with (ml_latest / "tags.csv").open("a") as handle:
        handle.write("7,1\n")
    with pytest.raises(LoadError, match=r"tags\.csv line 5"):
        read_checked(read_ml_latest, ml_latest, "ml-latest")


def test_ids_sort_as_numbers_then_as_text() -> None:
    # '²' is a digit to str.isdigit but not a number int() reads: eval's sort crashed on it.
    assert sorted(["10", "2", "b", "²", "a"], key=id_order) == ["2", "10", "a", "b", "²"]


def test_ml_latest_tags_are_cut_to_fit_an_attribute_value(ml_latest: Path, loaded) -> None:
    # Twenty 40-character tags, tag 0 the most used: joined they would take 838 characters.
    tags = [f"tag {n:02d} ".ljust(40, "x") for n in range(20)]
    rows = [f"{u},1,{tag},{u}\n" for n, tag in enumerate(tags) for u in range(20 - n)]
    (ml_latest / "tags.csv").write_text("userId,movieId,tag,timestamp\n" + "".join(rows))
    loaded.write(read_ml_latest(ml_latest))
    stored = json.loads(loaded.redis.hget(loaded.keys.item("1"), "attributes"))["tags"]
    assert stored == ", ".join(tags[:6])  # 6 x 40 + 5 x 2 = 250; a seventh would pass 256


def test_ml_latest_title_with_an_unquoted_comma_is_an_error(ml_latest: Path) -> None:
    with (ml_latest / "movies.csv").open("a") as handle:
        handle.write("4,American President, The (1995),Comedy|Drama\n")
    with pytest.raises(LoadError, match=r"movies\.csv line 5: more fields than its header$"):
        read_checked(read_ml_latest, ml_latest, "ml-latest")


def _ml100k_with(tmp_path: Path, name: str, line: str) -> Path:
    """A valid 100K folder (3 ratings, 2 users, 6 items) with `line` appended to file `name`."""
    folder = write_folder(tmp_path, [("1", "1", 5, 100), ("1", "2", 4, 200), ("2", "1", 3, 300)])
    with (folder / name).open("a", encoding="latin-1") as handle:
        handle.write(line)
    return folder


@pytest.mark.parametrize(
    ("name", "line", "message"),
    [
        ("u.item", "7|Short|01-Jan-1995||http://x|0|1\n", "u.item line 7: expected 9 fields"),
        (
            "u.item",
            "7|Dated|1995-01-01||http://x|0|1|0|0\n",
            "u.item line 7: release date '1995-01-01' is not a day like 01-Jan-1995",
        ),
        ("u.user", "3|thirty|F|writer|10001\n", "u.user line 3: invalid literal for int"),
        (
            "u.data",
            "2\t2\t0\t400\n",
            "u.data line 4: record: Value error, a rating needs a value between 0.5 and 5",
        ),
        ("u.data", "2\t2\t4\t4.5\n", "u.data line 4: timestamp '4.5' is not whole seconds"),
    ],
)
def test_ml100k_bad_lines_are_one_line_errors_naming_file_and_line(
    tmp_path: Path, name: str, line: str, message: str
) -> None:
    folder = _ml100k_with(tmp_path, name, line)
    with pytest.raises(LoadError) as caught:
        list(read_checked(read_ml100k, folder, "ml-100k").events)
    assert str(caught.value).startswith(f"{folder / message}")
    assert "\n" not in str(caught.value) and "pydantic.dev" not in str(caught.value)


@pytest.mark.parametrize(
    ("name", "line", "message"),
    [
        ("ratings.csv", "7,1,0,964990001\n", "ratings.csv line 5: record: Value error, a rating"),
        ("ratings.csv", "7,1,4.0,1700000000000\n", "ratings.csv line 5: timestamp"),
        # The id rule in words: its pattern is 2,000 characters.
        ("ratings.csv", "7 7,1,4.0,964990001\n", "ratings.csv line 5: user_id: not an id"),
        ("movies.csv", "4,Caf\xe9 (1995),Drama\n", "movies.csv line 5: 'utf-8' codec"),
    ],
)
def test_ml_latest_bad_lines_are_one_line_errors_naming_file_and_line(
    ml_latest: Path, name: str, line: str, message: str
) -> None:
    with (ml_latest / name).open("a", encoding="latin-1") as handle:
        handle.write(line)
    with pytest.raises(LoadError) as caught:
        list(read_checked(read_ml_latest, ml_latest, "ml-latest").events)
    assert str(caught.value).startswith(f"{ml_latest / message}")
    assert "\n" not in str(caught.value) and "pydantic.dev" not in str(caught.value)
    assert len(str(caught.value)) < len(str(ml_latest)) + 200


def test_ml100k_lines_are_decoded_one_by_one(tmp_path: Path) -> None:
    # Re-saved as UTF-8 but for one title left in Latin-1: each title reads as written.
    folder = write_folder(tmp_path, [("1", "1", 5, 100)])
    lines = (folder / "u.item").read_bytes().decode("latin-1").splitlines(keepends=True)
    utf8 = "".join(lines[1:]).encode("utf-8")
    (folder / "u.item").write_bytes(lines[0].encode("latin-1") + utf8)
    titles = [item.title for item in read_ml100k(folder).items]
    assert titles[:2] == ["Café 1 (1995)", "Café 2 (1995)"]


def test_a_bad_rating_after_the_first_batch_writes_nothing(tmp_path: Path, loaded) -> None:
    rows = [(str(u), str(i), 4, u * 10 + i) for u in range(1, 301) for i in range(1, 6)]
    rows[1203] = (*rows[1203][:2], 0, rows[1203][3])  # line 1204, after the first 1000 events
    folder = write_folder(tmp_path, rows)
    with pytest.raises(LoadError, match=r"u\.data line 1204: "):
        loaded.write(read_checked(read_ml100k, folder, "ml-100k"))
    assert loaded.snapshot() == {"items": 0, "users": 0, "events": 0, "pop": []}
    assert not loaded.redis.exists(loaded.keys.loading)


def test_an_unknown_item_after_the_first_batch_writes_nothing(tmp_path: Path, loaded) -> None:
    rows = [(str(u), str(i), 4, u * 10 + i) for u in range(1, 301) for i in range(1, 6)]
    rows.append(("1", "999", 4, 5000))
    folder = write_folder(tmp_path, rows)
    with pytest.raises(LoadError, match=r"1 event\(s\) .* user 1 -> item 999; nothing was written"):
        loaded.write(read_checked(read_ml100k, folder, "ml-100k"))
    assert loaded.snapshot() == {"items": 0, "users": 0, "events": 0, "pop": []}
    assert not loaded.redis.exists(loaded.keys.loading)


def test_ml100k_without_genres_names_u_genre(tmp_path: Path) -> None:
    """Not u.item's line 1, whose genre flags would all be 'extra fields'."""
    folder = write_folder(tmp_path, [("1", "1", 5, 100)])
    (folder / "u.genre").write_text("\n")
    with pytest.raises(LoadError, match=r"u\.genre lists no genres$"):
        read_ml100k(folder)
