"""Pure ASGI middleware around every request: request id, size limits, metrics, access log.

Every request gets a request id of its own (a uuid), answered in `X-Request-ID` and in the body
of a recommendation: feedback quotes it, so two requests must never share one. A client's own
`X-Request-ID`, when it is a plain token of at most 128 characters, is kept as the client request
id: logged with every line of the request and answered in `X-Client-Request-ID`.

Written against raw ASGI rather than BaseHTTPMiddleware because it sits on the hot path of
feedback ingestion, where every microsecond per request counts.
"""

import logging
import re
import time
import uuid

from starlette._utils import get_route_path
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import metrics
from server.auth import api_key_refusal, presented
from server.errors import MAX_URL_BYTES, ApiError, error_response
from server.logs import client_request_id_var, request_id_var
from server.schemas import MAX_TOKEN_CHARS, TOKEN_PATTERN

log = logging.getLogger("reasonrec.access")

REQUEST_ID_HEADER = b"x-request-id"
CLIENT_REQUEST_ID_HEADER = b"x-client-request-id"
_TOKEN = re.compile(TOKEN_PATTERN)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _client_request_id(scope: Scope) -> str | None:
    value = _header(scope, REQUEST_ID_HEADER)
    if value and len(value) <= MAX_TOKEN_CHARS and _TOKEN.fullmatch(value):
        return value
    return None


def _unsupported_body(scope: Scope) -> str | None:
    """Why a request body cannot be read, for a 415: every route reads plain JSON. (Without a
    Content-Type the body is read as JSON.)"""
    if scope["method"] not in {"POST", "PUT", "PATCH"}:
        return None
    coding = _header(scope, b"content-encoding")
    if coding is not None and coding.strip().lower() not in {"", "identity"}:
        return f"a body encoded as {coding!r} is not read: send it uncompressed"
    kind = _header(scope, b"content-type")
    media = (kind or "").split(";", 1)[0].strip().lower()
    if kind is not None and media != "application/json" and not media.endswith("+json"):
        return f"the body must be JSON (Content-Type: application/json), not {kind!r}"
    return None


def _url_bytes(scope: Scope) -> int:
    return len(scope.get("raw_path") or scope["path"].encode()) + len(scope["query_string"])


class RequestMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        api_keys: list[str] | None = None,
        admin_keys: list[str] | None = None,
    ):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.api_keys, self.admin_keys = api_keys or [], admin_keys or []

    def _refusal(self, scope: Scope) -> ApiError | None:
        """A /v1 request without a known key, refused before its body is read: FastAPI reads
        and parses the whole body (up to the size limit) before any dependency runs."""
        if not get_route_path(scope).startswith("/v1/"):  # behind a --root-path too
            return None
        key = presented(_header(scope, b"authorization"), _header(scope, b"x-api-key"))
        return api_key_refusal(key, self.api_keys, self.admin_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        client_id = _client_request_id(scope)
        token = request_id_var.set(request_id)
        client_token = client_request_id_var.set(client_id)
        ids = [(REQUEST_ID_HEADER, request_id.encode())]
        if client_id:
            ids.append((CLIENT_REQUEST_ID_HEADER, client_id.encode()))
        start = time.perf_counter()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message.setdefault("headers", []).extend(ids)
            await send(message)

        try:
            length = _header(scope, b"content-length")
            if _url_bytes(scope) > MAX_URL_BYTES:
                await error_response(414, "uri_too_long", f"the URL exceeds {MAX_URL_BYTES} bytes")(
                    scope, receive, send_with_id
                )
            elif refusal := self._refusal(scope):
                response = error_response(
                    refusal.status, refusal.code, refusal.message, headers=refusal.headers
                )
                await response(scope, receive, send_with_id)
            elif length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                await self._too_large(scope, receive, send_with_id)
            elif (unsupported := _unsupported_body(scope)) is not None:
                await error_response(415, "unsupported_media_type", unsupported)(
                    scope, receive, send_with_id
                )
            else:
                await self.app(scope, self._limited(receive), send_with_id)
        except Exception:
            # Caught here, not by an app-level handler, so that the 500 still carries the
            # request id and the log line names it.
            log.exception("unhandled error", extra={"path": scope["path"]})
            if not started:
                response = error_response(500, "internal_error", "an unexpected error occurred")
                await response(scope, receive, send_with_id)
        finally:
            self._observe(scope, status, time.perf_counter() - start)
            request_id_var.reset(token)
            client_request_id_var.reset(client_token)

    def _limited(self, receive: Receive) -> Receive:
        """Count body bytes as they arrive: a chunked body has no Content-Length to check."""
        received = 0

        async def wrapped() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise HTTPException(413, self._too_large_message())
            return message

        return wrapped

    def _too_large_message(self) -> str:
        return f"the request body exceeds {self.max_body_bytes} bytes"

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(413, "payload_too_large", self._too_large_message())(
            scope, receive, send
        )

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        method = scope["method"] if scope["method"] in METHODS else "OTHER"  # a bounded label
        metrics.HTTP_REQUESTS.labels(template, method, str(status)).inc()
        metrics.HTTP_DURATION.labels(template).observe(seconds)
        log.info(
            "request",
            extra={
                "method": scope["method"],
                "route": template,
                "path": scope["path"],
                "status": status,
                "ms": round(seconds * 1000, 3),
            },
        )
