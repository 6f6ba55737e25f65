"""Every benchmark script still imports: they run by hand, so nothing else would notice when the
code they call moves."""

import http.server
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import free_port

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("[!_]*.py")))
def test_a_benchmark_script_imports(script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))  # as when run: a script's folder is on the path
    spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", BENCH / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(getattr(module, "main", None))


def _run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    variables = {k: v for k, v in os.environ.items() if not k.startswith("REASONREC_")} | env
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        env=variables,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("script", ["recommend.py", "search.py"])
def test_a_benchmark_without_a_gateway_says_so(script: str) -> None:
    done = _run(script, "--url", "http://127.0.0.1:9")  # nothing listens on port 9
    assert done.returncode == 1
    assert "no gateway answers at http://127.0.0.1:9" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_feedback_benchmark_runs_its_own_server_whatever_the_environment_says(
    tmp_path: Path,
) -> None:
    # API keys meant for a deployment, and a Redis URL nothing answers: its own server on an
    # embedded Redis, with no keys, must still take the load.
    done = _run(
        "feedback.py",
        "--requests", "40", "--seconds", "1", "--workers", "1", "--port", str(free_port()),
        REASONREC_API_KEYS='["deployment-key"]',
        REASONREC_REDIS_URL="redis://127.0.0.1:1/0",
        TMPDIR=str(tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["redis"] == "embedded" and report["results"][1]["requests"] > 0
    assert list(tmp_path.iterdir()) == []  # its data folder and wrk script removed


def test_the_feedback_benchmark_refuses_a_port_something_answers_on() -> None:
    """It measured the server already there (another gateway: it wrote to that store and
    removed nothing), and hid its own server's failure to bind."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _run("feedback.py", "--requests", "40", "--port", str(port))
    assert done.returncode == 1 and f"port {port} is in use" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("script", "option"),
    [("recommend.py", "--requests"), ("search.py", "--requests"), ("feedback.py", "--workers")],
)
def test_a_count_below_one_is_refused_before_any_work(script: str, option: str) -> None:
    """--requests 0 ended in an IndexError after the warm-up (a percentile of nothing)."""
    done = _run(script, option, "0", "--url", "http://127.0.0.1:9")
    assert done.returncode == 2 and "is not a whole number of at least 1" in done.stderr


def test_the_search_benchmark_refuses_a_gateway_on_another_retriever() -> None:
    """Its p50 was compared with the other retriever's and reported under that one's name."""

    class Dense(http.server.BaseHTTPRequestHandler):
        def _answer(self, body: dict) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(body).encode())

        def do_GET(self) -> None:  # /healthz
            self._answer({"status": "ok"})

        def do_POST(self) -> None:  # /v1/search
            self.rfile.read(int(self.headers["Content-Length"]))
            self._answer({"retriever": "dense", "items": []})

        def log_message(self, *_: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Dense) as gateway:
        threading.Thread(target=gateway.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{gateway.server_address[1]}"
        done = _run("search.py", "--url", url, REASONREC_SEARCH_RETRIEVER="bm25")
        gateway.shutdown()
    assert done.returncode == 1, done.stderr[-2000:]
    assert "the gateway searches with dense, this benchmark with bm25" in done.stderr


@pytest.mark.parametrize("script", ["recommend.py", "search.py", "stages.py"])
def test_a_misspelled_setting_is_refused(script: str) -> None:
    """Ignored, it measured another store or model than the operator meant."""
    url = [] if script == "stages.py" else ["--url", "http://127.0.0.1:9"]
    done = _run(script, *url, REASONREC_KEY_PREFX="bench")
    assert done.returncode == 1, done.stderr[-2000:]
    assert "REASONREC_KEY_PREFX: no such setting" in done.stderr
