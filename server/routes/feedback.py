"""Feedback route: POST /v1/feedback."""

from fastapi import APIRouter

from server import metrics
from server.deps import StoreDep
from server.errors import ApiError
from server.schemas import FeedbackBatch, FeedbackEvent, FeedbackResult
from server.store import Store, UnknownItems

router = APIRouter(prefix="/v1/feedback", tags=["feedback"])


@router.post("", response_model=FeedbackResult)
async def post_feedback(batch: FeedbackBatch, store: StoreDep) -> FeedbackResult:
    """Store up to 1000 events. The batch is all or nothing: one bad event rejects it whole."""
    try:
        stored = await store.add_feedback(batch.events)
    except UnknownItems as exc:
        details = [
            {
                "loc": ["body", "events", i, "item_id"],
                "message": f"unknown item '{batch.events[i].item_id}'",
                "type": "unknown_item",
            }
            for i in exc.indexes
        ]
        raise ApiError(422, "validation_error", "the batch names unknown items", details) from exc
    new = [event for event, is_new in zip(batch.events, stored, strict=True) if is_new]
    for event in new:
        metrics.FEEDBACK_EVENTS.labels(event.type.value).inc()
    await _credit_positives(store, new)
    accepted = sum(stored)
    return FeedbackResult(accepted=accepted, duplicates=len(stored) - accepted)


async def _credit_positives(store: Store, events: list[FeedbackEvent]) -> None:
    """Count positives by the version that served the list they quote (the online positive
    rate's numerator). Events without a request id, or past attribution, are organic."""
    quoted = [event.request_id for event in events if event.request_id and event.positive]
    for version in await store.served_by(quoted):
        if version is not None:
            metrics.POSITIVES.labels(version).inc()
