"""Pydantic models at the HTTP boundary: what the API accepts and returns.

The rule for every input: what the API accepts must read back and must be safe to show a model.
So times sit in a window every reader can convert, sizes are bounded, ids are printable, and
numbers are finite. The limits are listed in docs/api.md, "Limits and errors".
"""

import math
from collections import Counter
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from contract.prompt import ID_EXCLUDED, INVISIBLE
from contract.search import MAX_QUERY_CHARS, SEARCHABLE

# Characters that are invisible or change how text around them is laid out: controls, format
# characters, variation selectors and fillers (`contract.prompt.INVISIBLE`), spaces and
# separators, the Braille blank, the combining grapheme joiner, the specials block and the
# private-use area. An id made of them could not be told apart from another one in a log, a
# prompt or an answer. (Not the private-use and unassigned planes: excluding them made the
# pattern too slow for the API fuzzer to draw examples from.)
_HIDDEN = (
    r"\x00-\x20\x7f-\xa0\u034f\u1680\u2000-\u200f\u2028-\u202f\u205f-\u206f\u2800\u3000"
    r"\ue000-\uf8ff\ufff0-\uffff" + INVISIBLE
)
_ID_CHAR = rf"[^{_HIDDEN}{ID_EXCLUDED}]"
_NOT_DOT = rf"[^{_HIDDEN}{ID_EXCLUDED}.]"
# Any id but "." and "..", which URLs resolve away as path segments. Written without lookahead,
# which the Rust regex engine behind pydantic lacks.
ID_PATTERN = rf"^({_NOT_DOT}{_ID_CHAR}*|\.{_NOT_DOT}{_ID_CHAR}*|\.\.{_ID_CHAR}+)$"
ID_RULE = "printable characters, no whitespace, none of : / , < >, and not '.' or '..'"
"""ID_PATTERN in words, for messages (the pattern runs to 2,000 characters)."""
MAX_ID_CHARS = 256
Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN)]
"""Item and user ids: printable, no whitespace, no ':' (it separates Redis key parts), no '/'
(it separates URL path segments, so such an id could not be addressed by the routes; for the
same reason not "." or ".."), no ',', '<' or '>' (they delimit ids and tags in the model's
answers)."""

TOKEN_PATTERN = r"^[A-Za-z0-9._~:@+=-]+$"
MAX_TOKEN_CHARS = 128
Token = Annotated[str, Field(min_length=1, max_length=MAX_TOKEN_CHARS, pattern=TOKEN_PATTERN)]
"""Request ids: short and plain, since they become Redis keys and HTTP headers."""

MAX_ATTRIBUTES = 64
MAX_ATTRIBUTE_CHARS = 256
AttrKey = Annotated[str, Field(min_length=1, max_length=64, pattern=ID_PATTERN)]


def _a_number(value: Any) -> Any:
    if isinstance(value, bool | str):
        raise ValueError("must be a JSON number")
    return value


def _not_an_int(value: Any) -> Any:
    if isinstance(value, int):
        raise ValueError("an integer beyond 64 bits would not read back as written")
    return value


Integer = Annotated[int, BeforeValidator(_a_number)]
"""An integer as JSON Schema has it: 41 or 41.0, never true or "41"."""


