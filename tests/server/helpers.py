"""Helpers shared by the HTTP API tests."""

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from safetensors.numpy import save_file

from server.registry import Manifest, Registry


def put_items(client: TestClient, *item_ids: str) -> None:
    """Create catalog items titled 'Title <id>'."""
    items = [{"item_id": item_id, "title": f"Title {item_id}"} for item_id in item_ids]
    response = client.post("/v1/items", json={"items": items})
    assert response.status_code == 200, response.text


def post_events(client: TestClient, *events: dict[str, Any]) -> Any:
    return client.post("/v1/feedback", json={"events": list(events)})


def metric(client: TestClient, name: str, **labels: str) -> float:
    """The current value of one sample on /metrics (0 when absent)."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    total = 0.0
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    """The response is `status` with the one error shape and `code`; returns the error object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "details"}, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    assert "Traceback" not in response.text
    return error


def until(check: Callable[[], bool], seconds: float) -> bool:
    """Poll `check` until it holds (True) or `seconds` pass (False)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def wait_serving(client: TestClient, version: str, seconds: float = 10) -> dict[str, Any]:
    """GET /v1/models once the gateway serves `version`, or once `seconds` have passed."""
    deadline = time.monotonic() + seconds
    while True:
        body = client.get("/v1/models").json()
        if body["serving"] == version or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


def write_model(folder: Path) -> None:
    """What a Hugging Face model folder holds, as far as the registry cares."""
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    save_file({"weight": np.zeros(1, dtype=np.float32)}, folder / "model.safetensors")


def publish_version(registry: Registry, version: str, **fields: Any) -> Path:
    """A version the registry serves (weights no engine could load: for fake engines)."""
    staging = registry.staging()
    write_model(staging)
    return registry.publish(staging, Manifest(version=version, **fields))
