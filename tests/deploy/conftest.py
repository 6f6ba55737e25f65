"""Running processes for the observability tests: a gateway (fake engine, real Redis) that has
served some traffic, and a `reasonrec trainer` sidecar, each with its /metrics on loopback."""

import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.config import Settings
from server.engine import EngineError
from tests.conftest import (
    command_env,
    dies_with_pytest,
    drop_prefix,
    free_port,
    served_in_thread,
    wait_http,
)
from tests.server.test_recommend_logic import FakeEngine, answer, load_shop

START_SECONDS = 90  # the trainer imports torch and TRL before it serves /metrics


@dataclass
class Gateway:
    url: str
    model_version: str  # the label of every recommendation this gateway served
    recommendations: int


@pytest.fixture(scope="session")
def deploy_settings(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    settings = Settings(
        redis_url=redis_url,
        key_prefix=f"deploy-{uuid.uuid4().hex[:8]}",
        data_dir=tmp_path_factory.mktemp("deploy"),
        merge_adapters=False,  # runtime adapters unless a test merges them
    )
    yield settings
    drop_prefix(redis_url, settings.key_prefix)


def _serve_traffic(client: httpx.Client, app, version: str) -> int:
    """A good answer, one that needs repair, one engine failure: every recommendation metric gets
    a series. Returns how many recommendations were served."""
    load_shop(client)
    engines = [
        FakeEngine(answer("p1", "p2", "p3"), model_version=version),
        FakeEngine(answer("p1"), model_version=version),
        FakeEngine(error=EngineError("engine answered 503"), model_version=version),
    ]
    for engine in engines:
        app.state.serving.engine = engine
        response = client.post("/v1/recommend", json={"user_id": "u1", "k": 3})
        assert response.status_code == 200, response.text
    return len(engines)


@pytest.fixture(scope="session")
def gateway(deploy_settings: Settings) -> Iterator[Gateway]:
    """The gateway app served by uvicorn on loopback, after some traffic."""
    app = create_app(deploy_settings)
    with served_in_thread(app, START_SECONDS) as url:
        version = f"deploy-{uuid.uuid4().hex[:8]}"
        with httpx.Client(base_url=url) as client:
            served = _serve_traffic(client, app, version)
        yield Gateway(url, version, served)


@pytest.fixture(scope="session")
def trainer(deploy_settings: Settings) -> Iterator[str]:
    """`reasonrec trainer` in a process of its own; yields its metrics URL. It only waits here:
    a refresh is due after REASONREC_REFRESH_SECONDS or REASONREC_REFRESH_MIN_EVENTS events."""
    port = free_port()
    env = command_env(deploy_settings, REASONREC_TRAINER_METRICS_PORT=str(port))
    command = [str(Path(sys.executable).parent / "reasonrec"), "trainer"]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, preexec_fn=dies_with_pytest
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        wait_http(url, process, START_SECONDS)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