def _one_error(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """One error for a value no member takes, not one per member, each placed under a member's
    internal name ("function-after[forbid_inf_nan_check(), ...]") as if it were a field."""
    try:
        return handler(value)
    except ValidationError:
        raise PydanticCustomError(
            "attribute_value",
            "a boolean, a 64-bit integer, a finite number or a string of at most {chars} "
            "characters",
            {"chars": MAX_ATTRIBUTE_CHARS},
        ) from None


# Strict, every one: a lax union would store `true` as 1 and a too-long "000..." as 0.
AttrValue = Annotated[
    StrictBool
    | Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
    | Annotated[StrictFloat, BeforeValidator(_not_an_int), Field(allow_inf_nan=False)]
    | Annotated[StrictStr, Field(max_length=MAX_ATTRIBUTE_CHARS)],
    WrapValidator(_one_error),
]
# Pydantic checks the keys but leaves them out of the JSON schema: `propertyNames` says it.
Attributes = Annotated[
    dict[AttrKey, AttrValue],
    Field(
        max_length=MAX_ATTRIBUTES,
        json_schema_extra={
            "propertyNames": {"minLength": 1, "maxLength": 64, "pattern": ID_PATTERN}
        },
    ),
]

# The window of times accepted: early enough for the release dates of the first films, late
# enough for clocks a little ahead. Beyond year 1 or 9999, a time has no datetime in UTC.
EARLIEST = datetime(1800, 1, 1, tzinfo=UTC)
FUTURE_SLACK = timedelta(days=1)


def latest_time() -> datetime:
    """The latest time accepted: a day from now, rounded up to the next hour, so that the OpenAPI
    document (made again each hour) can state the bound exactly."""
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    return hour + FUTURE_SLACK + timedelta(hours=1)


_READABLE = (
    datetime(1, 1, 2, tzinfo=UTC).timestamp(),
    datetime(9999, 1, 1, tzinfo=UTC).timestamp(),
)


def readable_time(seconds: float) -> datetime | None:
    """A stored Unix time as a UTC datetime; None when no datetime can hold it (a value written
    before times were bounded): its reader skips the record instead of failing a request."""
    if not (math.isfinite(seconds) and _READABLE[0] <= seconds < _READABLE[1]):
        return None
    return datetime.fromtimestamp(seconds, UTC)


def _seconds(value: Any) -> Any:
    """A number is Unix seconds, and a string RFC 3339 text: pydantic alone reads a large number,
    or a string of digits, as milliseconds."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return value
        raise ValueError("a time in a string is RFC 3339 text; Unix seconds are a JSON number")
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            converted = readable_time(float(value))
        except OverflowError:  # an integer too large for a float
            converted = None
        if converted is None:
            raise ValueError("a numeric timestamp is Unix seconds, and this one has no date")
        return converted
    return value


def _in_window(value: datetime) -> datetime:
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value
    if not EARLIEST <= value <= latest_time():
        raise ValueError("a time must lie between 1800-01-01 and one day from now")
    return value.astimezone(UTC)


class _TimeSchema:
    """The JSON schema of a Timestamp: its numeric bounds are those of the hour it is made in."""

    def __get_pydantic_json_schema__(self, _core: Any, _handler: Any) -> dict[str, Any]:
        latest = latest_time().timestamp()
        number = {"type": "number", "minimum": EARLIEST.timestamp(), "maximum": latest}
        return {
            "anyOf": [{"type": "string", "format": "date-time"}, number],
            "description": "RFC 3339 (no zone: UTC) or Unix seconds; from 1800-01-01 to one day "
            "from now.",
        }


Timestamp = Annotated[
    datetime, BeforeValidator(_seconds), AfterValidator(_in_window), _TimeSchema()
]
"""A time the API accepts: a zone-less time is UTC, never the server's local time."""
MAX_BATCH = 1000
Category = Annotated[str, Field(min_length=1, max_length=200)]


class ItemIn(BaseModel):
    """An item as written by PUT /v1/items/{item_id} (and, with `item_id`, by POST /v1/items)."""

    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1, max_length=1000)
    categories: list[Category] = Field(default_factory=list, max_length=100)
    attributes: Attributes = Field(default_factory=dict)
    description: str = Field("", max_length=20_000)
    available: StrictBool = True
    promoted: StrictBool = False
    boost: StrictFloat = Field(
        0.0, ge=0.0, le=10.0, description="Extra promotion weight, 0 = none."
    )
    created_at: Timestamp | None = Field(
        None, description="When the item entered the catalog. Unset: kept, or now on first write."
    )


class ItemUpsert(ItemIn):
    item_id: Id


class ItemBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[ItemUpsert] = Field(min_length=1, max_length=MAX_BATCH)


class Item(ItemUpsert):
    """An item as stored. `hidden` is set by DELETE /v1/items/{item_id}: a hidden item answers
    404 and is never recommended, but stays in storage for the histories that name it."""

    created_at: datetime
    hidden: bool = False


