"""Zero-downtime swap between two real vLLM engines while requests keep coming."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from server.config import Settings
from server.registry import Registry, new_version
from tests.integration.conftest import ADMIN_KEY
from tests.server.helpers import until
from trainer.bootstrap import BootstrapResult

pytestmark = pytest.mark.slow
CLIENTS = 4


def activate(gateway: TestClient, version: str) -> None:
    response = gateway.post(
        "/v1/models/activate",
        json={"version": version},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert response.status_code == 200, response.text


def test_swap_under_load_fails_no_request(
    gateway: TestClient, served_settings: Settings, tiny_model: BootstrapResult
) -> None:
    registry = Registry(served_settings.registry_path)
    old, new = tiny_model.version, new_version()
    manifest = registry.manifest(old).model_copy(update={"version": new, "parent": old})
    registry.register(registry.path(old), manifest)
    seen: list[list[tuple[int, str | None, str | None]]] = [[] for _ in range(CLIENTS)]
    stop = threading.Event()

    def client(n: int) -> None:
        while not stop.is_set():
            response = gateway.post("/v1/recommend", json={"user_id": f"u0000{n + 1}", "k": 5})
            body = response.json()
            seen[n].append((response.status_code, body.get("model_version"), body.get("source")))

    def answered_by_new() -> bool:
        return all(any(v == new for _, v, _ in s) for s in seen)

    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            running = [pool.submit(client, n) for n in range(CLIENTS)]
            try:
                assert until(lambda: all(seen), 60)
                activate(gateway, new)
                assert until(answered_by_new, 300), "the new version never answered"
                time.sleep(served_settings.llm_timeout_ms / 1000 + 2)  # past the old engine's end
            finally:
                stop.set()
                for future in running:
                    future.result()
        for answers in seen:
            assert all(status == 200 and source == "llm" for status, _, source in answers)
            versions = [version for _, version, _ in answers]
            switched = versions.index(new)
            assert set(versions[:switched]) == {old} and set(versions[switched:]) == {new}
        assert gateway.get("/v1/models").json()["serving"] == new
    finally:
        activate(gateway, old)
        assert until(lambda: gateway.get("/v1/models").json()["serving"] == old, 300)
