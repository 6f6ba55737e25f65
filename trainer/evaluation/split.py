"""The offline split of `shared/docs/EVAL.md`: per user, last interaction = test, second last =
validation, the rest = training; plus the item facts the metrics need (categories, popularity).

The data is read once, by the loaders `reasonrec load` uses (`server.loaders`): the split and the
events `reasonrec eval` writes into its store come from that one reading, so they cannot disagree.
An interaction is a consumption event (`trainer.corpus.INTERACTIONS`: click, like, purchase, or a
rating whatever its value); impressions, skips and dislikes are ignored. Each user's interactions
are stably sorted by timestamp, so events with the same timestamp keep their order in the source
file. Users with fewer than 3 interactions are skipped altogether: their events are not training
data either (EVAL.md is silent; no ML-100K user has fewer than 20).
"""

import hashlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np

from server.loaders import Dataset, Format, LoadError, id_order, read_checked
from server.loaders.jsonl import read_jsonl
from server.loaders.movielens import read_ml100k, read_ml_latest
from server.registry import BROUGHT_IN, REFRESH_METHOD, Manifest
from server.schemas import FeedbackEvent, ItemUpsert, UserUpsert
from trainer.corpus import INTERACTIONS


class EvalFormat(StrEnum):
    """The `Format`s that hold recorded interactions (synthetic data has no claim to check)."""

    ml_100k = Format.ml_100k.value
    ml_latest = Format.ml_latest.value
    jsonl = Format.jsonl.value


READERS: dict[EvalFormat, Callable[[Path], Dataset]] = {
    EvalFormat.ml_100k: read_ml100k,
    EvalFormat.ml_latest: read_ml_latest,
    EvalFormat.jsonl: read_jsonl,
}


class Interaction(NamedTuple):
    user: str
    item: str
    timestamp: float
    """Seconds since the epoch."""


@dataclass(frozen=True)
class Split:
    """Training sequences, validation and test items per user, and the catalog they come from.

    `train[user]` is time ordered, oldest first. `popularity` counts training interactions per
    item and holds every catalog item (0 for items nobody trained on). `categories` holds every
    catalog item (an empty set when it has none).
    """

    dataset: str
    catalog: tuple[str, ...]
    train: Mapping[str, tuple[str, ...]]
    validation: Mapping[str, str]
    test: Mapping[str, str]
    categories: Mapping[str, frozenset[str]]
    popularity: Mapping[str, int]

    @cached_property
    def users(self) -> tuple[str, ...]:
        """Evaluated users, ascending (as integers where ids are numeric)."""
        return tuple(sorted(self.train, key=id_order))

    @cached_property
    def trained_on(self) -> str:
        """What a manifest says of a model trained on this split (`trained_on`), e.g.
        `ml-100k:ml-100k:eval-train-split:3f2a9c1b0d4e`: a model trained on anything else may
        have seen the tests. The last part is a digest of the training interactions: another
        data set under the same folder name is another split."""
        digest = hashlib.sha256()
        for user in self.users:
            digest.update("\x1f".join((user, *self.train[user])).encode() + b"\x1e")
        return f"{self.dataset}:eval-train-split:{digest.hexdigest()[:12]}"

    def check_unseen(self, manifest: Manifest) -> None:
        """Raises ValueError unless the model was trained on this split's training part or
        brought in untrained on it (`models register`, `models import-gguf`)."""
        method = manifest.training.get("method")
        # A refresh trained on live feedback; those published before 2026-12-06 still name
        # their parent's split.
        same = manifest.trained_on == self.trained_on and method != REFRESH_METHOD
        # Brought in from outside (`models register`, `models import-gguf`): trained on nothing
        # of the eval's data.
        if same or (manifest.trained_on is None and method in BROUGHT_IN):
            return
        seen = manifest.trained_on or "data this run cannot tell (it was not trained by eval)"
        raise ValueError(
            f"model {manifest.version} was trained on {seen}, not on {self.trained_on}: "
            "its scores could count the very items it was trained on"
        )

    @cached_property
    def training_interactions(self) -> int:
        return sum(self.popularity.values())

    @cached_property
    def catalog_set(self) -> frozenset[str]:
        return frozenset(self.catalog)

    def history(self, user: str) -> tuple[str, ...]:
        """What is known of the user when the test interaction happens: training + validation."""
        if user not in self.validation:
            return ()
        return (*self.train[user], self.validation[user])

    def seen(self, user: str) -> frozenset[str]:
        """The items a system must not rank for this user (training and validation items)."""
        return frozenset(self.history(user))

    def repeated_test(self, user: str) -> bool:
        """Whether the user's test item is also one of their earlier ones (a re-watch, a click
        then a purchase): ranking excludes seen items, so every system scores 0 for them."""
        return self.test[user] in self.seen(user)


def split_interactions(
    interactions: Iterable[Interaction],
) -> tuple[dict[str, tuple[str, ...]], dict[str, str], dict[str, str]]:
    """(train, validation, test) per user, by the rules in the module docstring."""
    by_user: dict[str, list[Interaction]] = defaultdict(list)
    for row in interactions:
        by_user[row.user].append(row)
    train, validation, test = {}, {}, {}
    for user, rows in by_user.items():
        if len(rows) < 3:
            continue
        # sorted() is stable: equal timestamps keep the file order the list was built in
        items = [row.item for row in sorted(rows, key=lambda row: row.timestamp)]
        train[user], validation[user], test[user] = tuple(items[:-2]), items[-2], items[-1]
    return train, validation, test


