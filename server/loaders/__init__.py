"""Readers that turn a data set on disk (or a seeded generator) into items, users and events.

Every reader returns a `Dataset`; `server.loaders.writer` writes it through the same `Store`
methods the API uses, so loaded data and live data are indistinguishable.
"""

import csv
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

from pydantic import ValidationError

from server.logs import problems
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
    """Walked twice by the writer (checked in full, then written): a list, or a `Replay`."""
    event_count: int | None = None
    """How many events `events` yields, when known up front (for the progress bar)."""


@dataclass(frozen=True)
class Replay:
    """Events read again from their source each time they are walked: a file too large to hold
    in memory can still be checked in full before anything of it is written."""

    read: Callable[[], Iterator[FeedbackEvent]]

    def __iter__(self) -> Iterator[FeedbackEvent]:
        return self.read()


class LoadError(Exception):
    """The input cannot be loaded; the message says where and why."""


def id_order(value: str) -> tuple[int, int, str]:
    """Sort key of ids: numeric ones ascending as integers, then any others as strings."""
    return (0, int(value), "") if value.isascii() and value.isdigit() else (1, 0, value)


_PARSE_ERRORS = (OSError, ValueError, KeyError, TypeError, OverflowError, csv.Error)
"""What parsing a malformed file raises (pydantic's ValidationError is a ValueError)."""


def describe(exc: Exception) -> str:
    """An error on one line: pydantic's list of errors without its echo of the input and its
    help links, which would bury the reason under lines of text."""
    return problems(exc, whole="record") if isinstance(exc, ValidationError) else str(exc)


@contextmanager
def at_line(path: Path, number: int) -> Iterator[None]:
    """What goes wrong parsing line `number` of `path`, raised as a LoadError naming both."""
    try:
        yield
    except _PARSE_ERRORS as exc:
        raise LoadError(f"{path} line {number}: {describe(exc)}") from exc


def read_checked(reader: Callable[[Path], Dataset], path: Path, fmt: str) -> Dataset:
    """`reader(path)` with the errors its parsers let through, also those of events read lazily,
    raised as a LoadError that names the file: a message, not a traceback."""
    try:
        dataset = reader(path)
    except _PARSE_ERRORS as exc:
        raise _unreadable(path, fmt, "items and users", exc) from exc
    events = dataset.events
    return replace(dataset, events=Replay(lambda: _checked(events, path, fmt)))


def _checked(events: Iterable[FeedbackEvent], path: Path, fmt: str) -> Iterator[FeedbackEvent]:
    try:
        yield from events
    except _PARSE_ERRORS as exc:
        raise _unreadable(path, fmt, "events", exc) from exc


def _unreadable(path: Path, fmt: str, where: str, exc: Exception) -> LoadError:
    return LoadError(
        f"{path}: cannot read it as {fmt}: {where}: {type(exc).__name__}: {describe(exc)}"
    )
