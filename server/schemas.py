"""Pydantic models at the HTTP boundary: what the API accepts and returns."""

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

Id = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^\s:/,<>]+$")]
"""Item and user ids: no whitespace, no ':' (it separates Redis key parts), no '/' (it separates
URL path segments, so such an id could not be addressed by the routes), no ',', '<' or '>' (they
delimit ids and tags in the model's answers)."""

# bool first: in a str | int | float union pydantic would store `true` as 1.
AttrValue = bool | int | float | str


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


UtcDatetime = Annotated[datetime, AfterValidator(_utc)]
"""A time without a zone is read as UTC, never as the server's local time."""
MAX_BATCH = 1000


class ItemIn(BaseModel):
    """An item as written by PUT /v1/items/{item_id} (and, with `item_id`, by POST /v1/items)."""

    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1, max_length=1000)
    categories: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=100
    )
    attributes: dict[str, AttrValue] = Field(default_factory=dict, max_length=200)
    description: str = Field("", max_length=20_000)
    available: bool = True
    promoted: bool = False
    boost: float = Field(0.0, ge=0.0, le=10.0, description="Extra promotion weight, 0 = none.")
    created_at: UtcDatetime | None = Field(
        None, description="When the item entered the catalog. Unset: kept, or now on first write."
    )


class ItemUpsert(ItemIn):
    item_id: Id


class ItemBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[ItemUpsert] = Field(min_length=1, max_length=MAX_BATCH)


class Item(ItemUpsert):
    """An item as stored; `hidden` is set by DELETE /v1/items/{item_id}."""

    created_at: datetime
    hidden: bool = False


class UpsertResult(BaseModel):
    upserted: int


class UserIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    attributes: dict[str, AttrValue] = Field(default_factory=dict, max_length=200)


class UserUpsert(UserIn):
    user_id: Id


class HistoryEntry(BaseModel):
    item_id: str
    timestamp: datetime
    title: str | None = None


class User(BaseModel):
    user_id: str
    attributes: dict[str, AttrValue]
    history: list[HistoryEntry] = Field(description="Recent positive interactions, newest first.")


class EventType(StrEnum):
    impression = "impression"
    click = "click"
    like = "like"
    purchase = "purchase"
    rating = "rating"
    dislike = "dislike"
    skip = "skip"


POSITIVE_RATING = 4.0
POSITIVE_TYPES = frozenset({EventType.click, EventType.like, EventType.purchase})


def is_positive(kind: EventType, value: float | None) -> bool:
    """Engagement that says the user wanted the item: click, like, purchase, rating >= 4."""
    if kind is EventType.rating:
        return value is not None and value >= POSITIVE_RATING
    return kind in POSITIVE_TYPES


class FeedbackEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Id
    item_id: Id
    type: EventType
    value: float | None = Field(None, description="The rating, 0.5 to 5; only for type rating.")
    request_id: str | None = Field(None, max_length=128)
    event_id: str | None = Field(
        None, min_length=1, max_length=256, description="Sent twice, the event is stored once."
    )
    timestamp: UtcDatetime = Field(default_factory=lambda: datetime.now(UTC))

    @model_validator(mode="after")
    def _check_value(self) -> "FeedbackEvent":
        if self.type is EventType.rating:
            if self.value is None or not 0.5 <= self.value <= 5.0:
                raise ValueError("a rating needs a value between 0.5 and 5")
        elif self.value is not None:
            raise ValueError(f"value is only allowed on rating events, not on {self.type}")
        return self

    @property
    def positive(self) -> bool:
        return is_positive(self.type, self.value)


class FeedbackBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[FeedbackEvent] = Field(min_length=1, max_length=MAX_BATCH)


class FeedbackResult(BaseModel):
    accepted: int
    duplicates: int


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Id
    k: int = Field(10, ge=1, le=50)
    exclude_seen: bool = True
    categories: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, max_length=50, description="Only recommend items in at least one of these."
    )
    explain: bool = Field(True, description="Return the model's rationale.")


class Source(StrEnum):
    llm = "llm"
    fallback = "fallback"


class RecommendedItem(BaseModel):
    item_id: str
    rank: int
    score: float = Field(
        description="Retrieval score: similarity to the user's history, or popularity share for "
        "users without history. The order of the list is the LLM's ranking."
    )
    title: str
    categories: list[str]


class RecommendResponse(BaseModel):
    request_id: str
    user_id: str
    model_version: str | None
    items: list[RecommendedItem]
    rationale: str | None
    source: Source
    degraded: bool
    latency_ms: float