class Listed(BaseModel):
    """What retrieval's filters read of a stored item (`Store.listings`), without its text."""

    item_id: str
    categories: list[str]
    attributes: dict[str, Any]
    available: bool
    hidden: bool


class UpsertResult(BaseModel):
    upserted: int


class UserIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    attributes: Attributes = Field(default_factory=dict)


class UserUpsert(UserIn):
    user_id: Id


class HistoryEntry(BaseModel):
    item_id: str
    timestamp: datetime
    title: str | None = None


class User(BaseModel):
    user_id: str
    attributes: dict[str, bool | int | float | str] = Field(
        description="As written (see PUT /v1/users/{user_id})."
    )
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


def is_positive(
    kind: EventType, value: float | None, positive_rating: float = POSITIVE_RATING
) -> bool:
    """Engagement that says the user wanted the item: click, like, purchase, rating >= 4."""
    if kind is EventType.rating:
        return value is not None and value >= positive_rating
    return kind in POSITIVE_TYPES


EVENT_ID_PATTERN = rf"^[^{_HIDDEN}]+$"
EventId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS, pattern=EVENT_ID_PATTERN)]


def _now() -> datetime:
    return datetime.now(UTC)


class FeedbackEvent(BaseModel):
    """One event as stored and loaded. The API reads each one as the `RatingEvent` or the
    `InteractionEvent` its type names, so that the schema says which events carry a value."""

    model_config = ConfigDict(extra="forbid")

    user_id: Id
    item_id: Id
    type: EventType
    value: StrictFloat | None = Field(
        None, description="The rating, 0.5 to 5; only for type rating."
    )
    request_id: Token | None = Field(
        None, description="The request_id of the list the event is about (attribution)."
    )
    event_id: EventId | None = Field(
        None,
        description="Idempotency key: sent again, the event is stored once. Unset: the server "
        "assigns one and returns it, so that a retry after a 503 can send it.",
    )
    timestamp: Timestamp = Field(default_factory=_now)

    @model_validator(mode="after")
    def _check_value(self) -> "FeedbackEvent":
        if self.type is EventType.rating:
            if self.value is None or not 0.5 <= self.value <= 5.0:
                raise ValueError("a rating needs a value between 0.5 and 5")
        elif self.value is not None:
            raise ValueError(f"value is only allowed on rating events, not on {self.type}")
        return self


class RatingEvent(FeedbackEvent):
    type: Literal[EventType.rating]
    value: StrictFloat = Field(ge=0.5, le=5.0, description="The rating, 0.5 to 5.")


class InteractionEvent(FeedbackEvent):
    type: Literal[
        EventType.impression,
        EventType.click,
        EventType.like,
        EventType.purchase,
        EventType.dislike,
        EventType.skip,
    ]
    value: None = Field(None, description="Only ratings carry a value.")


EventIn = Annotated[RatingEvent | InteractionEvent, Discriminator("type")]
"""An event as the API reads it: the schema says which types carry a value."""

EVENT_TYPE_ERRORS = frozenset({"union_tag_invalid", "union_tag_not_found"})
"""pydantic's errors of an event whose type is missing or none of EventType (the only tagged
union of the API)."""

_IN_WORDS = {
    ID_PATTERN: f"not an id: {ID_RULE}",
    EVENT_ID_PATTERN: "not an event id: printable characters, no whitespace",
    SEARCHABLE: "nothing to search for: only spaces, invisible characters or < >",
}


def in_words(problem: ErrorDetails) -> str:
    """pydantic's message, in words where it would quote one of this module's patterns (700 to
    2,000 characters) or list an event's types as enum reprs. (pydantic takes a discriminator's
    own custom error only from a callable one, which drops the tag mapping from the schema.)"""
    if problem["type"] == "string_pattern_mismatch":
        return _IN_WORDS.get(problem["ctx"]["pattern"], problem["msg"])
    if problem["type"] in EVENT_TYPE_ERRORS:
        return "type must be one of: " + ", ".join(EventType)
    return problem["msg"]


class FeedbackBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[EventIn] = Field(min_length=1, max_length=MAX_BATCH)


