"""vLLM's processes die with the gateway that started them, killed too (tests/integration runs
the real engine; here a process titled as vLLM titles its own stands for it)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from server.engine.reaper import Reaper
from tests.conftest import dies_with_pytest
from tests.server.helpers import until

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the watcher reads /proc")


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie left to a parent that does not reap is gone all the same


def _gateway(title: str) -> tuple[subprocess.Popen, int]:
    """A process that starts a child titled `title` (as vLLM starts its engine core, in a
    process of its own) and watches it; the gateway and the child's pid."""
    script = textwrap.dedent(
        f"""
        import subprocess, sys, time
        from server.engine.reaper import Reaper
        core = subprocess.Popen([sys.executable, "-c", "import setproctitle, time; "
                                 "setproctitle.setproctitle({title!r}); time.sleep(60)"])
        time.sleep(0.5)  # titled
        reaper = Reaper({{core.pid}})
        print(core.pid, flush=True)
        time.sleep(60)
        """
    )
    gateway = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=dies_with_pytest,
    )
    return gateway, int(gateway.stdout.readline()) if gateway.stdout else 0


@pytest.mark.parametrize(("title", "killed"), [("VLLM::EngineCore", True), ("redis", False)])
def test_what_vllm_started_dies_with_a_gateway_killed_outright(title: str, killed: bool) -> None:
    """Killed (the OOM killer), a gateway left its engine core holding the model's memory, and
    the restarted gateway started a second one beside it. A process of another title (a pid
    reused since) is left alone."""
    gateway, core = _gateway(title)
    try:
        assert _running(core)
        gateway.kill()
        gateway.wait()
        assert until(lambda: not _running(core), 10) is killed
    finally:
        if _running(core):
            os.kill(core, signal.SIGKILL)


def test_a_released_engine_s_processes_are_not_killed_again() -> None:
    """vLLM shut them down as the engine was released; their pids may be another vLLM's by the
    time the watcher ends (pids wrap at 32,768 here): the watcher kills nothing then."""
    titled = (
        "import setproctitle, time; setproctitle.setproctitle('VLLM::EngineCore'); time.sleep(30)"
    )
    other = subprocess.Popen([sys.executable, "-c", titled], preexec_fn=dies_with_pytest)
    try:
        time.sleep(0.5)  # titled
        Reaper({other.pid}).stop()  # as if its pid were a released core's
        time.sleep(0.5)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
