"""Ctrl-C that stops long work at once (a bootstrap's training, a data set's load)."""

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """SIGTERM (`docker stop`, a pod deleted) raised as Ctrl-C is, where `interruptible` is
    asked to: left to its default it kills the process with no word of what it left."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


@contextmanager
def interruptible(sigterm: bool = False) -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt inside at once. Under `asyncio.run` the first Ctrl-C only
    cancels the task at its next await, which a synchronous training never reaches (an
    interrupted bootstrap went on, published its version and stopped just before activating it),
    and which redis-py's timeouts swallow (`asyncio.wait_for`: five loads of six went on to the
    end)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_term = signal.signal(signal.SIGTERM, _terminate) if sigterm else None
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
