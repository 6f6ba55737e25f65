"""Readers that turn a data set on disk (or a seeded generator) into items, users and events.

Every reader returns a `Dataset`; `server.loaders.writer` writes it through the same `Store`
methods the API uses, so loaded data and live data are indistinguishable.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

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
