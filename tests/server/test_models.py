"""GET /v1/models, POST /v1/models/activate and the gateway following activations (real Redis
pub/sub). The engine is a RemoteEngine pointed nowhere: opening one needs no model, so these tests
exercise the swap logic without vLLM (tests/integration swaps real vLLM engines under load)."""

import asyncio
import json
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import server.active_model
import server.engine
import server.serving
from server.app import create_app
from server.config import Settings
from server.engine import EngineError
from server.engine.remote import RemoteEngine
from server.registry import Manifest, Registry
from server.store import ActiveModelChanged, open_store
from tests.server.helpers import metric, publish_version, until, wait_serving

ADMIN = {"Authorization": "Bearer admin-secret"}


def publish(registry_dir: Path, version: str, **fields: Any) -> None:
    publish_version(Registry(registry_dir), version, **fields)


def publish_unreadable_chat(registry_dir: Path) -> None:
    """A chat version "v-chat" whose tokenizer, and so its chat template, cannot load, though
    its files show a template (as far as the activation looks)."""
    publish(registry_dir, "v-chat", chat_template=True)
    template = {"chat_template": "{{ messages[0]['content'] }}"}
    (registry_dir / "v-chat" / "tokenizer_config.json").write_text(json.dumps(template))
    (registry_dir / "v-chat" / "tokenizer.json").write_text("{")


@pytest.fixture
def models_client(make_client: Callable[..., TestClient], tmp_path: Path) -> TestClient:
    publish(tmp_path / "models", "v1", metrics={"ndcg@10": 0.2})
    publish(
        tmp_path / "models",
        "v2",
        parent="v1",
        metrics={"ndcg@10": 0.3, "retrieval_ndcg@10": 0.25},
        rendering="compact",
    )
    publish(tmp_path / "models", "v-future", contract_version="99", chat_template=True)
    return make_client(
        registry_dir=tmp_path / "models",
        admin_keys=["admin-secret"],
        engine_url="http://127.0.0.1:9",  # never called: these tests do not recommend
    )


def test_lists_versions_oldest_first_with_their_metrics(models_client: TestClient) -> None:
    body = models_client.get("/v1/models").json()
    assert [v["version"] for v in body["versions"]] == ["v1", "v2", "v-future"]
    assert body["versions"][1]["metrics"] == {"ndcg@10": 0.3, "retrieval_ndcg@10": 0.25}
    # What a model scores is shown beside what its fallback, the retrieval order, scores.
    assert body["versions"][1]["ndcg_at_10"] == 0.3
    assert body["versions"][1]["retrieval_ndcg_at_10"] == 0.25
    assert body["versions"][1]["rendering"] == "compact"
    assert body["versions"][0]["retrieval_ndcg_at_10"] is None
    assert body["versions"][0]["rendering"] == "rich"  # registered before renderings existed
    assert [v["chat_template"] for v in body["versions"]] == [False, False, True]
    assert body["versions"][0]["tasks"] == ["rank"]  # and before tasks: every version ranks
    assert body["versions"][1]["parent"] == "v1"
    assert body["versions"][1]["kind"] == "full" and body["versions"][1]["base_model"] is None
    assert body["active"] is None and body["previous"] is None and body["serving"] is None


