"""Ctrl-C that stops long work at once (a bootstrap's training, a data set's load)."""

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def interruptible() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt inside at once. Under `asyncio.run` the first Ctrl-C only
    cancels the task at its next await, which a synchronous training never reaches (an
    interrupted bootstrap went on, published its version and stopped just before activating it),
    and which redis-py's timeouts swallow (`asyncio.wait_for`: five loads of six went on to the
    end)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
