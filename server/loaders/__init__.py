"""Readers that turn a data set on disk (or a seeded generator) into items, users and events.

Every reader returns a `Dataset`; `server.loaders.writer` writes it through the same `Store`
methods the API uses, so loaded data and live data are indistinguishable.
"""

import csv
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

from server.schemas import FeedbackEvent, ItemUpsert, UserUpsert


class Format(StrEnum):
    ml_100k = "ml-100k"
    ml_latest = "ml-latest"
    jsonl = "jsonl"
    synthetic = "synthetic"


@dataclass
class Dataset:
    items: list[ItemUpsert]
    users: list[UserUpsert]
    events: Iterable[FeedbackEvent]
    event_count: int | None = None
    """How many events `events` yields, when known up front (for the progress bar)."""


class LoadError(Exception):
    """The input cannot be loaded; the message says where and why."""


def id_order(value: str) -> tuple[int, int, str]:
    """Sort key of ids: numeric ones ascending as integers, then any others as strings."""
    return (0, int(value), "") if value.isascii() and value.isdigit() else (1, 0, value)


_PARSE_ERRORS = (OSError, ValueError, KeyError, TypeError, csv.Error)
"""What the readers' parsers raise on a malformed file (they let them through)."""


def read_checked(reader: Callable[[Path], Dataset], path: Path, fmt: str) -> Dataset:
    """`reader(path)` with its parsers' errors, also those of events parsed lazily as they are
    read, raised as a LoadError that names the file and the event: a message, not a traceback."""
    try:
        dataset = reader(path)
    except _PARSE_ERRORS as exc:
        raise _unreadable(path, fmt, "items and users", exc) from exc
    return replace(dataset, events=_checked(dataset.events, path, fmt))


def _checked(events: Iterable[FeedbackEvent], path: Path, fmt: str) -> Iterator[FeedbackEvent]:
    read = 0
    try:
        for event in events:
            read += 1
            yield event
    except _PARSE_ERRORS as exc:
        raise _unreadable(path, fmt, f"event {read + 1}", exc) from exc


def _unreadable(path: Path, fmt: str, where: str, exc: Exception) -> LoadError:
    return LoadError(f"{path}: cannot read it as {fmt}: {where}: {type(exc).__name__}: {exc}")
