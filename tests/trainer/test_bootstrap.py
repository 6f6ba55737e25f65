"""`reasonrec bootstrap` on the embedded model: what it activates, and how it stops."""

import asyncio
import signal
import subprocess
import sys
import time

from server.config import Settings
from server.store import open_store
from tests.trainer.test_bootstrap_base import bootstrap_on


def test_an_active_version_missing_from_the_registry_does_not_block_activation(
    settings: Settings,
) -> None:
    # The registry was emptied (`make clean`) under a Redis that kept its pointer.
    async def stale() -> None:
        async with open_store(settings) as store:
            await store.set_active_model("v20250101-000000-abcdef")

    asyncio.run(stale())
    settings = settings.model_copy(update={"candidates": 8, "prompt_history": 4})
    result = asyncio.run(bootstrap_on(settings, base=None))  # forced past the gate, not this

    assert result.activated, result.gate

    async def active() -> str | None:
        async with open_store(settings) as store:
            return await store.active_model()

    assert asyncio.run(active()) == result.version


INTERRUPTED = """
import asyncio, time
from trainer.bootstrap import interruptible

async def main():
    with interruptible():
        print("training", flush=True)
        time.sleep(20)  # synchronous work: no await where asyncio could cancel it
        print("published", flush=True)

asyncio.run(main())
"""


def test_one_ctrl_c_stops_synchronous_training_at_once() -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTED],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "training"
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert "published" not in out and "KeyboardInterrupt" in err
    assert time.monotonic() - started < 10
