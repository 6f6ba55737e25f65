"""What the writer says when a load fails after its first write."""

from collections.abc import Iterator

import pytest
from redis.exceptions import ResponseError

from server.loaders import Dataset, LoadError, Replay
from server.schemas import EventType, FeedbackEvent, ItemUpsert


def test_a_source_that_fails_while_written_says_the_store_holds_part_of_it(loaded) -> None:
    """The events are read again to be written: a file changed since the check failed there,
    and the error read as the check's, for which nothing is written."""
    reads: list[int] = []

    def read() -> Iterator[FeedbackEvent]:
        reads.append(1)
        for n in range(1500):
            if n == 1200 and len(reads) == 2:
                raise LoadError("u.data line 1201: could not convert string to float: 'five'")
            yield FeedbackEvent(user_id=f"u{n}", item_id="a", type=EventType.click)

    dataset = Dataset(items=[ItemUpsert(item_id="a", title="A")], users=[], events=Replay(read))
    with pytest.raises(LoadError) as caught:
        loaded.write(dataset)
    assert str(caught.value) == (
        "u.data line 1201: could not convert string to float: 'five'; 1000 event(s) were written "
        "and the load is unfinished: mend this and run the load again (what was written is not "
        "written twice)"
    )
    assert loaded.redis.xlen(loaded.keys.events) == 1000
    assert loaded.redis.get(loaded.keys.loading) == "1"


def test_an_events_key_that_is_no_stream_is_named(loaded) -> None:
    loaded.redis.set(loaded.keys.events, "oops")
    dataset = Dataset(items=[ItemUpsert(item_id="a", title="A")], users=[], events=[])
    with pytest.raises(ResponseError, match=f"^{loaded.keys.events} is not a stream$"):
        loaded.write(dataset)
