"""Consume the impression and feedback streams into durable training examples.

Both streams are read through a Redis consumer group (`trainer`). Feedback carrying a
`request_id` is joined to the impression that served it; an impression becomes a logged example:
the prompt and candidates exactly as served (no rebuild from today's state: no train/serve skew)
and the items the user then engaged with. Positives: click, like, purchase, a rating from the
store's threshold (4).
Negatives: dislike, skip, a low rating; an impression nobody engaged with counts as one
negative. Feedback without a request id is organic history, which the corpus reads from the
stream itself.

Nothing is acknowledged before it is safe: new examples are appended to `logged.jsonl` and
fsynced first, then the entries are acknowledged. After a crash, unacknowledged entries are
delivered again (the group's pending list is read first) and examples already written are
recognised by their request id, so a restart neither loses nor doubles anything (a record torn
by a crash mid-write is skipped: its entries were not acknowledged, so they come again). Feedback
that arrives before its impression was consumed waits in the pending list until it can be joined,
for `JOIN_WAIT_SECONDS` at most: then it is acknowledged unjoined (its request id names no logged
list: a search or a rating, an impression trimmed from its stream, or a client's mistake), as is
feedback from another user than the one the list was served to. An entry
that cannot be decoded (an unknown event type, no item, a value that is not a number, lists that are
not JSON) is skipped, counted (`unreadable`, and `reasonrec_unreadable_records_total`) and
acknowledged, so that it cannot hold back the entries after it.
"""

import asyncio
import logging
import math
import os
import time
from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel, Field, ValidationError

from contract.impression import Impression
from contract.prompt import Rendering
from server.durable import fsync
from server.schemas import EventType
from server.store import UNREADABLE, Store, skip_unreadable
from trainer.threads import finish_in_thread

log = logging.getLogger(__name__)
GROUP = "trainer"
CONSUMER = "trainer-1"
NEGATIVE = {EventType.dislike, EventType.skip}
JOIN_WAIT_SECONDS = 3600.0
KEEP_FACTOR = 5  # lists of each kind the log keeps, in multiples of what a refresh trains on
# Lists without a positive kept at most, in multiples of `keep`, however many the last
# JOIN_WAIT_SECONDS served: at 100 lists a second an hour is 360,000 lists, about 1 GB of a log
# that every refresh reads whole (it also holds the lists served since the last one, up to
# REASONREC_IMPRESSIONS_MAXLEN, while it consumes them).
RECENT_FACTOR = 5


class LoggedExample(BaseModel):
    """One served list and what the user did with it."""

    request_id: str
    user_id: str
    model_version: str
    ts: float
    prompt: str
    rendering: Rendering = Field(Rendering.rich, description="How `prompt` was written.")
    candidates: list[str]
    shown: list[str]
    k: int = Field(ge=1)
    positives: list[str] = Field(default_factory=list)
    negatives: list[str] = Field(default_factory=list)


class ConsumeResult(BaseModel):
    impressions: int = 0
    events: int = 0
    joined: int = 0
    positives: int = 0
    negatives: int = 0
    organic: int = 0
    unjoined: int = Field(0, description="Feedback on no logged list, given up on.")
    unreadable: int = Field(0, description="Entries that could not be decoded, skipped.")
    written: int = 0


