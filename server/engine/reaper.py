"""The in-process engine's vLLM processes die with the process that started them, killed too.

vLLM starts its engine core in a process of its own (spawned, on the CPU), which outlives a
gateway killed outright (`kill -9`, the OOM killer): it kept the model's memory, and a restarted
gateway started a second one beside it. A spawned process runs none of our code before vLLM's,
so a watcher process does it (`python -m server.engine.reaper PID...`): it waits on a pipe only
the gateway writes to, which closes when the gateway ends however it ends, then kills what vLLM
started. Linux (it reads /proc); elsewhere nothing is watched.
"""

import os
import signal
import subprocess
import sys
from contextlib import suppress
from pathlib import Path

PROC = Path("/proc")
TITLE = b"VLLM::"  # how vLLM titles its processes (VLLM::EngineCore, VLLM::Worker)
RELEASED = b"released"


def children(pid: int) -> set[int]:
    """The processes whose parent is `pid`."""
    found = set()
    for stat in PROC.glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(stat.parent.name))
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
    return found


def _titled_vllm(pid: int) -> bool:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().startswith(TITLE)
    except OSError:
        return False


def kill_vllm(pids: list[int]) -> None:
    """Kill `pids` and their children where they still bear vLLM's title (a pid that another
    program has taken since is left alone)."""
    for pid in pids:
        for victim in [pid, *children(pid)]:
            if _titled_vllm(victim):
                with suppress(OSError):  # gone meanwhile
                    os.kill(victim, signal.SIGKILL)


class Reaper:
    """Watches `pids` (vLLM's processes this one started) until `stop()`."""

    def __init__(self, pids: set[int]):
        self._watcher: subprocess.Popen | None = None
        if pids and PROC.is_dir():
            self._watcher = subprocess.Popen(
                [sys.executable, "-m", __name__, *map(str, sorted(pids))],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

    def stop(self) -> None:
        """Once vLLM has shut its processes down: the watcher ends, killing nothing (their pids
        may be another program's by then: they wrap at 32,768 here, likely how a test run's
        vLLM server lost its engine core)."""
        if self._watcher is not None:
            with suppress(OSError):  # a watcher gone (killed) cannot be told
                self._watcher.stdin.write(RELEASED)
                self._watcher.stdin.close()
            try:
                self._watcher.wait(timeout=10)
            except subprocess.TimeoutExpired:  # never kept from releasing an engine
                self._watcher.kill()
            self._watcher = None


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the gateway's to handle
    # Until the gateway says it released them (`stop`), or ends without a word.
    if sys.stdin.buffer.read() != RELEASED:
        kill_vllm([int(pid) for pid in sys.argv[1:]])
