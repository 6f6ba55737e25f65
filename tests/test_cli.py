"""`reasonrec demo` and `reasonrec models`, run as a user would (slow: trains the tiny model)."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REASONREC, RedisProcess, dies_with_pytest, free_port

pytestmark = pytest.mark.slow


def _env(data_dir: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REASONREC_")}
    return env | {
        "REASONREC_DATA_DIR": str(data_dir),
        "REASONREC_PORT": str(port),
        "REASONREC_CANDIDATES": "20",
        "REASONREC_PROMPT_HISTORY": "10",
        "REASONREC_KV_CACHE_BYTES": str(128 * 1024 * 1024),
    }


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/readyz", timeout=2).json().get("status") == "ready":
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    raise TimeoutError("the demo did not become ready")


def _run_demo(data_dir: Path, port: int, log: Path) -> dict:
    """Start `reasonrec demo`, ask it for a recommendation, stop it; returns the answer."""
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        # Output goes to a file: a pipe nobody reads would fill up and stall the demo.
        proc = subprocess.Popen(
            [REASONREC, "demo", "--preset", "tiny"],
            env=_env(data_dir, port),
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=dies_with_pytest,
        )
        try:
            _wait_ready(url, proc, log)
            answer = httpx.post(f"{url}/v1/recommend", json={"user_id": "u00001"}, timeout=60)
            rated = httpx.post(
                f"{url}/v1/rate", json={"user_id": "u00001", "item_ids": ["i00000"]}, timeout=60
            )
            assert rated.status_code == 200, rated.text  # the demo's model also rates
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()  # a demo left behind would hold the cores after the test
                proc.wait()
                raise
    assert proc.returncode == 0, log.read_text()[-3000:]
    return answer.json()


def test_demo_bootstraps_once_then_starts_without_training(tmp_path: Path) -> None:
    port = free_port()
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    answer = _run_demo(tmp_path / "var", port, first_log)
    assert answer["source"] == "llm" and len(answer["items"]) == 10
    first = first_log.read_text()
    assert "loaded 600 items, 300 users" in first and "bootstrapped model" in first
    curl = (
        f"curl -s -H 'Content-Type: application/json' -X POST http://127.0.0.1:{port}/v1/recommend"
    )
    assert curl in first
    assert f"-X POST http://127.0.0.1:{port}/v1/rate -d" in first
    assert (tmp_path / "var" / "redis.db").exists()

    again = _run_demo(tmp_path / "var", port, second_log)
    second = second_log.read_text()
    assert "loaded 600 items" not in second and "bootstrapped model" not in second
    assert again["model_version"] == answer["model_version"]

    listed = subprocess.run(
        [REASONREC, "models", "list"], env=_env(tmp_path / "var", port), capture_output=True
    )
    assert f"* {answer['model_version']}" in listed.stdout.decode()
    manifest = json.loads(
        (tmp_path / "var" / "models" / answer["model_version"] / "manifest.json").read_text()
    )
    assert manifest["contract_version"] == "1" and manifest["training"]["preset"] == "tiny"


@pytest.mark.parametrize(
    ("url", "status", "message"),
    [
        ("redis://127.0.0.1:1/0", 1, "Redis did not answer"),  # nothing listens on port 1
        ("localhost:6379", 2, "REASONREC_REDIS_URL: Value error, a Redis URL starts with"),
        # A password with an unencoded "/": redis-py's message would quote a part of it.
        ("redis://:ab/cd@127.0.0.1:6379/0", 2, "the port in a Redis URL is a number"),
        # redis-py reads a database it cannot parse as database 0: another deployment's data
        ("redis://127.0.0.1:6379/x", 2, "the database in a Redis URL is a number, not 'x'"),
    ],
)
def test_an_unusable_redis_is_one_line_not_a_traceback(
    tmp_path: Path, url: str, status: int, message: str
) -> None:
    env = {**os.environ, "REASONREC_REDIS_URL": url, "REASONREC_DATA_DIR": str(tmp_path)}
    done = subprocess.run(
        [REASONREC, "models", "list"], env=env, capture_output=True, text=True, timeout=60
    )
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == status, output
    assert message in output and "Traceback" not in output


@pytest.mark.parametrize("password", ["", ":wrong@"])
def test_a_redis_that_refuses_the_credentials_says_so(tmp_path: Path, password: str) -> None:
    """redis-py raises a ConnectionError for them: "Redis did not answer", when it had."""
    server = RedisProcess(tmp_path, password="secret")
    server.start()
    try:
        url = server.url.replace("//", f"//{password}")
        env = {**os.environ, "REASONREC_REDIS_URL": url, "REASONREC_DATA_DIR": str(tmp_path)}
        done = subprocess.run(
            [REASONREC, "models", "prune", "--keep", "1"], env=env, capture_output=True, text=True
        )
    finally:
        server.stop()
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1, output
    assert "Redis refused the credentials" in output and "did not answer" not in output


def test_a_database_the_redis_does_not_have_is_one_line(tmp_path: Path, redis_url: str) -> None:
    if not redis_url.startswith("redis://"):
        pytest.skip("the test Redis has no TCP address to name a database on")
    url = redis_url.rsplit("/", 1)[0] + "/99"  # 16 databases by default
    env = {**os.environ, "REASONREC_REDIS_URL": url, "REASONREC_DATA_DIR": str(tmp_path)}
    done = subprocess.run(
        [REASONREC, "models", "list"], env=env, capture_output=True, text=True, timeout=60
    )
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1, output
    assert "Redis refused: DB index is out of range" in output and "Traceback" not in output
