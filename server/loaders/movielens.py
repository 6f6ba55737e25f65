"""MovieLens readers: the 100K release (u.data, u.item, u.user) and ml-latest (CSV files).

Ratings become `rating` events with their original timestamps and a deterministic event id, so
loading the same files twice stores every rating once. A line that cannot be read fails the load
with a message naming the file and the line.
"""

import codecs
import csv
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from server.loaders import Dataset, LoadError, Replay, at_line
from server.schemas import (
    MAX_ATTRIBUTE_CHARS,
    EventType,
    FeedbackEvent,
    ItemUpsert,
    UserUpsert,
)

_YEAR = re.compile(r"\((\d{4})\)\s*$")
MAX_TAGS = 20
TAG_SEPARATOR = ", "


def _require(path: Path, *names: str) -> None:
    if not path.is_dir():  # a mistyped path: not a folder "missing" every file
        raise LoadError(f"{path} is not a folder" if path.exists() else f"{path} does not exist")
    missing = [name for name in names if not (path / name).is_file()]
    if missing:
        raise LoadError(f"{path} is missing {', '.join(missing)}")


def _rating(source: str, user: str, item: str, value: str, ts: str) -> FeedbackEvent:
    return FeedbackEvent(
        user_id=user,
        item_id=item,
        type=EventType.rating,
        value=float(value),
        timestamp=_time(ts),
        event_id=f"{source}:{user}:{item}:{ts}",
    )


def _time(seconds: str) -> datetime:
    try:
        return datetime.fromtimestamp(int(seconds), UTC)
    except (ValueError, OverflowError, OSError) as exc:
        raise ValueError(f"timestamp {seconds!r} is not whole seconds since 1970") from exc


def _fields(line: str, separator: str, count: int) -> list[str]:
    fields = line.split(separator)
    if len(fields) != count:
        raise ValueError(f"expected {count} fields separated by {separator!r}, got {len(fields)}")
    return fields


def _count_lines(path: Path) -> int:
    """The lines that hold something, as the CSV reader reads them (it skips blank ones)."""
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


# ML-100K -------------------------------------------------------------------------------------


