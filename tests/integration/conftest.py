"""Session fixtures for integration tests: a tiny model trained once, then served by real vLLM.

`reasonrec bootstrap --preset tiny --task rank --task rate --task search` runs once per session on
a small synthetic catalog in a store prefix of the session's own; every test gets the gateway with
its in-process vLLM engine, which serves `/v1/recommend`, `/v1/rate` and `/v1/search`.
"""

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from contract.tasks import Task
from server.app import create_app
from server.config import Settings
from server.loaders.synthetic import generate
from server.loaders.writer import progress_bar, write
from server.store import open_store
from tests.conftest import TEST_MIN_LISTS, drop_prefix
from tests.server.helpers import wait_serving
from trainer.bootstrap import BootstrapResult, bootstrap

ADMIN_KEY = "it-admin"
EVERY_TASK = frozenset(Task)
SYNTHETIC = {"users": 60, "items": 150, "events_per_user": 30, "seed": 3}


@pytest.fixture(scope="session")
def served_settings(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    settings = Settings(
        redis_url=redis_url,
        key_prefix=f"it-{uuid.uuid4().hex[:8]}",
        data_dir=tmp_path_factory.mktemp("served"),
        candidates=20,
        prompt_history=10,
        llm_timeout_ms=20_000,  # generous: CI machines are slow and shared; timeouts tested apart
        kv_cache_bytes=128 * 1024 * 1024,
        admin_keys=[ADMIN_KEY],
        merge_adapters=False,  # runtime adapters unless a test merges them
        refresh_min_lists=TEST_MIN_LISTS,
    )
    yield settings
    drop_prefix(redis_url, settings.key_prefix)


async def _prepare(settings: Settings) -> BootstrapResult:
    async with open_store(settings) as store:
        with progress_bar() as progress:
            await write(store, generate(**SYNTHETIC), progress)
        # Forced past the gate against retrieval: these tests are about serving; how well the
        # recipe ranks is measured by bench/stages.py and `reasonrec eval`.
        return await bootstrap(settings, store, "tiny", force=True, tasks=EVERY_TASK)


@pytest.fixture(scope="session")
def tiny_model(served_settings: Settings) -> BootstrapResult:
    """The tiny preset bootstrapped on the synthetic catalog: index, model, active version."""
    return asyncio.run(_prepare(served_settings))


@pytest.fixture(scope="session")
def gateway(served_settings: Settings, tiny_model: BootstrapResult) -> Iterator[TestClient]:
    """The app with the in-process vLLM engine serving the tiny model (started once)."""
    with TestClient(create_app(served_settings)) as client:
        yield client


@pytest.fixture(scope="module")
def swapping(gateway: TestClient, tiny_model: BootstrapResult) -> Iterator[TestClient]:
    """The gateway, for a module whose tests activate other versions, each from whatever the test
    before it left serving; the tiny model serves again after the module's last test (each swap
    starts an engine: one swap back per module, not one per test)."""
    yield gateway
    serve(gateway, tiny_model.version)


def activate(gateway: TestClient, version: str) -> None:
    response = gateway.post(
        "/v1/models/activate",
        json={"version": version},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert response.status_code == 200, response.text


def serving(gateway: TestClient) -> str | None:
    return gateway.get("/v1/models").json()["serving"]


def serve(gateway: TestClient, version: str) -> None:
    """Activate `version` and wait until the gateway serves it (a new engine may start)."""
    activate(gateway, version)
    assert wait_serving(gateway, version, 300)["serving"] == version, f"{version} is not served"
