"""A process a test starts must not outlive a killed pytest (`tests.conftest.dies_with_pytest`)."""

import os
import subprocess
import sys
import time

import pytest

PARENT = """
import os, signal, subprocess, sys
from tests.conftest import dies_with_pytest
child = subprocess.Popen(["sleep", "60"], stdout=subprocess.DEVNULL, preexec_fn=dies_with_pytest)
print(child.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no finally, no atexit: as when a run is killed
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (dead, not yet reaped by init) counts as gone.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signals are Linux's")
def test_a_child_dies_when_its_killed_parent_does() -> None:
    parent = subprocess.run(
        [sys.executable, "-c", PARENT], capture_output=True, text=True, timeout=30, check=False
    )
    child = int(parent.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
