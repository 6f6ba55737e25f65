"""A request whose client has left stops: its engine calls are cancelled (vLLM aborts them), so
that a client that gives up and retries does not leave the engine working for both. Starlette runs
a handler to its end even when nobody waits for its answer."""

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from fastapi import Request, Response

log = logging.getLogger(__name__)
T = TypeVar("T")

CLIENT_CLOSED = 499
"""Answered to nobody, for the access log and `reasonrec_http_requests_total` (nginx's code)."""


async def _left(request: Request) -> None:
    # The body is read already: what the server sends next is the disconnect, when it comes.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(request: Request, work: Coroutine[Any, Any, T]) -> T | Response:
    """`work`'s result, or an empty 499 once the client has left before it was done (`work`
    cancelled)."""
    working = asyncio.ensure_future(work)
    leaving = asyncio.ensure_future(_left(request))
    try:
        await asyncio.wait((working, leaving), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server stops: the work must not outlive the handler,
        await _stopped(working)  # which holds its engine
        raise
    finally:
        leaving.cancel()
    if working.done():
        return working.result()
    await _stopped(working)
    log.info("client gone: request cancelled")
    return Response(status_code=CLIENT_CLOSED)


async def _stopped(task: asyncio.Future) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
