"""JSON Lines reader: one object per line, `{"kind": "item" | "user" | "event", ...}`.

The fields after `kind` are those of the API (`ItemUpsert`, `UserUpsert`, `FeedbackEvent`). The
whole file is validated before anything is written; every bad line is reported with its number.
An event without an `event_id` gets one derived from its content, so loading a file twice stores
each event once.
"""

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ValidationError

from server.loaders import Dataset, LoadError
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
    with path.open(encoding="utf-8-sig") as handle:  # a byte order mark, as editors write, skipped
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    _add(dataset, json.loads(line))
                except (ValueError, ValidationError) as exc:
                    errors.append(f"line {number}: {_describe(exc)}")
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
    if kind not in KINDS:
        raise ValueError(f"'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "event" and not record.get("event_id"):
        digest = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()
        record["event_id"] = f"jsonl:{digest}"
    model = KINDS[kind].model_validate(record)
    {"item": dataset.items, "user": dataset.users, "event": dataset.events}[kind].append(model)


def _describe(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or 'record'}: {err['msg']}"
            for err in exc.errors()
        )
    return str(exc)
