"""Pure ASGI middleware around every request: request id, body size limit, metrics, access log.

Written against raw ASGI rather than BaseHTTPMiddleware because it sits on the hot path of
feedback ingestion, where every microsecond per request counts.
"""

import logging
import time
import uuid

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import metrics
from server.errors import error_response
from server.logs import request_id_var

log = logging.getLogger("reasonrec.access")

REQUEST_ID_HEADER = b"x-request-id"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class RequestMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _header(scope, REQUEST_ID_HEADER) or uuid.uuid4().hex
        token = request_id_var.set(request_id)
        start = time.perf_counter()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message.setdefault("headers", []).append(
                    (REQUEST_ID_HEADER, request_id.encode("latin-1"))
                )
            await send(message)

        try:
            length = _header(scope, b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                await self._too_large(scope, receive, send_with_id)
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
        response = error_response(413, "payload_too_large", self._too_large_message())
        await response(scope, receive, send)

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        metrics.HTTP_REQUESTS.labels(template, scope["method"], str(status)).inc()
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
