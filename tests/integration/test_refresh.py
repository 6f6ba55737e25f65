"""The feedback loop end to end, with the real engine: serve -> feedback with request ids ->
`refresh_once` -> the refreshed version is active in the running gateway -> responses name it.
And the gate: a refresh that fails it leaves the active version untouched."""

import asyncio

import pytest
from fastapi.testclient import TestClient

from server.app import open_store
from server.config import Settings
from server.registry import Registry
from tests.integration.test_hot_swap import activate, until
from trainer.bootstrap import BootstrapResult
from trainer.refresh import RefreshResult, refresh_once

pytestmark = pytest.mark.slow
USERS = [f"u{n:05d}" for n in range(10, 22)]


def serve_and_click(gateway: TestClient) -> None:
    """Each user gets a list and clicks its second item, quoting the request id."""
    for user in USERS:
        body = gateway.post("/v1/recommend", json={"user_id": user, "k": 5}).json()
        event = {
            "user_id": user,
            "item_id": body["items"][1]["item_id"],
            "type": "click",
            "request_id": body["request_id"],
        }
        assert gateway.post("/v1/feedback", json={"events": [event]}).status_code == 200


async def _refresh(settings: Settings) -> RefreshResult:
    async with open_store(settings) as store:
        return await refresh_once(settings, store, progress=False)


def refresh(settings: Settings, **update: object) -> RefreshResult:
    return asyncio.run(_refresh(settings.model_copy(update={"refresh_grpo_steps": 2, **update})))


def test_gate_rejection_leaves_the_active_version(
    gateway: TestClient, served_settings: Settings, tiny_model: BootstrapResult
) -> None:
    serve_and_click(gateway)
    versions = {m.version for m in Registry(served_settings.registry_path).versions()}
    # A tolerance below -1 asks the candidate to beat the active NDCG by more than 1: impossible.
    result = refresh(served_settings, gate_ndcg_tolerance=-1.5)
    assert result.outcome == "rejected", result
    assert result.consumed.joined >= len(USERS) and result.gate is not None
    assert {m.version for m in Registry(served_settings.registry_path).versions()} == versions
    assert gateway.get("/v1/models").json()["active"] == tiny_model.version


def test_feedback_refreshes_the_served_model(
    gateway: TestClient, served_settings: Settings, tiny_model: BootstrapResult
) -> None:
    serve_and_click(gateway)
    result = refresh(served_settings, gate_ndcg_tolerance=1.0)
    try:
        assert result.outcome == "published", result
        assert result.parent == tiny_model.version and result.train_examples >= 1
        manifest = Registry(served_settings.registry_path).manifest(result.version)
        assert manifest.parent == tiny_model.version
        assert manifest.policy["weights"] and manifest.training["method"] == "grpo-refresh"
        assert until(lambda: gateway.get("/v1/models").json()["serving"] == result.version, 300)
        body = gateway.post("/v1/recommend", json={"user_id": USERS[0], "k": 5}).json()
        assert body["model_version"] == result.version and body["source"] == "llm"
    finally:
        activate(gateway, tiny_model.version)
        assert until(lambda: gateway.get("/v1/models").json()["serving"] == tiny_model.version, 300)
