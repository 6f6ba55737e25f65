"""The `reasonrec` command line, run as a user runs it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from server.cli import app
from server.config import Settings
from tests.conftest import free_port

REASONREC = str(Path(sys.executable).parent / "reasonrec")


@pytest.fixture
def env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {
        "REASONREC_REDIS_URL": settings.redis_url,
        "REASONREC_KEY_PREFIX": settings.key_prefix,
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


def test_load_jsonl_reports_counts(env, tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(
        json.dumps({"kind": "item", "item_id": "a", "title": "A"})
        + "\n"
        + json.dumps({"kind": "event", "user_id": "u", "item_id": "a", "type": "click"})
        + "\n"
    )
    result = CliRunner().invoke(app, ["load", "--format", "jsonl", str(data)])
    assert result.exit_code == 0, result.output
    assert "loaded 1 items, 0 users, 1 new events (0 already there)" in result.output
    again = CliRunner().invoke(app, ["load", "--format", "jsonl", str(data)])
    assert "1 new events" not in again.output and "(1 already there)" in again.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["load", "--format", "ml-100k"], "needs a PATH"),
        (["load", "--format", "ml-100k", "/nonexistent"], "is missing u.data"),
        (["load", "--format", "jsonl", "/nonexistent.jsonl"], "is not a file"),
    ],
)
def test_load_errors_are_clear(env, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert message in result.output


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "exited"
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the demo did not become ready")


def _run_demo(tmp_path: Path, port: int) -> str:
    """Start `reasonrec demo` on an embedded Redis, check it serves, stop it; return its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REASONREC_")}
    env |= {"REASONREC_DATA_DIR": str(tmp_path), "REASONREC_PORT": str(port)}
    proc = subprocess.Popen(
        [REASONREC, "demo"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        user = httpx.get(f"{url}/v1/users/u00001").json()
        assert user["user_id"] == "u00001" and user["history"]
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return out + err


def test_demo_loads_once_and_serves_with_embedded_redis(tmp_path: Path) -> None:
    port = free_port()
    first = _run_demo(tmp_path, port)
    assert "loaded the synthetic set" in first
    assert f"curl -s http://127.0.0.1:{port}/v1/users/u00001" in first
    assert (tmp_path / "redis.db").exists()
    second = _run_demo(tmp_path, port)
    assert "loaded the synthetic set" not in second
