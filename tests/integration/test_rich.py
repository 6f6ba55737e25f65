"""A Hugging Face model registered with `reasonrec models register` reads the rich rendering:
served by real vLLM with titles and candidates in its prompt, and refreshed on such prompts."""

import pytest
import redis
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cli import app
from server.config import Settings
from server.registry import Registry
from tests.integration.conftest import serve
from tests.integration.test_refresh import USERS, refresh, serve_and_click
from trainer.bootstrap import BootstrapResult

pytestmark = pytest.mark.slow


def impression(settings: Settings, request_id: str) -> dict[str, str]:
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    entries = client.xrange(f"{settings.key_prefix}:impressions")
    [entry] = [fields for _, fields in entries if fields["request_id"] == request_id]
    return entry


def models_command(settings: Settings, args: list[str], monkeypatch: pytest.MonkeyPatch) -> str:
    """`reasonrec models ARGS` against the served settings; the version it printed."""
    monkeypatch.setenv("REASONREC_REDIS_URL", settings.redis_url)
    monkeypatch.setenv("REASONREC_KEY_PREFIX", settings.key_prefix)
    monkeypatch.setenv("REASONREC_DATA_DIR", str(settings.data_dir))
    result = CliRunner().invoke(app, ["models", *args])
    assert result.exit_code == 0, result.output
    return result.stdout.strip().splitlines()[-1]


def test_a_registered_model_is_prompted_and_refreshed_in_the_rich_rendering(
    gateway: TestClient,
    served_settings: Settings,
    tiny_model: BootstrapResult,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Any HF causal LM folder will do; the tiny model's own weights are one at hand.
    registry = Registry(served_settings.registry_path)
    version = models_command(served_settings, ["register", str(tiny_model.path)], monkeypatch)
    assert registry.manifest(version).rendering == "rich"
    try:
        serve(gateway, version)
        served = serve_and_click(gateway)
        body = gateway.post("/v1/recommend", json={"user_id": USERS[0], "k": 5}).json()
        assert body["source"] == "llm" and body["model_version"] == version
        assert len({item["item_id"] for item in body["items"]}) == 5
        entry = impression(served_settings, body["request_id"])
        assert entry["rendering"] == "rich"
        assert "Candidates (" in entry["prompt"] and "History" in entry["prompt"]

        result = refresh(served_settings, True, gate_ndcg_tolerance=1.0, gate_invalid_tolerance=1.0)

        assert result.outcome == "published", result
        assert result.parent == version and result.train_examples >= len(served) // 2
        assert registry.manifest(result.version).rendering == "rich"
    finally:
        serve(gateway, tiny_model.version)
