"""Work off the event loop that a cancellation does not cut short.

`asyncio.to_thread` returns at once when its caller is cancelled (Ctrl-C, SIGTERM), while the
thread runs on. A refresh gives its lock back as it unwinds, so a thread still training, writing
the feedback log or publishing would then run beside the next refresh. `finish_in_thread` unwinds
only once the thread has ended.
"""

import asyncio
from collections.abc import Callable
from contextlib import suppress
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


async def finish_in_thread(
    func: Callable[P, T],
    *args: P.args,
    on_cancel: Callable[[], None] | None = None,
    **kwargs: P.kwargs,
) -> T:
    """`asyncio.to_thread(func, *args, **kwargs)`; when cancelled, call `on_cancel` (to ask the
    thread to end sooner) and wait for the thread to end before the cancellation goes on, however
    often it is cancelled meanwhile (a second Ctrl-C raises KeyboardInterrupt, a second SIGTERM
    kills: neither is a cancellation)."""
    work = asyncio.ensure_future(asyncio.to_thread(func, *args, **kwargs))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        if on_cancel is not None:
            on_cancel()
        while not work.done():  # a second cancellation (Ctrl-C, then SIGTERM) waits as well
            with suppress(asyncio.CancelledError):
                await asyncio.wait({work})
        if not work.cancelled():
            # Read, so that asyncio does not log it as "never retrieved" with a traceback: a
            # training stopped by `on_cancel` ends with an exception, as it is meant to.
            work.exception()
        raise
