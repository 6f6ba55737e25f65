"""finish_in_thread: a cancelled caller unwinds only once its thread has ended."""

import asyncio
import gc
import threading
import time

import pytest

from trainer.threads import finish_in_thread


def test_a_cancelled_caller_waits_for_the_thread_and_may_ask_it_to_end() -> None:
    started, asked = threading.Event(), threading.Event()
    ended: list[float] = []

    def work(seconds: float) -> str:
        started.set()
        asked.wait(30)
        time.sleep(seconds)  # what is left to do once asked to end
        ended.append(time.monotonic())
        return "done"

    async def body() -> float:
        task = asyncio.create_task(finish_in_thread(work, 0.3, on_cancel=asked.set))
        assert await asyncio.to_thread(started.wait, 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic()

    unwound = asyncio.run(body())
    assert asked.is_set() and ended and ended[0] <= unwound


def test_the_result_and_the_error_of_the_thread_come_back() -> None:
    assert asyncio.run(finish_in_thread(sorted, [3, 1, 2], reverse=True)) == [3, 2, 1]
    with pytest.raises(ZeroDivisionError):
        asyncio.run(finish_in_thread(lambda: 1 / 0))


def test_a_second_cancellation_waits_as_well() -> None:
    started = threading.Event()
    ended: list[float] = []

    def work() -> None:
        started.set()
        time.sleep(0.5)
        ended.append(time.monotonic())

    async def body() -> float:
        task = asyncio.create_task(finish_in_thread(work))
        assert await asyncio.to_thread(started.wait, 30)
        task.cancel()
        await asyncio.sleep(0.1)
        task.cancel()  # Ctrl-C, then SIGTERM
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic()

    unwound = asyncio.run(body())
    assert ended and ended[0] <= unwound


def test_a_thread_asked_to_end_by_raising_logs_no_error(caplog: pytest.LogCaptureFixture) -> None:
    """A training stopped at its next step ends with an exception, as it is meant to: asyncio
    logged it as "never retrieved", an error with a traceback, at every graceful stop."""
    started, asked = threading.Event(), threading.Event()

    def training() -> None:
        started.set()
        asked.wait(30)
        raise RuntimeError("stopped after step 1 of 20")

    async def body() -> None:
        task = asyncio.create_task(finish_in_thread(training, on_cancel=asked.set))
        assert await asyncio.to_thread(started.wait, 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level("ERROR", logger="asyncio"):
        asyncio.run(body())
        gc.collect()  # where asyncio says what was never retrieved
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text
