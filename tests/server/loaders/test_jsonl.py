import json
from pathlib import Path

import pytest

from server.loaders import LoadError
from server.loaders.jsonl import read_jsonl

RECORDS = [
    {"kind": "item", "item_id": "a", "title": "Alpha", "categories": ["x"], "promoted": True},
    {"kind": "item", "item_id": "b", "title": "Beta", "attributes": {"price": 9.5}},
    {"kind": "user", "user_id": "u1", "attributes": {"age": 31}},
    {"kind": "event", "user_id": "u1", "item_id": "a", "type": "like", "timestamp": 1700000000},
    {"kind": "event", "user_id": "u1", "item_id": "b", "type": "rating", "value": 2},
]


def _write(path: Path, records: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_loads_items_users_and_events(tmp_path: Path, loaded) -> None:
    summary = loaded.write(read_jsonl(_write(tmp_path / "data.jsonl", RECORDS)))
    assert (summary.items, summary.users, summary.events) == (2, 1, 2)
    assert loaded.redis.hget(loaded.keys.item("a"), "promoted") == "1"
    assert loaded.redis.zrange(loaded.keys.history("u1"), 0, -1, withscores=True) == [
        ("a", 1700000000.0)
    ]


def test_events_without_ids_load_once(tmp_path: Path, loaded) -> None:
    path = _write(tmp_path / "data.jsonl", RECORDS)
    loaded.write(read_jsonl(path))
    before = loaded.snapshot()
    assert loaded.write(read_jsonl(path)).duplicates == 2
    assert loaded.snapshot() == before


def test_bad_lines_are_reported_with_numbers_and_nothing_loads(tmp_path: Path, loaded) -> None:
    bad = [
        *RECORDS,
        "{not json",
        {"kind": "movie", "item_id": "c"},
        {"kind": "event", "user_id": "u1", "item_id": "a", "type": "rating", "value": 9},
    ]
    with pytest.raises(LoadError) as caught:
        read_jsonl(_write(tmp_path / "bad.jsonl", bad))
    message = str(caught.value)
    assert "3 invalid line(s)" in message
    assert "line 6:" in message
    assert "line 7: 'kind' must be one of item, user, event" in message
    assert "line 8:" in message and "between 0.5 and 5" in message
    assert loaded.snapshot()["items"] == 0


def test_a_file_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    path = _write(tmp_path / "data.jsonl", RECORDS)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert [item.item_id for item in read_jsonl(path).items] == ["a", "b"]


def test_lines_that_cannot_be_read_are_reported_with_their_numbers(tmp_path: Path, loaded) -> None:
    path = _write(tmp_path / "bad.jsonl", [*RECORDS, "[" * 100_000, {"kind": ["event"]}])
    with path.open("ab") as handle:
        handle.write(b'{"kind": "item", "item_id": "c", "title": "Caf\xe9"}\n')
    with pytest.raises(LoadError) as caught:
        read_jsonl(path)
    lines = str(caught.value).splitlines()
    assert lines[0].endswith("3 invalid line(s), nothing loaded")
    assert [line.split(":")[0] for line in lines[1:]] == ["line 6", "line 7", "line 8"]
    assert "'kind' must be one of item, user, event, got ['event']" in lines[2]
    assert "can't decode byte 0xe9" in lines[3]


def test_events_may_name_items_already_in_the_store(tmp_path: Path, loaded) -> None:
    loaded.write(read_jsonl(_write(tmp_path / "catalog.jsonl", RECORDS[:2])))
    events = read_jsonl(_write(tmp_path / "events.jsonl", RECORDS[3:]))
    assert loaded.write(events).events == 2


def test_an_item_or_user_given_twice_counts_once(tmp_path: Path, loaded) -> None:
    """Stored once (the later record wins), so reported once."""
    twice = [*RECORDS[:3], {**RECORDS[0], "title": "Alpha 2"}, {**RECORDS[2], "attributes": {}}]
    summary = loaded.write(read_jsonl(_write(tmp_path / "data.jsonl", twice)))
    assert (summary.items, summary.users) == (2, 1)
    assert loaded.snapshot()["items"] == 2
    assert loaded.redis.hget(loaded.keys.item("a"), "title") == "Alpha 2"
