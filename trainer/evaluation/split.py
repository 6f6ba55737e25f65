"""The offline split of `shared/docs/EVAL.md`: per user, last interaction = test, second last =
validation, the rest = training; plus the item facts the metrics need (categories, popularity).

Every rating event is an interaction, whatever its value. Each user's interactions are stably
sorted by timestamp, so events with the same timestamp keep their order in the source file. Users
with fewer than 3 interactions are skipped altogether: their events are not training data either
(EVAL.md is silent; no ML-100K user has fewer than 20).
"""

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np


class Interaction(NamedTuple):
    user: str
    item: str
    timestamp: int


def id_order(value: str) -> tuple[int, int, str]:
    """Sort key: numeric ids ascending as integers, then any other ids as strings."""
    return (0, int(value), "") if value.isdigit() else (1, 0, value)


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


def read_interactions(path: Path) -> list[Interaction]:
    """The rows of an ML-100K `u.data` file (user, item, rating, timestamp), in file order."""
    rows = []
    with path.open(encoding="latin-1") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 4:
                raise ValueError(f"{path}:{number}: expected 4 tab-separated fields")
            rows.append(Interaction(fields[0], fields[1], int(fields[3])))
    return rows


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


def read_categories(folder: Path) -> dict[str, frozenset[str]]:
    """Genre sets per item from ML-100K `u.item` and `u.genre` (Latin-1)."""
    genre_lines = (folder / "u.genre").read_text(encoding="latin-1").splitlines()
    genres = [line.split("|")[0] for line in genre_lines if line.strip()]
    categories = {}
    for line in (folder / "u.item").read_text(encoding="latin-1").splitlines():
        if line.strip():
            fields = line.split("|")
            flags = fields[5 : 5 + len(genres)]
            # not strict: a row cut short simply lacks the genres at its end
            categories[fields[0]] = frozenset(
                genre for genre, flag in zip(genres, flags, strict=False) if flag == "1"
            )
    return categories


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


def load_split(folder: Path) -> Split:
    """The split of an ML-100K folder (`u.data`, `u.item`, `u.genre`), named after the folder."""
    return build_split(folder.name, read_interactions(folder / "u.data"), read_categories(folder))


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