def test_lists_an_adapter_with_the_version_it_adapts(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    publish(tmp_path / "models", "v1")
    publish(tmp_path / "models", "v1-lora", parent="v1", kind="lora", base_model="v1")
    client = make_client(registry_dir=tmp_path / "models", engine_url="http://127.0.0.1:9")
    [_, adapter] = client.get("/v1/models").json()["versions"]
    assert adapter["kind"] == "lora" and adapter["base_model"] == "v1"


def test_activate_swaps_the_gateway_and_remembers_the_previous(models_client: TestClient) -> None:
    first = models_client.post("/v1/models/activate", json={"version": "v1"}, headers=ADMIN)
    assert first.status_code == 200, first.text
    assert first.json() == {"active": "v1", "previous": None}
    assert wait_serving(models_client, "v1")["serving"] == "v1"
    second = models_client.post("/v1/models/activate", json={"version": "v2"}, headers=ADMIN)
    assert second.json() == {"active": "v2", "previous": "v1"}
    again = models_client.post("/v1/models/activate", json={"version": "v2"}, headers=ADMIN)
    assert again.json() == {"active": "v2", "previous": "v1"}  # it answered v2
    body = wait_serving(models_client, "v2")
    assert (body["active"], body["previous"], body["serving"]) == ("v2", "v1", "v2")
    assert metric(models_client, "reasonrec_model_info", version="v2") == 1
    assert metric(models_client, "reasonrec_model_info", version="v1") == 0
    rollback = models_client.post("/v1/models/activate", json={"version": "v1"}, headers=ADMIN)
    assert rollback.json() == {"active": "v1", "previous": "v2"}
    assert wait_serving(models_client, "v1")["serving"] == "v1"


@pytest.mark.parametrize(
    ("version", "status", "code"),
    [
        ("v-missing", 404, "not_found"),
        ("é" * 128, 404, "not_found"),  # 256 bytes: more than a file name holds (was a 500)
        ("v-future", 409, "model_refused"),
        ("v-orphan", 409, "model_refused"),  # an adapter whose base is gone: no gateway opens it
        ("v-bare", 409, "model_refused"),  # its manifest alone: no gateway opens it either
        ("v-bare-adapter", 409, "model_refused"),  # an adapter of that one
    ],
)
def test_activate_refuses_unknown_and_unspoken_versions(
    models_client: TestClient, tmp_path: Path, version: str, status: int, code: str
) -> None:
    registry = Registry(tmp_path / "models")
    publish(tmp_path / "models", "v-orphan", kind="lora", base_model="v-deleted")
    registry.publish(registry.staging(), Manifest(version="v-bare"))
    publish(tmp_path / "models", "v-bare-adapter", kind="lora", base_model="v-bare")
    response = models_client.post("/v1/models/activate", json={"version": version}, headers=ADMIN)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert models_client.get("/v1/models").json()["active"] is None


def test_a_refused_activation_shows_no_folder_of_the_gateway(
    models_client: TestClient, tmp_path: Path
) -> None:
    registry = Registry(tmp_path / "models")
    staging = registry.staging()
    (staging / "config.json").mkdir()  # cannot be read: its error quotes the path
    registry.publish(staging, Manifest(version="v-odd"))
    response = models_client.post("/v1/models/activate", json={"version": "v-odd"}, headers=ADMIN)
    assert response.status_code == 409
    message = response.json()["error"]["message"]
    assert message == "model version v-odd cannot be served: no model in its folder"


def test_activate_refuses_a_version_being_pruned(
    models_client: TestClient, rdb, key_prefix: str
) -> None:
    rdb.sadd(f"{key_prefix}:model:pruning", "v1")  # a prune removing it now
    response = models_client.post("/v1/models/activate", json={"version": "v1"}, headers=ADMIN)
    assert response.status_code == 404
    assert response.json()["error"]["message"] == (
        "model version 'v1' is being removed from the registry"
    )
    assert models_client.get("/v1/models").json()["active"] is None


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"Authorization": "Bearer wrong"}, 401), ({"X-API-Key": "admin-secret"}, 200)],
)
def test_activate_needs_an_admin_key(
    models_client: TestClient, headers: dict[str, str], status: int
) -> None:
    response = models_client.post("/v1/models/activate", json={"version": "v1"}, headers=headers)
    assert response.status_code == status