class FeedbackLog:
    """The durable file of logged examples, and the consumer that fills it."""

    def __init__(self, store: Store, folder: Path, keep: int = KEEP_FACTOR * 2000):
        """`keep`: how many lists with a positive the log keeps (the newest), and as many
        without, or more if served in the last JOIN_WAIT_SECONDS (late feedback may still join
        them), up to RECENT_FACTOR times as many; it is rewritten down to those when it holds
        more than three times `keep` and that drops a third of it."""
        self.store, self.folder, self.keep = store, folder, keep
        self.path = folder / "logged.jsonl"
        self.logged: dict[str, LoggedExample] = {}
        """What the log holds after the last `consume`, as `read` would return it (read once)."""

    def read(self) -> dict[str, LoggedExample]:
        """Every logged example by request id; later records (late feedback) are merged in."""
        merged: dict[str, LoggedExample] = {}
        if not self.path.is_file():
            return merged
        with self.path.open(encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = LoggedExample.model_validate_json(line)
                except ValidationError as exc:
                    log.warning(
                        "unreadable logged example skipped",
                        extra={"line": number, "reason": str(exc).splitlines()[0]},
                    )
                    continue
                known = merged.setdefault(record.request_id, record)
                if known is not record:
                    _merge(known, record)
        return merged

    def _append(self, examples: list[LoggedExample]) -> None:
        new = not self.path.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+b") as out:
            if out.tell() > 0:  # appending: at the end
                out.seek(-1, os.SEEK_END)
                if out.read(1) != b"\n":  # torn by a crash: the next record must not continue it
                    out.write(b"\n")
            for example in examples:
                out.write(example.model_dump_json().encode() + b"\n")
            out.flush()
            os.fsync(out.fileno())
        if new:  # its name too: the entries are acknowledged next, and a lost name loses them
            fsync(self.folder)
            fsync(self.folder.parent)

    def _compact(self, logged: dict[str, LoggedExample]) -> dict[str, LoggedExample]:
        """Rewrite the log (`logged`: what it holds) down to the newest `keep` lists with a
        positive and as many without, and return what it then holds: a refresh trains on the
        newest lists only, and every list served adds a record (a few kilobytes: its prompt).
        Atomic: a crash leaves the old log or the new one. Not rewritten when that would drop
        less than a third (a busy hour's lists, kept, hold it above the trigger): every refresh
        would rewrite it all."""
        merged = sorted(logged.values(), key=lambda example: example.ts)
        engaged = [example for example in merged if example.positives]
        idle = [example for example in merged if not example.positives]
        # And the lists of the last JOIN_WAIT_SECONDS, up to RECENT_FACTOR * keep: a click
        # comes minutes after the list, and one on a list no longer here is lost as a lesson.
        recent = merged[-1].ts - JOIN_WAIT_SECONDS if merged else 0.0
        idle = [e for n, e in enumerate(idle) if n >= len(idle) - self.keep or e.ts >= recent]
        idle = idle[-RECENT_FACTOR * self.keep :]
        kept = sorted([*engaged[-self.keep :], *idle], key=lambda e: e.ts)
        if len(kept) > 2 * len(merged) / 3:
            return logged
        staging = self.path.with_name(f".{self.path.name}.compacting")
        with staging.open("wb") as out:
            for example in kept:
                out.write(example.model_dump_json().encode() + b"\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(staging, self.path)
        fsync(self.folder)
        dropped = len(merged) - len(kept)
        log.info("feedback log compacted", extra={"kept": len(kept), "dropped": dropped})
        return {example.request_id: example for example in kept}

    async def consume(self) -> ConsumeResult:
        """Join what arrived since the last call; persist, then acknowledge. Events are read a
        chunk at a time and those without a request id (most of a loaded data set) acknowledged
        as they go: nothing of theirs is persisted here (the corpus reads them from the stream)."""
        # Off the event loop: it renews the refresh lock meanwhile, and the log can be large.
        result, done = ConsumeResult(), await asyncio.to_thread(self.read)
        served, impressions = await self._served(done, result)
        late: dict[str, LoggedExample] = {}  # feedback on examples written by an earlier call
        acknowledged, waiting = [], []
        async for batch in self.store.read_group("events", GROUP, CONSUMER):
            result.events += len(batch)
            organic = []
            for entry_id, fields in batch:
                request_id = fields.get("request_id", "")
                feedback = _feedback(entry_id, fields, self.store) if request_id else None
                if not request_id:
                    result.organic += 1
                    organic.append(entry_id)
                    continue
                if feedback is None:
                    result.unreadable += 1
                elif _another_users(feedback, served.get(request_id) or done.get(request_id)):
                    result.unjoined += 1
                elif request_id in served:
                    _join(served[request_id], feedback, result)
                elif request_id in done:
                    update = late.setdefault(request_id, _update_of(done[request_id]))
                    _join(update, feedback, result)
                elif _age_seconds(entry_id) > JOIN_WAIT_SECONDS:
                    result.unjoined += 1
                else:
                    waiting.append(entry_id)  # its impression has not been consumed yet
                    continue
                acknowledged.append(entry_id)
            if organic:
                await self.store.ack("events", GROUP, organic)
        for example in served.values():
            if not example.positives and not example.negatives:
                example.negatives = list(example.shown)  # shown, and nothing happened
        records = [*served.values(), *late.values()]
        # Finished even when cancelled: the next refresh must not write the log beside them.
        await finish_in_thread(self._append, records)
        result.written = len(records)
        for request_id, update in late.items():
            _merge(done[request_id], update)
        logged = {**done, **served}
        if len(logged) > 3 * self.keep:
            logged = await finish_in_thread(self._compact, logged)
        self.logged = logged
        await self.store.ack("impressions", GROUP, impressions)
        await self.store.ack("events", GROUP, acknowledged)
        log.info("feedback consumed", extra={**result.model_dump(), "waiting": len(waiting)})
        return result

    async def _served(
        self, done: dict[str, LoggedExample], result: ConsumeResult
    ) -> tuple[dict[str, LoggedExample], list[str]]:
        """The lists served since the last call, by request id (an impression already written,
        consumed before a crash, is not written again), and the entries read."""
        served: dict[str, LoggedExample] = {}
        read: list[str] = []
        async for batch in self.store.read_group("impressions", GROUP, CONSUMER):
            result.impressions += len(batch)
            for entry_id, fields in batch:
                read.append(entry_id)
                try:
                    impression = Impression.from_fields(fields)
                except UNREADABLE as exc:
                    skip_unreadable("impression", entry_id, exc)
                    result.unreadable += 1
                    continue
                if impression.prompt and impression.request_id not in done:
                    served[impression.request_id] = _example(impression)
        return served, read


def _age_seconds(entry_id: str) -> float:
    """How long ago a stream entry was added: its id starts with Redis's clock in ms."""
    return time.time() - int(entry_id.split("-", 1)[0]) / 1000


def _example(impression: Impression) -> LoggedExample:
    return LoggedExample(
        request_id=impression.request_id,
        user_id=impression.user_id,
        model_version=impression.model_version,
        ts=impression.ts,
        prompt=impression.prompt,
        rendering=impression.rendering,
        candidates=impression.candidates,
        shown=impression.items,
        k=impression.k,
    )


def _update_of(example: LoggedExample) -> LoggedExample:
    return example.model_copy(update={"positives": [], "negatives": []})


def _merge(known: LoggedExample, record: LoggedExample) -> None:
    known.positives += [item for item in record.positives if item not in known.positives]
    known.negatives = [
        item
        for item in dict.fromkeys([*known.negatives, *record.negatives])
        if item not in known.positives
    ]


class Feedback(NamedTuple):
    """What a joined event says: who, the item, what they did, whether they wanted it."""

    user_id: str
    item_id: str
    type: EventType
    positive: bool


def _feedback(entry_id: str, fields: dict[str, str], store: Store) -> Feedback | None:
    """The event an events stream entry holds, positive as the store's histories count it; None,
    skipped and counted, when it cannot be read."""
    try:
        value = float(fields["value"]) if fields.get("value") else None
        if value is not None and not math.isfinite(value):
            raise ValueError(f"value {fields['value']}")
        kind = EventType(fields["type"])
        return Feedback(
            user_id=fields["user_id"],
            item_id=fields["item_id"],
            type=kind,
            positive=store.is_positive(kind, value),
        )
    except UNREADABLE as exc:
        skip_unreadable("event", entry_id, exc)
        return None


def _another_users(feedback: Feedback, example: LoggedExample | None) -> bool:
    """Whether `feedback` quotes a list served to another user: a client's mistake, which says
    nothing about that list."""
    return example is not None and example.user_id != feedback.user_id


def _join(example: LoggedExample, feedback: Feedback, result: ConsumeResult) -> None:
    result.joined += 1
    item = feedback.item_id
    if feedback.positive:
        if item not in example.positives:
            example.positives.append(item)
        result.positives += 1
    elif feedback.type in NEGATIVE or feedback.type is EventType.rating:
        if item not in example.negatives:
            example.negatives.append(item)
        result.negatives += 1
