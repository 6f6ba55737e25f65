"""Fixtures for the HTTP API tests: apps over the test's Redis prefix, a client to inspect it."""

import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from tests.conftest import REASONREC, command_env, dies_with_pytest, free_port, wait_http


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def make_client(settings: Settings) -> Iterator[Callable[..., TestClient]]:
    """Start an app on a copy of `settings` with some fields changed; closed after the test."""
    with ExitStack() as stack:

        def make(**update: Any) -> TestClient:
            app = create_app(settings.model_copy(update=update))
            return stack.enter_context(TestClient(app))

        yield make


@pytest.fixture
def live_server(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start `reasonrec serve` (uvicorn, a real socket) on the test's settings with some
    REASONREC_* variables changed; returns its base URL. Stopped after the test."""
    processes: list[subprocess.Popen] = []

    def start(**env: str) -> str:
        port = free_port()
        log = (tmp_path / f"serve-{port}.log").open("w")
        process = subprocess.Popen(
            [REASONREC, "serve"],
            env=command_env(settings, REASONREC_PORT=str(port), **env),
            stdout=log,
            stderr=log,
            preexec_fn=dies_with_pytest,
        )
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", process)
        return url

    yield start
    for process in processes:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
