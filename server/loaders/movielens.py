"""MovieLens readers: the 100K release (u.data, u.item, u.user) and ml-latest (CSV files).

Ratings become `rating` events with their original timestamps and a deterministic event id, so
loading the same files twice stores every rating once.
"""

import csv
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from server.loaders import Dataset, LoadError, id_order
from server.schemas import EventType, FeedbackEvent, ItemUpsert, UserUpsert

_YEAR = re.compile(r"\((\d{4})\)\s*$")
MAX_TAGS = 20


def _require(path: Path, *names: str) -> None:
    missing = [name for name in names if not (path / name).is_file()]
    if missing:
        raise LoadError(f"{path} is missing {', '.join(missing)}")


def _rating(source: str, user: str, item: str, value: str, ts: str) -> FeedbackEvent:
    return FeedbackEvent(
        user_id=user,
        item_id=item,
        type=EventType.rating,
        value=float(value),
        timestamp=datetime.fromtimestamp(int(ts), UTC),
        event_id=f"{source}:{user}:{item}:{ts}",
    )


def _text(path: Path) -> str:
    """A file of the 100K release: Latin-1 as shipped, UTF-8 where someone re-saved it (titles
    would otherwise read 'MisÃ©rables'), without a byte order mark (which would otherwise be
    read into the first id)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for _ in handle)


# ML-100K -------------------------------------------------------------------------------------


def read_ml100k(path: Path) -> Dataset:
    _require(path, "u.data", "u.item", "u.user", "u.genre")
    data = path / "u.data"
    return Dataset(
        items=_ml100k_items(path),
        users=_ml100k_users(path),
        events=_ml100k_ratings(data),
        event_count=_count_lines(data),
    )


def _ml100k_genres(path: Path) -> list[str]:
    lines = _text(path / "u.genre").splitlines()
    return [line.split("|")[0] for line in lines if line.strip()]


def _ml100k_items(path: Path) -> list[ItemUpsert]:
    genres = _ml100k_genres(path)
    items = []
    for line in _text(path / "u.item").splitlines():
        if not line.strip():
            continue
        fields = line.split("|")
        item_id, title, released, _, url = fields[:5]
        flags = fields[5 : 5 + len(genres)]
        released_at = (
            datetime.strptime(released, "%d-%b-%Y").replace(tzinfo=UTC) if released else None
        )
        attributes: dict[str, str | int] = {"imdb_url": url} if url else {}
        if released_at:
            attributes["year"] = released_at.year
        items.append(
            ItemUpsert(
                item_id=item_id,
                title=title,
                categories=[
                    genre for genre, flag in zip(genres, flags, strict=True) if flag == "1"
                ],
                attributes=attributes,
                created_at=released_at,
            )
        )
    return items


def _ml100k_users(path: Path) -> list[UserUpsert]:
    users = []
    for line in _text(path / "u.user").splitlines():
        if line.strip():
            user_id, age, gender, occupation, zip_code = line.split("|")
            attributes = {"age": int(age), "gender": gender, "occupation": occupation}
            users.append(UserUpsert(user_id=user_id, attributes=attributes | {"zip": zip_code}))
    return users


def _ml100k_ratings(data: Path) -> Iterator[FeedbackEvent]:
    for line in _text(data).splitlines():  # 2 MB: read at once
        if line.strip():
            user, item, value, ts = line.split("\t")
            yield _rating("ml-100k", user, item, value, ts.strip())


# ml-latest -----------------------------------------------------------------------------------


def read_ml_latest(path: Path) -> Dataset:
    _require(path, "ratings.csv", "movies.csv")
    ratings = path / "ratings.csv"
    tags = _ml_latest_tags(path / "tags.csv")
    return Dataset(
        items=_ml_latest_items(path / "movies.csv", tags),
        users=[UserUpsert(user_id=user) for user in _ml_latest_users(ratings)],
        events=_ml_latest_ratings(ratings),
        event_count=max(_count_lines(ratings) - 1, 0),
    )


def _rows(path: Path) -> Iterator[dict[str, str]]:
    """The rows of a CSV file (a byte order mark, as spreadsheets write, skipped)."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            if None in row.values():
                raise ValueError(
                    f"{path.name} line {reader.line_num}: fewer fields than its header"
                )
            yield row


def _ml_latest_tags(path: Path) -> dict[str, list[str]]:
    """The most used tags of each movie (tags.csv is optional)."""
    if not path.is_file():
        return {}
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for row in _rows(path):
        tag = row["tag"].strip()
        if tag:
            counts[row["movieId"]][tag.lower()] += 1
    return {movie: [tag for tag, _ in c.most_common(MAX_TAGS)] for movie, c in counts.items()}


def _ml_latest_items(path: Path, tags: dict[str, list[str]]) -> list[ItemUpsert]:
    items = []
    for row in _rows(path):
        genres = [] if row["genres"] == "(no genres listed)" else row["genres"].split("|")
        attributes: dict[str, str | int] = {}
        if year := _YEAR.search(row["title"]):
            attributes["year"] = int(year.group(1))
        if row["movieId"] in tags:
            attributes["tags"] = ", ".join(tags[row["movieId"]])
        items.append(
            ItemUpsert(
                item_id=row["movieId"], title=row["title"], categories=genres, attributes=attributes
            )
        )
    return items


def _ml_latest_users(ratings: Path) -> list[str]:
    return sorted({row["userId"] for row in _rows(ratings)}, key=id_order)


def _ml_latest_ratings(ratings: Path) -> Iterator[FeedbackEvent]:
    for row in _rows(ratings):
        yield _rating("ml-latest", row["userId"], row["movieId"], row["rating"], row["timestamp"])
