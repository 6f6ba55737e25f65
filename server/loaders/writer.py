"""Write a `Dataset` into the store in batches, with a progress bar per kind of record."""

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import TypeVar

from pydantic import BaseModel
from redis.exceptions import RedisError
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
from server.schemas import FeedbackEvent
from server.store import Store, UnknownItems

BATCH = 1000
T = TypeVar("T")


class LoadSummary(BaseModel):
    items: int
    users: int
    """Those with a profile in the data set and those with events only (ml-latest has no
    profiles)."""
    events: int
    duplicates: int
    trimmed: int = 0
    """Older events the stream dropped to keep to REASONREC_EVENTS_MAXLEN as this load added
    its own (at least this many: a gateway adding events meanwhile hides some)."""


@dataclass
class Written:
    """How far a load got, kept by the process that runs it: one stopped part way says so from
    this, not from the store's marker, which another load finishing at the same time clears."""

    began: bool = False
    events: int = 0


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


async def write(
    store: Store, dataset: Dataset, progress: Progress, written: Written | None = None
) -> LoadSummary:
    """Check every event, then write everything; the store says a load is unfinished until the
    last event is written (writing again is harmless: items and users are overwritten, events
    de-duplicated), and `written` says how far this one got."""
    written = written or Written()
    await _check_events(store, dataset, progress)
    kept = await store.events_kept()
    written.began = True  # before the marker: a Ctrl-C during its round trip may follow it
    await store.begin_load()
    stored = duplicates = 0
    users = {user.user_id for user in dataset.users}  # and those who come with their events
    try:
        await _write_all(store.upsert_items, dataset.items, "items", progress)
        await _write_all(store.upsert_users, dataset.users, "users", progress)
        task = progress.add_task("events", total=dataset.event_count)
        for batch in batched(dataset.events):
            # Loaded event ids are remembered for good: loading the same file again, even
            # months later, must change nothing.
            flags = await store.add_feedback(batch, dedup_ttl_seconds=0)
            stored += sum(flags)
            duplicates += len(flags) - sum(flags)
            written.events = stored + duplicates
            users.update(event.user_id for event in batch)
            progress.advance(task, len(batch))
    except UnknownItems as exc:  # an item gone from the store since the check
        first = batch[exc.indexes[0]]
        raise LoadError(
            f"user {first.user_id} -> item {first.item_id}: the item is no longer in the "
            f"catalog; {_unfinished(written.events)}"
        ) from exc
    # Found only as it writes: a file changed since the check, data of the store it cannot
    # use, Redis gone. Said as what it is: the store holds part of the load.
    except (LoadError, RedisError) as exc:  # UnreadableStoredData is a RedisError
        raise LoadError(f"{exc}; {_unfinished(written.events)}") from exc
    await store.end_load()
    # Distinct ids: a record given twice is stored once (the later one wins).
    return LoadSummary(
        items=len({item.item_id for item in dataset.items}),
        users=len(users),
        events=stored,
        duplicates=duplicates,
        trimmed=max(kept + stored - await store.events_kept(), 0),
    )


def _unfinished(events: int) -> str:
    return (
        f"{events} event(s) were written and the load is unfinished: mend this and run the "
        "load again (what was written is not written twice)"
    )


async def _check_events(store: Store, dataset: Dataset, progress: Progress) -> None:
    """Read every event before writing anything, so that a bad value (the readers raise it) or
    an item in neither the data set nor the store's catalog fails the load with nothing
    written, rather than after part of it."""
    task = progress.add_task("checking", total=dataset.event_count)
    listed = {item.item_id for item in dataset.items}
    elsewhere: Counter[str] = Counter()  # events per item the data set does not list
    first: dict[str, FeedbackEvent] = {}
    for batch in batched(dataset.events):
        for event in batch:
            if event.item_id not in listed:
                elsewhere[event.item_id] += 1
                first.setdefault(event.item_id, event)
        progress.advance(task, len(batch))
    if not elsewhere:
        return
    catalog = set(await store.item_ids())
    if unknown := [item for item in elsewhere if item not in catalog]:
        example = first[unknown[0]]
        raise LoadError(
            f"{sum(elsewhere[item] for item in unknown)} event(s) name items that are not in "
            f"the catalog, e.g. user {example.user_id} -> item {example.item_id}; nothing was "
            "written"
        )


async def _write_all(write_batch, records: Sequence, label: str, progress: Progress) -> None:
    task = progress.add_task(label, total=len(records))
    for batch in batched(records):
        await write_batch(batch)
        progress.advance(task, len(batch))
