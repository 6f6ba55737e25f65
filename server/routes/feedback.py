"""Feedback route: POST /v1/feedback."""

import logging
import uuid

from fastapi import APIRouter
from redis.exceptions import RedisError

from server import metrics
from server.deps import StoreDep
from server.errors import ApiError, StorageUnavailable, bad_data, documented
from server.logs import describe
from server.schemas import FeedbackBatch, FeedbackEvent, FeedbackResult
from server.store import Store, UnknownItems, UnreadableStoredData

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/feedback", tags=["feedback"])


@router.post("", response_model=FeedbackResult, responses=documented(400, 413, 415, 422))
async def post_feedback(batch: FeedbackBatch, store: StoreDep) -> FeedbackResult:
    """Store up to 1000 events. The batch is all or nothing: one bad event rejects it whole.

    Events sent without an `event_id` get one, returned in `event_ids` (and in the details of a
    503): sending the batch again with them stores nothing twice.
    """
    assigned = frozenset(i for i, event in enumerate(batch.events) if event.event_id is None)
    for i in assigned:
        batch.events[i].event_id = uuid.uuid4().hex
    event_ids = [event.event_id or "" for event in batch.events]
    try:
        stored = await store.add_feedback(batch.events, assigned=assigned)
    except RedisError as exc:
        if bad_data(exc):  # retrying cannot help until the data is repaired
            raise _unreadable(exc, event_ids) from exc
        raise StorageUnavailable(
            "the data store did not answer: the events may or may not be stored; send them "
            "again with these event_ids and none is counted twice",
            {"event_ids": event_ids},
        ) from exc
    except UnknownItems as exc:
        raise _unknown_items(batch, exc) from exc
    new = [event for event, is_new in zip(batch.events, stored, strict=True) if is_new]
    for event in new:
        metrics.FEEDBACK_EVENTS.labels(event.type.value).inc()
    await _credit_positives(store, new)
    accepted = sum(stored)
    return FeedbackResult(accepted=accepted, duplicates=len(stored) - accepted, event_ids=event_ids)


def _unreadable(exc: RedisError, event_ids: list[str]) -> ApiError:
    """The 500 of stored data that cannot be read, as on any route, with the event ids to send
    again once it is repaired. The script checks what it needs before it writes: only an error
    it did not foresee (no UnreadableStoredData) can leave some of the events stored."""
    log.error("redis data unreadable", extra={"path": router.prefix, "reason": describe(exc)})
    if isinstance(exc, UnreadableStoredData):
        stored = "none of the events was stored"
    else:
        stored = "some of the events may be stored"
    return ApiError(
        500,
        "internal_error",
        f"stored data could not be read: {stored}; once it is repaired, send them again with "
        "these event_ids and none is counted twice",
        {"event_ids": event_ids},
    )


def _unknown_items(batch: FeedbackBatch, exc: UnknownItems) -> ApiError:
    details = [
        {
            "loc": ["body", "events", i, "item_id"],
            "message": f"unknown item '{batch.events[i].item_id}'",
            "type": "unknown_item",
        }
        for i in exc.indexes
    ]
    return ApiError(422, "validation_error", "the batch names unknown items", details)


async def _credit_positives(store: Store, events: list[FeedbackEvent]) -> None:
    """Count positives by the version that served the list they quote (the online positive
    rate's numerator). Events without a request id, or past attribution, are organic; those of
    another user than the list's are not counted (anyone could credit any list)."""
    quoted = [
        event for event in events if event.request_id and store.is_positive(event.type, event.value)
    ]
    try:
        served = await store.served_by([event.request_id or "" for event in quoted])
    except RedisError as exc:
        # The events are stored: a 503 now would have their retry counted as duplicates, and
        # counted nowhere. Only the attribution of this batch's positives is lost.
        log.warning(
            "positives not attributed", extra={"positives": len(quoted), "reason": describe(exc)}
        )
        return
    for event, shown in zip(quoted, served, strict=True):
        if shown is not None and shown.user_id in (None, event.user_id):
            metrics.POSITIVES.labels(shown.version).inc()