def test_admin_routes_refused_when_no_admin_key_is_configured(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(admin_keys=[])
    response = client.post("/v1/models/activate", json={"version": "v1"}, headers=ADMIN)
    assert response.status_code == 403


def test_activation_before_the_gateway_starts_is_served(
    make_client: Callable[..., TestClient], tmp_path: Path, models_client: TestClient
) -> None:
    models_client.post("/v1/models/activate", json={"version": "v2"}, headers=ADMIN)
    other = make_client(registry_dir=tmp_path / "models", engine_url="http://127.0.0.1:9")
    assert other.get("/v1/models").json()["serving"] == "v2"


def test_a_metric_that_could_not_be_measured_reads_back_and_lists_as_null(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    publish(tmp_path / "models", "v1", metrics={"rate_rmse": float("nan"), "ndcg@10": 0.2})
    assert math.isnan(Registry(tmp_path / "models").manifest("v1").metrics["rate_rmse"])
    client = make_client(registry_dir=tmp_path / "models", engine_url="http://127.0.0.1:9")
    response = client.get("/v1/models")
    assert response.status_code == 200, response.text
    assert response.json()["versions"][0]["metrics"] == {"rate_rmse": None, "ndcg@10": 0.2}


def test_an_unreadable_manifest_is_left_out_refused_and_explained(
    make_client: Callable[..., TestClient], rdb, key_prefix: str, tmp_path: Path
) -> None:
    publish(tmp_path / "models", "v1")
    publish(tmp_path / "models", "v-bad")
    (tmp_path / "models" / "v-bad" / "manifest.json").write_text('{"version": "v-bad", "kind": 7')
    publish(tmp_path / "models", "v-latin")  # edited by hand, saved in Latin-1: no UTF-8
    (tmp_path / "models" / "v-latin" / "manifest.json").write_bytes(b'{"version": "caf\xe9"}')
    rdb.set(f"{key_prefix}:model:active", "v-bad")
    client = make_client(
        registry_dir=tmp_path / "models",
        admin_keys=["admin-secret"],
        engine_url="http://127.0.0.1:9",
    )

    listed = client.get("/v1/models")
    activated = client.post("/v1/models/activate", json={"version": "v-bad"}, headers=ADMIN)
    ready = client.get("/readyz").json()

    assert listed.status_code == 200, listed.text
    assert [v["version"] for v in listed.json()["versions"]] == ["v1"]
    assert activated.status_code == 409 and activated.json()["error"]["code"] == "model_refused"
    # The client is told what, not where: no folder of the gateway's, no manifest text.
    message = "model version 'v-bad' has an unreadable manifest"
    assert activated.json()["error"]["message"] == message
    latin = client.post("/v1/models/activate", json={"version": "v-latin"}, headers=ADMIN)
    assert latin.status_code == 409, latin.text
    assert ready["status"] == "degraded" and ready["model_version"] is None
    assert ready["checks"]["engine"] == "model version 'v-bad' has an unreadable manifest"


def test_an_activation_replacing_a_version_changes_nothing_once_another_is_active(
    settings: Settings,
) -> None:
    async def activations() -> None:
        async with open_store(settings) as store:
            await store.set_active_model("v1")
            assert await store.set_active_model("v2", replacing="v1") == "v1"
            await store.set_active_model("v3")  # an operator's, while a refresh trained on v2
            with pytest.raises(ActiveModelChanged) as changed:
                await store.set_active_model("v4", replacing="v2")
            assert changed.value.active == "v3"
            assert await store.active_model() == "v3"
            assert await store.previous_model() == "v2"

    asyncio.run(activations())


def test_a_first_activation_changes_nothing_once_another_is_active(settings: Settings) -> None:
    """Two bootstraps on an empty store: each saw no version active; the first activates."""

    async def activations() -> None:
        async with open_store(settings) as store:
            assert await store.set_active_model("v1", replacing=None, checked=True) is None
            with pytest.raises(ActiveModelChanged) as changed:
                await store.set_active_model("v2", replacing=None, checked=True)
            assert changed.value.active == "v1"
            assert await store.active_model() == "v1"

    asyncio.run(activations())


def test_a_version_that_cannot_open_leaves_no_engine_running(
    models_client: TestClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A chat version whose tokenizer cannot load, nor its template. Every engine started for it
    # must be closed again (in-process, each would be a vLLM process).
    publish_unreadable_chat(tmp_path / "models")
    started: list = []
    opening = server.active_model._open

    def counted(*args: Any) -> Any:
        started.append(engine := opening(*args))
        return engine

    monkeypatch.setattr(server.active_model, "_open", counted)
    serving = models_client.app.state.serving
    for _ in range(2):
        models_client.post("/v1/models/activate", json={"version": "v-chat"}, headers=ADMIN)
    refused = "the tokenizer of v-chat cannot be read"
    assert until(lambda: models_client.get("/readyz").json()["checks"]["engine"] == refused, 10)
    assert serving.version is None
    assert started == []  # the version was refused before any engine started


def test_the_gateway_starts_when_the_active_engine_cannot_open(
    make_client: Callable[..., TestClient],
    rdb,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    publish(tmp_path / "models", "v1")
    rdb.set(f"{key_prefix}:model:active", "v1")

    def failing(*_: Any) -> Any:
        raise EngineError("LoRA rank 64 is above the engine's room")

    monkeypatch.setattr(server.active_model, "_open", failing)
    client = make_client(registry_dir=tmp_path / "models", engine_url="http://127.0.0.1:9")

    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert (
        ready.json()["checks"]["engine"]
        == "model v1 could not be opened (the gateway's log says why)"
    )
    assert client.post("/v1/recommend", json={"user_id": "u1", "k": 3}).status_code == 200


def test_an_unreadable_index_leaves_the_gateway_serving(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    indexes = tmp_path / "var" / "indexes"
    indexes.mkdir(parents=True)
    (indexes / "current").write_text("v20260101-000000-abcdef\n")  # a folder that is not there
    client = make_client(data_dir=tmp_path / "var")
    assert client.get("/readyz").status_code == 200
    assert client.app.state.serving.index is None
    assert client.post("/v1/recommend", json={"user_id": "u1", "k": 3}).status_code == 200


def test_an_activation_whose_announcement_was_lost_is_served(
    models_client: TestClient, rdb, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server.serving, "RECHECK_SECONDS", 0.2)
    models_client.post("/v1/models/activate", json={"version": "v1"}, headers=ADMIN)
    assert wait_serving(models_client, "v1")["serving"] == "v1"
    rdb.set(f"{key_prefix}:model:active", "v2")  # set, never announced
    assert wait_serving(models_client, "v2")["serving"] == "v2"


def test_a_refused_version_is_not_reopened_until_announced_again(
    models_client: TestClient,
    tmp_path: Path,
    rdb,
    key_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server.serving, "RECHECK_SECONDS", 0.1)
    publish_unreadable_chat(tmp_path / "models")
    opened: list[str] = []
    opening = server.active_model.open_engine

    def counted(settings: Settings, version: str, serving: Any = None) -> Any:
        opened.append(version)
        return opening(settings, version, serving)

    monkeypatch.setattr(server.serving, "open_engine", counted)
    rdb.set(f"{key_prefix}:model:active", "v-chat")
    time.sleep(1.5)  # fifteen rechecks
    assert opened == ["v-chat"]
    models_client.post("/v1/models/activate", json={"version": "v-chat"}, headers=ADMIN)
    assert until(lambda: len(opened) == 2, 10)


def test_a_dead_engine_is_opened_again(
    models_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine that can never answer again (an in-process core killed for memory) is replaced
    by a new one on the same version; tests/integration kills a real vLLM core."""
    models_client.post("/v1/models/activate", json={"version": "v1"}, headers=ADMIN)
    assert wait_serving(models_client, "v1")["serving"] == "v1"
    serving = models_client.app.state.serving
    died = serving.engine
    monkeypatch.setattr(RemoteEngine, "dead", property(lambda engine: engine is died))
    monkeypatch.setattr(server.serving, "RECHECK_SECONDS", 0.1)
    assert until(lambda: serving.engine is not died, 10)
    assert serving.version == "v1"


def test_a_dead_engine_is_opened_again_while_the_active_version_cannot_be(
    models_client: TestClient, monkeypatch: pytest.MonkeyPatch, rdb, key_prefix: str
) -> None:
    """Another version active, one this gateway refuses (a newer contract in a rolling deploy):
    the reopened engine was dropped as superseded, and the gateway served no model again."""
    models_client.post("/v1/models/activate", json={"version": "v1"}, headers=ADMIN)
    assert wait_serving(models_client, "v1")["serving"] == "v1"
    serving = models_client.app.state.serving
    monkeypatch.setattr(server.serving, "RECHECK_SECONDS", 0.1)
    rdb.set(f"{key_prefix}:model:active", "v-future")  # refused: contract 99
    assert until(lambda: serving._wanted == "v-future", 10)
    died = serving.engine
    monkeypatch.setattr(RemoteEngine, "dead", property(lambda engine: engine is died))
    assert until(lambda: serving.engine is not died, 10)
    assert serving.version == "v1"


def test_a_query_model_served_against_another_retriever_is_logged(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    publish(tmp_path / "models", "v-dense", training={"search_retriever": "dense"})
    publish(tmp_path / "models", "v-bm25", training={"search_retriever": "bm25"})
    remote = settings.model_copy(
        update={"registry_dir": tmp_path / "models", "engine_url": "http://127.0.0.1:9"}
    )

    for version in ("v-bm25", "v-dense"):
        asyncio.run(server.active_model.open_engine(remote, version).close())

    warned = [r for r in caplog.records if r.message.startswith("search model trained against")]
    assert [(r.version, r.trained_against, r.serving) for r in warned] == [
        ("v-dense", "dense", "bm25")
    ]


def test_a_version_whose_prompts_the_history_size_shortens_is_logged(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    publish(tmp_path / "models", "v-ranks", prompt_history=8, tasks=["rank"])
    publish(tmp_path / "models", "v-rates", prompt_history=4, tasks=["rate"])  # lean: 10 ratings
    remote = settings.model_copy(
        update={
            "registry_dir": tmp_path / "models",
            "engine_url": "http://127.0.0.1:9",
            "history_size": 8,
        }
    )

    for version in ("v-ranks", "v-rates"):
        asyncio.run(server.active_model.open_engine(remote, version).close())

    warned = [
        r for r in caplog.records if r.message == "prompts shortened by REASONREC_HISTORY_SIZE"
    ]
    assert [(r.version, r.trained_with) for r in warned] == [("v-rates", 10)]


def test_a_version_whose_opening_failed_for_a_passing_reason_is_tried_again(
    models_client: TestClient, rdb, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory still held by an engine on its way out: the gateway served its fallback for good."""
    monkeypatch.setattr(server.serving, "RECHECK_SECONDS", 0.1)
    serving = models_client.app.state.serving
    serving._backoff = 0.1
    opened: list[str] = []
    opening = server.active_model.open_engine

    def failing_once(settings: Settings, version: str, serving: Any = None) -> Any:
        opened.append(version)
        if len(opened) == 1:
            raise EngineError("engine core failed to start: not enough memory")
        return opening(settings, version, serving)

    monkeypatch.setattr(server.serving, "open_engine", failing_once)
    rdb.set(f"{key_prefix}:model:active", "v1")

    assert wait_serving(models_client, "v1")["serving"] == "v1"
    assert opened == ["v1", "v1"]


def test_a_version_waiting_to_be_tried_again_does_not_hold_back_another(
    models_client: TestClient,
    tmp_path: Path,
    rdb,
    key_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One wait for the gateway, not per version: a version activated while another's retry was
    far off went unserved until then (up to 15 minutes)."""
    monkeypatch.setattr(server.serving, "RECHECK_SECONDS", 0.1)
    publish(tmp_path / "models", "v3")
    opening = server.active_model.open_engine

    def failing_v2(settings: Settings, version: str, serving: Any = None) -> Any:
        if version == "v2":
            raise EngineError("engine core failed to start: not enough memory")
        return opening(settings, version, serving)

    trying_later = server.serving.Serving._try_later

    def far_off(serving: server.serving.Serving, version: str) -> None:
        trying_later(serving, version)
        serving._retry_at = time.monotonic() + 100  # as after many failures

    monkeypatch.setattr(server.serving, "open_engine", failing_v2)
    monkeypatch.setattr(server.serving.Serving, "_try_later", far_off)
    serving = models_client.app.state.serving
    rdb.set(f"{key_prefix}:model:active", "v2")
    assert until(lambda: serving._failed == "v2", 10)
    rdb.set(f"{key_prefix}:model:active", "v3")  # set, never announced

    assert wait_serving(models_client, "v3")["serving"] == "v3"


def test_a_version_rolled_back_while_it_opened_never_serves(
    models_client: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Activated, then rolled back while its engine opened (minutes for a real one): it served
    until the version rolled back to, whose engine the swap had released, opened again."""

    def activate(version: str) -> dict[str, Any]:
        response = models_client.post(
            "/v1/models/activate", json={"version": version}, headers=ADMIN
        )
        assert response.status_code == 200, response.text
        return response.json()

    def dropped() -> bool:
        return any(r.getMessage().startswith("model swap dropped") for r in caplog.records)

    activate("v1")
    assert wait_serving(models_client, "v1")["serving"] == "v1"
    opened, rolled_back = [], threading.Event()
    opening = server.active_model.open_engine

    def slow(settings: Settings, version: str, serving: Any = None) -> Any:
        opened.append(version)
        rolled_back.wait(10)
        return opening(settings, version, serving)

    monkeypatch.setattr(server.serving, "open_engine", slow)
    with caplog.at_level("INFO", logger="server.serving"):
        activate("v2")
        assert until(lambda: opened == ["v2"], 10)
        assert activate("v1") == {"active": "v1", "previous": "v2"}
        rolled_back.set()
        assert until(dropped, 10), [r.getMessage() for r in caplog.records]

    body = models_client.get("/v1/models").json()
    assert (body["active"], body["serving"]) == ("v1", "v1")
    time.sleep(0.5)  # the rollback's announcement, handled: v1 serves already
    assert opened == ["v2"]  # v1 was not opened again


def test_an_adapter_load_that_never_answers_does_not_stop_later_swaps(
    models_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A swap holds the lock: one whose engine core died mid-load held it for ever."""
    monkeypatch.setattr(server.serving, "PREPARE_SECONDS", 0.2)
    hanging = RemoteEngine.prepare

    async def never(engine: RemoteEngine, handover: bool = False) -> None:
        if engine.model_version == "v1":
            await asyncio.Event().wait()
        await hanging(engine, handover)

    monkeypatch.setattr(RemoteEngine, "prepare", never)
    models_client.post("/v1/models/activate", json={"version": "v1"}, headers=ADMIN)
    models_client.post("/v1/models/activate", json={"version": "v2"}, headers=ADMIN)

    assert wait_serving(models_client, "v2")["serving"] == "v2"


def test_shutdown_abandons_a_swap_whose_engine_is_not_ready(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A remote engine's handover waits up to 30 s for its server to list the new version:
    shutdown waited for it (k8s grants 45 s in all). Now the swap is abandoned and its engine
    released."""
    monkeypatch.setattr(server.serving, "PREPARE_SECONDS", 20.0)
    publish(tmp_path / "models", "v1")
    publish(tmp_path / "models", "v2")
    waiting, closed = threading.Event(), []
    preparing, closing = RemoteEngine.prepare, RemoteEngine.close

    async def hangs(engine: RemoteEngine, handover: bool = False) -> None:
        if engine.model_version == "v2":
            waiting.set()
            await asyncio.Event().wait()
        await preparing(engine, handover)

    async def close(engine: RemoteEngine) -> None:
        closed.append(engine.model_version)
        await closing(engine)

    monkeypatch.setattr(RemoteEngine, "prepare", hangs)
    monkeypatch.setattr(RemoteEngine, "close", close)
    update = {
        "registry_dir": tmp_path / "models",
        "admin_keys": ["admin-secret"],
        "engine_url": "http://127.0.0.1:9",
    }
    with TestClient(create_app(settings.model_copy(update=update))) as client:
        client.post("/v1/models/activate", json={"version": "v1"}, headers=ADMIN)
        assert wait_serving(client, "v1")["serving"] == "v1"
        client.post("/v1/models/activate", json={"version": "v2"}, headers=ADMIN)
        assert waiting.wait(10)
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 5
    assert sorted(closed) == ["v1", "v2"]


def test_shutdown_releases_an_engine_its_thread_was_still_opening(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An in-process engine opens in a thread for minutes; a thread cannot be stopped, so the
    engine it opens is released once it has. No swap starts after stop()."""
    opened: list[Outgoing] = []

    def slow_open(settings: Settings, version: str, serving: object) -> Outgoing:
        time.sleep(0.5)
        opened.append(engine := Outgoing(version))
        return engine

    monkeypatch.setattr(server.serving, "open_engine", slow_open)
    serving = server.serving.Serving(settings.model_copy(update={"registry_dir": tmp_path}), None)

    async def scenario() -> tuple[bool, bool]:
        swapping = asyncio.create_task(serving.swap("v1"))
        await asyncio.sleep(0.1)  # opening in its thread
        await serving.stop()
        return await swapping, await serving.swap("v2")

    assert asyncio.run(scenario()) == (False, False)
    assert [(e.model_version, e.closed) for e in opened] == [("v1", True)]
    assert serving.engine is None


def test_the_reason_for_no_engine_follows_what_redis_says_once_it_answers(
    settings: Settings,
) -> None:
    async def reason() -> str | None:
        async with open_store(settings) as store:
            serving = server.serving.Serving(settings, store)
            serving.problem = "active model unknown: redis unreachable at startup"
            await serving._catch_up()  # Redis answers now: no version is active
            return serving.problem

    assert asyncio.run(reason()) == "no active model: run `reasonrec bootstrap`"


class Outgoing:
    """An engine a swap has replaced: only its release is watched."""

    def __init__(self, model_version: str = "v-old") -> None:
        self.model_version, self.closed = model_version, False

    async def close(self) -> None:
        self.closed = True


def test_the_metrics_of_versions_pruned_from_the_registry_are_dropped(
    settings: Settings, tmp_path: Path
) -> None:
    """One set of series per version served: with hourly refreshes they grew without end."""
    publish(tmp_path / "models", "v1")
    metrics = server.serving.metrics
    metrics.RECOMMENDATIONS.labels("llm", "v-pruned").inc()
    metrics.RECOMMENDATIONS.labels("llm", "v1").inc()
    metrics.RECOMMENDATIONS.labels("fallback", "").inc()  # no model: not a version
    metrics.POSITIVES.labels("v-pruned").inc()
    update = {"registry_dir": tmp_path / "models"}
    serving = server.serving.Serving(settings.model_copy(update=update), None)
    outgoing = Outgoing("v-pruned")
    asyncio.run(serving._close_later(outgoing))  # once the outgoing engine is released

    def versions(counter: Any) -> set[str]:
        return {s.labels["model_version"] for m in counter.collect() for s in m.samples}

    assert "v-pruned" not in versions(metrics.RECOMMENDATIONS) | versions(metrics.POSITIVES)
    assert {"v1", ""} <= versions(metrics.RECOMMENDATIONS) and outgoing.closed


def test_an_outgoing_engine_is_released_once_the_last_request_holding_it_ends(
    settings: Settings, tmp_path: Path
) -> None:
    """A request whose Redis reads took longer than the LLM budget used to reach an engine the
    swap had closed after that budget, and got the fallback."""
    update = {"registry_dir": tmp_path / "models", "llm_timeout_ms": 10}
    serving = server.serving.Serving(settings.model_copy(update=update), None)
    old = serving.engine = Outgoing()

    async def scenario() -> tuple[bool, bool]:
        with serving.hold() as (engine, _):
            serving.engine = None  # what a swap does, before it releases the old engine
            release = asyncio.create_task(serving._close_later(old))
            await asyncio.sleep(1.5)  # past the LLM budget + 1 s
            closed_while_held = engine.closed
        await asyncio.wait_for(release, 1)
        return closed_while_held, old.closed

    assert asyncio.run(scenario()) == (False, True)


def test_an_outgoing_engine_held_by_a_stuck_request_is_released_at_the_limit(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server.engine, "MIN_RELEASE_SECONDS", 0.2)
    update = {"registry_dir": tmp_path, "llm_timeout_ms": 10}  # stuck past 1.01 s
    serving = server.serving.Serving(settings.model_copy(update=update), None)
    old = serving.engine = Outgoing()

    async def scenario() -> bool:
        with serving.hold():
            serving.engine = None
            await asyncio.wait_for(serving._close_later(old), 3)
            return old.closed

    assert asyncio.run(scenario()) is True
