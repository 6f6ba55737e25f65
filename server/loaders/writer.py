"""Write a `Dataset` into the store in batches, with a progress bar per kind of record."""

from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import TypeVar

from pydantic import BaseModel
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from server.loaders import Dataset, LoadError
from server.store import Store, UnknownItems

BATCH = 1000
T = TypeVar("T")


class LoadSummary(BaseModel):
    items: int
    users: int
    events: int
    duplicates: int


def batched(records: Iterable[T], size: int = BATCH) -> Iterator[list[T]]:
    iterator = iter(records)
    while batch := list(islice(iterator, size)):
        yield batch


def progress_bar(console: Console | None = None) -> Progress:
    return Progress(
        TextColumn("{task.description:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
    )


async def write(store: Store, dataset: Dataset, progress: Progress) -> LoadSummary:
    """Write everything; the store says a load is unfinished until the last event is written
    (writing again is harmless: items and users are overwritten, events de-duplicated)."""
    await store.begin_load()
    await _write_all(store.upsert_items, dataset.items, "items", progress)
    await _write_all(store.upsert_users, dataset.users, "users", progress)
    task = progress.add_task("events", total=dataset.event_count)
    stored = duplicates = 0
    for batch in batched(dataset.events):
        try:
            # Loaded event ids are remembered for good: loading the same file again, even
            # months later, must change nothing.
            flags = await store.add_feedback(batch, dedup_ttl_seconds=0)
        except UnknownItems as exc:
            first = batch[exc.indexes[0]]
            raise LoadError(
                f"{len(exc.indexes)} event(s) name items that are not in the catalog, "
                f"e.g. user {first.user_id} -> item {first.item_id}; that batch was not written"
            ) from exc
        stored += sum(flags)
        duplicates += len(flags) - sum(flags)
        progress.advance(task, len(batch))
    await store.end_load()
    return LoadSummary(
        items=len(dataset.items), users=len(dataset.users), events=stored, duplicates=duplicates
    )


async def _write_all(write_batch, records: Sequence, label: str, progress: Progress) -> None:
    task = progress.add_task(label, total=len(records))
    for batch in batched(records):
        await write_batch(batch)
        progress.advance(task, len(batch))
