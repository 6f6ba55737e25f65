"""The impression record is written and read by one class: what the gateway logs, the trainer
reads back unchanged, and entries from before renderings still read."""

import json

import pytest
from pydantic import ValidationError

from contract.impression import Impression
from contract.prompt import Rendering


def served() -> Impression:
    return Impression(
        request_id="r1",
        user_id="u1",
        model_version="v1",
        ts=1_700_000_000.25,
        source="llm",
        items=["a", "b"],
        candidates=["b", "a", "c"],
        prompt="p",
        rendering=Rendering.compact,
        output="<think>x</think><answer>#a, #b</answer>",
    )


def test_a_stream_entry_reads_back_as_written() -> None:
    impression = served()
    fields = impression.fields()

    assert all(isinstance(value, str) for value in fields.values())  # what XADD stores
    assert json.loads(fields["items"]) == ["a", "b"] and fields["k"] == "2"
    assert Impression.from_fields(fields) == impression


def test_an_entry_logged_before_renderings_reads_as_rich() -> None:
    fields = served().fields()
    del fields["rendering"], fields["k"]
    fields["source"] = "fallback"

    read = Impression.from_fields(fields)

    assert read.rendering is Rendering.rich and read.k == 2


def test_an_empty_list_still_ranks_one() -> None:
    fields = served().model_copy(update={"items": []}).fields()

    assert Impression.from_fields(fields).k == 1


@pytest.mark.parametrize("ts", ["nan", "inf", "1e400"])
def test_an_entry_served_at_no_time_is_unreadable(ts: str) -> None:
    """One logged as nan sorted at random among the trainer's examples, was written back as
    null, and every later read of the log warned of it."""
    fields = served().fields() | {"ts": ts}
    with pytest.raises(ValidationError, match="ts"):
        Impression.from_fields(fields)