def read_ml100k(path: Path) -> Dataset:
    _require(path, "u.data", "u.item", "u.user", "u.genre")
    data = path / "u.data"
    return Dataset(
        items=_ml100k_items(path),
        users=_ml100k_users(path / "u.user"),
        events=Replay(lambda: _ml100k_ratings(data)),
        # As they are read: a file saved with bare CR line ends counted as one line, and a
        # data set the events stream would trim passed the size check.
        event_count=sum(1 for _ in _lines(data)),
    )


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """The non-blank lines of a 100K release file and their numbers. Each line is decoded on its
    own: Latin-1 as shipped, UTF-8 where someone re-saved it (titles would otherwise read
    'MisÃ©rables'), so one stray Latin-1 byte garbles only its own line; without a byte order
    mark (which would otherwise be read into the first id)."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)  # 2 MB at most: read at once
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            line = raw.decode("latin-1")
        if line.strip():
            yield number, line


def _ml100k_genres(path: Path) -> list[str]:
    genres = [line.split("|")[0] for _, line in _lines(path)]
    if not genres:  # else every u.item line would be blamed for its genre flags
        raise LoadError(f"{path} lists no genres")
    return genres


def _ml100k_items(path: Path) -> list[ItemUpsert]:
    genres = _ml100k_genres(path / "u.genre")
    items = []
    for number, line in _lines(path / "u.item"):
        with at_line(path / "u.item", number):
            items.append(_ml100k_item(_fields(line, "|", 5 + len(genres)), genres))
    return items


def _ml100k_item(fields: list[str], genres: list[str]) -> ItemUpsert:
    item_id, title, released, _, url = fields[:5]
    released_at = _release_date(released) if released else None
    attributes: dict[str, str | int] = {"imdb_url": url} if url else {}
    if released_at:
        attributes["year"] = released_at.year
    return ItemUpsert(
        item_id=item_id,
        title=title,
        categories=[genre for genre, flag in zip(genres, fields[5:], strict=True) if flag == "1"],
        attributes=attributes,
        created_at=released_at,
    )


def _release_date(text: str) -> datetime:
    try:
        return datetime.strptime(text, "%d-%b-%Y").replace(tzinfo=UTC)
    except ValueError as exc:
        raise ValueError(f"release date {text!r} is not a day like 01-Jan-1995") from exc


def _ml100k_users(path: Path) -> list[UserUpsert]:
    users = []
    for number, line in _lines(path):
        with at_line(path, number):
            user_id, age, gender, occupation, zip_code = _fields(line, "|", 5)
            attributes = {"age": int(age), "gender": gender, "occupation": occupation}
            users.append(UserUpsert(user_id=user_id, attributes=attributes | {"zip": zip_code}))
    return users


def _ml100k_ratings(data: Path) -> Iterator[FeedbackEvent]:
    for number, line in _lines(data):
        with at_line(data, number):
            user, item, value, ts = _fields(line, "\t", 4)
            event = _rating("ml-100k", user, item, value, ts.strip())
        yield event


# ml-latest -----------------------------------------------------------------------------------


def read_ml_latest(path: Path) -> Dataset:
    _require(path, "ratings.csv", "movies.csv")
    ratings = path / "ratings.csv"
    tags = _ml_latest_tags(path / "tags.csv")
    return Dataset(
        items=_ml_latest_items(path / "movies.csv", tags),
        # No profiles: its users come with their ratings. Written as users, each would have
        # replaced the attributes of a user of that id already in the store with none.
        users=[],
        events=Replay(lambda: _ml_latest_ratings(ratings)),
        event_count=max(_count_lines(ratings) - 1, 0),
    )


def _rows(path: Path, *columns: str) -> Iterator[tuple[int, dict[str, str]]]:
    """The rows of a CSV file that has `columns`, each with the line it ends on. A row with more
    or fewer fields than the header is an error: with more, a title holding an unquoted comma
    would be cut short and its tail read as the next column. So is a row over several lines:
    MovieLens writes none, and a quote left open would take the rows after it into one title."""
    with path.open("rb") as handle:
        reader = csv.DictReader(_decoded(path, handle))
        with at_line(path, 1):
            if missing := [name for name in columns if name not in (reader.fieldnames or ())]:
                raise ValueError(f"the header has no column {', '.join(missing)}")
        try:
            for row in reader:
                # The line breaks a quote took in (a blank line between rows is skipped).
                if breaks := sum(value.count("\n") for value in row.values() if value):
                    line = reader.line_num - breaks
                    raise LoadError(f"{path} line {line}: a quote opened here is not closed on it")
                if None in row:
                    raise LoadError(f"{path} line {reader.line_num}: more fields than its header")
                if None in row.values():
                    raise LoadError(f"{path} line {reader.line_num}: fewer fields than its header")
                yield reader.line_num, row
        except csv.Error as exc:
            raise LoadError(f"{path} line {reader.line_num}: {exc}") from exc


def _decoded(path: Path, handle: BinaryIO) -> Iterator[str]:
    """The lines of a UTF-8 file, a byte order mark (as spreadsheets write) skipped."""
    for number, raw in enumerate(handle, start=1):
        with at_line(path, number):
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        yield line


def _ml_latest_tags(path: Path) -> dict[str, str]:
    """Each movie's tags as one attribute (tags.csv is optional)."""
    if not path.is_file():
        return {}
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for _, row in _rows(path, "movieId", "tag"):
        if tag := row["tag"].strip():
            counts[row["movieId"]][tag.lower()] += 1
    joined = {
        movie: _joined([tag for tag, _ in c.most_common(MAX_TAGS)]) for movie, c in counts.items()
    }
    return {movie: tags for movie, tags in joined.items() if tags}


def _joined(tags: Iterable[str]) -> str:
    """The tags, most used first, for as long as they fit in an attribute value: a longer value
    would fail the whole item."""
    joined = ""
    for tag in tags:
        longer = f"{joined}{TAG_SEPARATOR}{tag}" if joined else tag
        if len(longer) > MAX_ATTRIBUTE_CHARS:
            break
        joined = longer
    return joined


def _ml_latest_items(path: Path, tags: dict[str, str]) -> list[ItemUpsert]:
    items = []
    for number, row in _rows(path, "movieId", "title", "genres"):
        with at_line(path, number):
            items.append(_ml_latest_item(row, tags.get(row["movieId"])))
    return items


def _ml_latest_item(row: dict[str, str], tags: str | None) -> ItemUpsert:
    genres = [] if row["genres"] == "(no genres listed)" else row["genres"].split("|")
    attributes: dict[str, str | int] = {}
    if year := _YEAR.search(row["title"]):
        attributes["year"] = int(year.group(1))
    if tags:
        attributes["tags"] = tags
    return ItemUpsert(
        item_id=row["movieId"], title=row["title"], categories=genres, attributes=attributes
    )


_RATING_COLUMNS = ("userId", "movieId", "rating", "timestamp")


def _ml_latest_ratings(ratings: Path) -> Iterator[FeedbackEvent]:
    for number, row in _rows(ratings, *_RATING_COLUMNS):
        with at_line(ratings, number):
            event = _rating(
                "ml-latest", row["userId"], row["movieId"], row["rating"], row["timestamp"]
            )
        yield event