def build_split(
    dataset: str, interactions: Sequence[Interaction], categories: Mapping[str, frozenset[str]]
) -> Split:
    """A `Split` from interactions in source order; the catalog is every item in either input."""
    train, validation, test = split_interactions(interactions)
    catalog = tuple(sorted(set(categories) | {row.item for row in interactions}, key=id_order))
    counts = Counter(item for items in train.values() for item in items)
    return Split(
        dataset=dataset,
        catalog=catalog,
        train=train,
        validation=validation,
        test=test,
        categories={item: frozenset(categories.get(item, ())) for item in catalog},
        popularity={item: counts.get(item, 0) for item in catalog},
    )


@dataclass(frozen=True)
class EvalData:
    """One reading of a data set: its split, and what the eval's store is loaded with."""

    split: Split
    items: list[ItemUpsert]
    users: list[UserUpsert]
    timelines: dict[str, list[FeedbackEvent]]
    """Per user, the interaction events in the split's order (time, ties in file order)."""

    def unrated_tests(self, users: Iterable[str]) -> list[str]:
        """Those of `users` whose test interaction has no rating value to predict."""
        return [user for user in users if self.timelines[user][-1].value is None]


def read_eval_data(path: Path, fmt: EvalFormat = EvalFormat.ml_100k) -> EvalData:
    """Read `path` once; raises `LoadError` saying what is wrong with missing or unusable data.

    The split is named `FORMAT:NAME` (e.g. `ml-latest:ml-latest-small`) after what was read.
    """
    fmt = EvalFormat(fmt)  # a plain string names the same format
    dataset, events = _read(path, fmt)
    interactions = interaction_events(events)
    _check_interactions(path, dataset.items, interactions)
    categories = {item.item_id: frozenset(item.categories) for item in dataset.items}
    rows = [_interaction(event) for event in interactions]
    split = build_split(f"{fmt}:{path.resolve().name}", rows, categories)
    if not split.test:
        raise LoadError(f"{path}: no user has 3 or more interactions, nothing to evaluate")
    return EvalData(split, dataset.items, dataset.users, timelines(interactions))


def load_split(path: Path, fmt: EvalFormat = EvalFormat.ml_100k) -> Split:
    return read_eval_data(path, fmt).split


def _read(path: Path, fmt: EvalFormat) -> tuple[Dataset, list[FeedbackEvent]]:
    if fmt is not EvalFormat.jsonl and not path.is_dir():
        raise LoadError(f"{path} is not a folder (--format {fmt} reads a folder of files)")
    dataset = read_checked(READERS[fmt], path, fmt)
    return dataset, list(dataset.events)


def interaction_events(events: Iterable[FeedbackEvent]) -> list[FeedbackEvent]:
    """The consumption events in file order, each user's event id once (the store keeps the
    first: event ids are each user's own)."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for event in events:
        key = (event.user_id, event.event_id or "")
        if event.type not in INTERACTIONS or key in seen:
            continue
        kept.append(event)
        if event.event_id:
            seen.add(key)
    return kept


def _check_interactions(
    path: Path, items: Sequence[ItemUpsert], events: Sequence[FeedbackEvent]
) -> None:
    """Refuse, before any store work, what the protocol or the store cannot take."""
    if not items:
        raise LoadError(f"{path}: no items, so no catalog to rank")
    # the schema fills a missing timestamp with the load time, which is no order at all
    if untimed := [e for e in events if "timestamp" not in e.model_fields_set]:
        raise LoadError(
            f"{path}: {len(untimed)} interaction(s) have no timestamp, e.g. user "
            f"{untimed[0].user_id} -> item {untimed[0].item_id}; the split orders by time"
        )
    known = {item.item_id for item in items}
    if unknown := [e for e in events if e.item_id not in known]:
        raise LoadError(
            f"{path}: {len(unknown)} interaction(s) name items that are not in the catalog, "
            f"e.g. user {unknown[0].user_id} -> item {unknown[0].item_id}"
        )


def _moment(event: FeedbackEvent) -> float:
    return event.timestamp.timestamp()


def _interaction(event: FeedbackEvent) -> Interaction:
    return Interaction(event.user_id, event.item_id, _moment(event))


def timelines(events: Iterable[FeedbackEvent]) -> dict[str, list[FeedbackEvent]]:
    """Each user's events sorted as `split_interactions` sorts them (stable, on the same key)."""
    by_user: dict[str, list[FeedbackEvent]] = defaultdict(list)
    for event in events:
        by_user[event.user_id].append(event)
    for user_events in by_user.values():
        user_events.sort(key=_moment)
    return dict(by_user)


def sample_users(split: Split, n: int, seed: int) -> list[str]:
    """N users drawn uniformly without replacement, returned in `split.users` order.

    The draw is `numpy.random.default_rng(seed).choice(len(split.users), n, replace=False)` over
    the sorted user list, so a seed names the same users on every machine. N at or above the
    number of users means a full run: every user.
    """
    if n < 0:
        raise ValueError(f"the number of users must be >= 0, got {n}")
    users = split.users
    if n >= len(users):
        return list(users)
    chosen = np.random.default_rng(seed).choice(len(users), size=n, replace=False)
    return [users[i] for i in sorted(chosen)]
