"""One error model and one exception-to-response mapping for every route.

Every error is JSON ``{"error": {"code", "message", "details"}}``; no traceback ever leaves the
process. Unexpected exceptions become a 500 in `server.middleware`, where the request id is known.
"""

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError, ResponseError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from server import metrics
from server.logs import describe
from server.schemas import EVENT_TYPE_ERRORS, ErrorBody, ErrorResponse, EventType, in_words
from server.store import UnreadableStoredData

log = logging.getLogger(__name__)
_EVENT_TYPES = frozenset(EventType)
# Stored data no command can use, alone or inside a pipeline's or a script's message: a key of
# another type, a hash value HINCRBY(FLOAT) cannot add to, or a Lua error of a script of ours
# (`user_script:1: attempt to compare nil with number`), which comes of a value it read. redis-py
# drops a leading "ERR "; Redis 6 keeps it inside a script's message. Not every error that names a
# script: OOM and READONLY inside one end "on @user_script:1." (Redis 7) or follow
# "@user_script: 1: -" (Redis 6), and those are no bad data.
_BAD_DATA = re.compile(
    r"(^|: )(ERR )?(WRONGTYPE |hash value is not (a float|an integer)"
    r"|increment would produce NaN or Infinity|user_script:\d+: )"
)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details, self.headers = details, headers


def error_response(
    status: int,
    code: str,
    message: str,
    details: Any = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(code=code, message=message, details=details))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class StorageUnavailable(ApiError):
    """Redis did not answer in time. For a write the outcome is unknown: it may have been
    applied, so a retry must be safe to apply twice (feedback: the same event ids)."""

    def __init__(self, message: str = "the data store is unreachable; retry shortly", details=None):
        super().__init__(503, "storage_unavailable", message, details, {"Retry-After": "1"})


def not_found(kind: str, ident: str) -> ApiError:
    return ApiError(404, "not_found", f"{kind} '{ident}' does not exist")


def _location(loc: tuple) -> list:
    """The path of the field at fault. Pydantic puts the tag of a tagged union (an event's type)
    in the path, as if it were a field: left out, since no such field exists in the body. Only
    there: an item's field may be named like an event type ("rating")."""
    parts = list(loc)
    if parts[:2] == ["body", "events"] and len(parts) > 3 and parts[3] in _EVENT_TYPES:
        del parts[3]
    return parts


def _detail(error: Any) -> dict[str, Any]:
    loc = _location(error.get("loc", ()))
    if error["type"] in EVENT_TYPE_ERRORS:
        return {"loc": [*loc, "type"], "message": in_words(error), "type": "event_type"}
    return {"loc": loc, "message": in_words(error), "type": error["type"]}


def validation_details(errors: Any) -> list[dict[str, Any]]:
    return [_detail(error) for error in errors]


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


# Longer paths and queries get a JSON 414 (server.middleware): no id or filter the API accepts
# comes near it.
MAX_URL_BYTES = 8192

_MEANINGS = {
    400: "The request could not be read.",
    401: "No API key, or an unknown one (only where API keys are configured).",
    403: "Admin route: an API key where an admin key is needed, or admin routes are disabled.",
    404: "The item, user or model version does not exist.",
    409: "The model version cannot be served by this gateway, or was not trained for the task.",
    413: "The request body is larger than REASONREC_MAX_BODY_BYTES.",
    414: f"The URL is longer than {MAX_URL_BYTES} bytes.",
    415: "The body is not plain JSON (another Content-Type, or a Content-Encoding).",
    422: "The request breaks a rule of the schema or a limit (details name each).",
    500: "An unexpected error; the log line carries the request id.",
    503: "The data store did not answer; retry after Retry-After seconds. A write may or may "
    "not have been applied (feedback: retry with the event_ids in the details).",
}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error statuses a route can answer, all with the one error body."""
    return {s: {"model": ErrorResponse, "description": _MEANINGS[s]} for s in statuses}


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    details = validation_details(exc.errors())
    return error_response(422, "validation_error", "the request is invalid", details)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _STATUS_CODES.get(exc.status_code, "http_error")
    headers = exc.headers
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": _allowed_methods(request)}
    return error_response(exc.status_code, code, str(exc.detail), headers=headers)


def _allowed_methods(request: Request) -> str:
    """Every method some route of this path answers. Starlette names only the first route's,
    and GET and PUT of one path are two routes here."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


async def _unavailable(request: Request, exc: StorageUnavailable) -> JSONResponse:
    metrics.REDIS_ERRORS.inc()
    reason = describe(exc.__cause__ or exc)
    log.warning("redis unavailable", extra={"path": request.url.path, "reason": reason})
    return await _api_error(request, exc)


def bad_data(exc: RedisError) -> bool:
    """Stored data that cannot be used (written by hand or by another program): bad data, not an
    outage. Retrying cannot help, and a Redis that answers must not count as down."""
    if isinstance(exc, UnreadableStoredData):
        return True
    return isinstance(exc, ResponseError) and _BAD_DATA.search(str(exc)) is not None


async def _redis_error(request: Request, exc: RedisError) -> JSONResponse:
    if bad_data(exc):
        # A 503 would send clients retrying, and alerts to a Redis that is up.
        reason = describe(exc)
        log.error("redis data unreadable", extra={"path": request.url.path, "reason": reason})
        return error_response(500, "internal_error", "stored data could not be read")
    error = StorageUnavailable()
    error.__cause__ = exc
    return await _unavailable(request, error)


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StorageUnavailable, _unavailable)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RedisError, _redis_error)
