"""Ctrl-C that stops long work at once (a bootstrap's training, a data set's load)."""

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

TERMINATED = threading.Event()
"""Set once SIGTERM stopped the work (`sigterm_as_ctrl_c`): told apart from Ctrl-C by the exit
status alone (143, not 130)."""


def sigterm_as_ctrl_c() -> Callable | int | None:
    """From now on SIGTERM (`docker stop`, a pod deleted, a CI job cancelled) stops the work as
    Ctrl-C does, by raising SIGINT: left to its default, it killed the process with no word of what
    it left and none of its clean-up. Not raised as an exception where the main thread is: under
    asyncio's runner that can be the event loop, outside the task, which then ran on during the
    clean-up (an eval's store was dropped while it still wrote); SIGINT has the runner cancel the
    task first. The handler it replaces."""

    def stop(signum: int, frame: object) -> None:
        TERMINATED.set()
        signal.raise_signal(signal.SIGINT)

    return signal.signal(signal.SIGTERM, stop)


@contextmanager
def interruptible(sigterm: bool = False) -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt inside at once. Under `asyncio.run` the first Ctrl-C only
    cancels the task at its next await, which a synchronous training never reaches (an
    interrupted bootstrap went on, published its version and stopped just before activating it),
    and which redis-py's timeouts swallow (`asyncio.wait_for`: five loads of six went on to the
    end). With `sigterm`, SIGTERM too (`sigterm_as_ctrl_c`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    TERMINATED.clear()
    previous_term = sigterm_as_ctrl_c() if sigterm else None
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