class FeedbackResult(BaseModel):
    accepted: int
    duplicates: int
    event_ids: list[str] = Field(
        description="The idempotency key of each event, in the order sent (assigned when unset)."
    )


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Id
    k: Integer = Field(10, ge=1, le=50)
    exclude_seen: StrictBool = True
    categories: list[Category] | None = Field(
        None, max_length=50, description="Only recommend items in at least one of these."
    )
    explain: StrictBool = Field(True, description="Return the model's rationale.")


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


class RateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Id
    item_ids: list[Id] = Field(
        min_length=1,
        max_length=50,
        description="Items to rate, 1 to 50, each once.",
        json_schema_extra={"uniqueItems": True},
    )
    explain: StrictBool = Field(False, description="Return the model's reasoning steps.")

    @field_validator("item_ids")
    @classmethod
    def _distinct(cls, item_ids: list[str]) -> list[str]:
        if repeated := [item for item, count in Counter(item_ids).items() if count > 1]:
            # Named (the first few): in a list of 50 the client cannot tell which one.
            named = ", ".join(repeated[:3]) + (" ..." if len(repeated) > 3 else "")
            raise PydanticCustomError(
                "repeated_item",
                "item_ids must be distinct: {named} given more than once",
                {"named": named},
            )
        return item_ids


class Reasoning(BaseModel):
    """The model's think-before-rate steps (METHODS.md §2)."""

    user: str = Field(description="What this user likes.")
    item: str = Field(description="The item's strong and weak points for them.")
    match: str = Field(description="How well they fit.")


class RatedItem(BaseModel):
    item_id: str
    rating: float = Field(ge=1, le=5, description="Predicted rating, 1 to 5.")
    source: Source = Field(
        description="llm, or fallback: the lean baseline (item bias + the user's lean)."
    )
    reasoning: Reasoning | None = None


class RateResponse(BaseModel):
    request_id: str
    user_id: str
    model_version: str | None
    items: list[RatedItem]
    source: Source = Field(description="fallback when any item was rated by the baseline.")
    degraded: bool
    latency_ms: float


class SearchRequest(BaseModel):
    # The OpenAPI document states what `_something_to_search` checks: a query or a user.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "anyOf": [
                {"required": ["query"], "properties": {"query": {"type": "string"}}},
                {"required": ["user_id"], "properties": {"user_id": {"type": "string"}}},
            ]
        },
    )

    query: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_QUERY_CHARS,
        pattern=SEARCHABLE,
        description="What the user typed, 1 to 500 characters, with something to search for: "
        "not only spaces, invisible characters and < >. Omitted (with a "
        "user_id): what the user wants next, from their history (Rec-R1's sequential "
        "recommendation).",
    )
    user_id: Id | None = Field(
        None,
        description="Who is searching: the model reads their history, and their seen items are "
        "left out (see exclude_seen).",
    )
    k: Integer = Field(10, ge=1, le=50)
    exclude_seen: StrictBool = True
    explain: StrictBool = Field(False, description="Return the model's reasoning.")

    @model_validator(mode="after")
    def _something_to_search(self) -> "SearchRequest":
        if self.query is None and self.user_id is None:
            raise ValueError("give a query, a user_id, or both")
        return self


class SearchedItem(BaseModel):
    item_id: str
    rank: int
    score: float = Field(description="The retriever's score of the item against `query`.")
    title: str
    categories: list[str]


class SearchResponse(BaseModel):
    request_id: str
    user_id: str | None
    model_version: str | None
    typed: str | None = Field(description="The request's query, as typed.")
    query: str = Field(
        description="The query the retriever ranked with: what was typed followed by the "
        "model's query (source llm), or as typed (fallback; the last history item's title when "
        "nothing was typed). It may name items by reference (#item_id), which the retriever "
        "reads as the item's text."
    )
    retriever: str = Field(description="bm25 or dense (REASONREC_SEARCH_RETRIEVER).")
    items: list[SearchedItem]
    reasoning: str | None = Field(None, description="Why the model wrote that query.")
    source: Source = Field(
        description="llm: the model wrote the query; fallback: it went as typed."
    )
    degraded: bool
    latency_ms: float
