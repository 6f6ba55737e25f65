"""JSON Lines reader: one object per line, `{"kind": "item" | "user" | "event", ...}`.

The fields after `kind` are those of the API (`ItemUpsert`, `UserUpsert`, `FeedbackEvent`). The
whole file is validated before anything is written; every bad line is reported with its number.
An event without an `event_id` gets one derived from its content, so loading a file twice stores
each event once.
"""

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel

from server.loaders import Dataset, LoadError, describe
from server.schemas import FeedbackEvent, ItemUpsert, UserUpsert

KINDS: dict[str, type[BaseModel]] = {
    "item": ItemUpsert,
    "user": UserUpsert,
    "event": FeedbackEvent,
}
MAX_REPORTED = 20


def read_jsonl(path: Path) -> Dataset:
    if not path.is_file():
        raise LoadError(f"{path} is not a file")
    dataset = Dataset(items=[], users=[], events=[])
    errors: list[str] = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                # Decoded line by line, so that a byte that is not UTF-8 is reported with its
                # line; a byte order mark, as editors write, skipped.
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                if line.strip():
                    _add(dataset, json.loads(line))
            except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
                errors.append(f"line {number}: {describe(exc)}")
    if errors:
        shown = "\n".join(errors[:MAX_REPORTED])
        more = f"\n... and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
        raise LoadError(f"{path}: {len(errors)} invalid line(s), nothing loaded\n{shown}{more}")
    dataset.event_count = len(dataset.events)
    return dataset


def _add(dataset: Dataset, record: object) -> None:
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    kind = record.pop("kind", None)
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "event" and not record.get("event_id"):
        digest = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()
        record["event_id"] = f"jsonl:{digest}"
    model = KINDS[kind].model_validate(record)
    {"item": dataset.items, "user": dataset.users, "event": dataset.events}[kind].append(model)
