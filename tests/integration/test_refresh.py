"""The feedback loop end to end, with the real engine: serve -> feedback with request ids ->
`refresh_once` -> the refreshed version is active in the running gateway -> responses name it.
And the gate: a refresh that fails it leaves the active version untouched."""

import asyncio
import subprocess
import sys
import threading
import time
import traceback
from datetime import UTC, datetime
from types import FrameType

import pytest
import redis
from fastapi.testclient import TestClient

from server.config import Settings
from server.index_files import current_version
from server.registry import BROUGHT_IN, Manifest, Registry
from server.store import open_store
from tests.conftest import command_env, dies_with_pytest
from tests.integration.conftest import serve, serving
from tests.server.helpers import until, wait_serving
from trainer import refresh as refresh_module
from trainer.bootstrap import BootstrapResult
from trainer.feedback_log import FeedbackLog
from trainer.refresh import RefreshResult, refresh_once, trainer_dir

pytestmark = pytest.mark.slow
USERS = [f"u{n:05d}" for n in range(10, 22)]
# Tolerances no candidate can miss: these tests are about the loop, not the tiny model's quality.
LOOSE = {"gate_ndcg_tolerance": 1.0, "gate_invalid_tolerance": 1.0, "gate_rmse_tolerance": 4.0}


def serve_and_click(gateway: TestClient) -> dict[str, str]:
    """Each user gets a list and clicks its second item, quoting the request id."""
    clicked = {}
    for user in USERS:
        body = gateway.post("/v1/recommend", json={"user_id": user, "k": 5}).json()
        event = {
            "user_id": user,
            "item_id": body["items"][1]["item_id"],
            "type": "click",
            "request_id": body["request_id"],
        }
        assert gateway.post("/v1/feedback", json={"events": [event]}).status_code == 200
        clicked[body["request_id"]] = event["item_id"]
    return clicked


def _lock_held(settings: Settings) -> bool:
    client = redis.Redis.from_url(settings.redis_url)
    try:
        return bool(client.exists(f"{settings.key_prefix}:trainer:lock"))
    finally:
        client.close()


def logged_examples(settings: Settings) -> dict:
    async def read() -> dict:
        async with open_store(settings) as store:
            return FeedbackLog(store, trainer_dir(settings)).read()

    return asyncio.run(read())


# A refresh of the tiny model takes about a minute; one hung for half an hour in CI once, with
# its stack cut from the log. Past this, the test fails with where every thread and task was.
REFRESH_DEADLINE = 900


def _where(frame: FrameType | None, depth: int = 6) -> str:
    lines = traceback.format_stack(frame)[-depth:] if frame else []
    return "".join(lines).strip()


def _stacks() -> str:
    """The innermost frames of every thread and every pending task of the running loop."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    threads = [
        f"thread {names.get(ident, ident)}:\n{_where(frame)}"
        for ident, frame in sys._current_frames().items()
    ]
    tasks = [
        f"task {task.get_name()}:\n{_where(task.get_stack()[-1] if task.get_stack() else None)}"
        for task in asyncio.all_tasks()
    ]
    return "\n".join(threads + tasks)


async def _refresh(settings: Settings, force: bool) -> RefreshResult:
    async with open_store(settings) as store:
        refreshing = asyncio.ensure_future(
            refresh_once(settings, store, progress=False, force=force)
        )
        done, _ = await asyncio.wait({refreshing}, timeout=REFRESH_DEADLINE)
        if not done:
            pytest.fail(f"refresh still running after {REFRESH_DEADLINE} s:\n{_stacks()}")
        return refreshing.result()


def refresh(settings: Settings, force: bool = False, **update: object) -> RefreshResult:
    """One refresh; `force` publishes past the gate against the retrieval order, which the tiny
    model's noise would otherwise decide (tests/trainer/test_gate.py tests that gate)."""
    settings = settings.model_copy(update={"refresh_grpo_steps": 2, **update})
    # Not asyncio.run: past the deadline it would wait for the hung training thread to finish.
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(_refresh(settings, force))
    finally:
        loop.close()  # leaves a hung thread behind rather than waiting for it


def trained(registry: Registry) -> list[str]:
    return [m.version for m in registry.versions() if m.training.get("method") not in BROUGHT_IN]


def test_gate_rejection_leaves_the_active_version(
    gateway: TestClient, served_settings: Settings, tiny_model: BootstrapResult
) -> None:
    serve_and_click(gateway)
    versions = {m.version for m in Registry(served_settings.registry_path).versions()}
    # A tolerance below -1 asks the candidate to beat the active NDCG by more than 1: impossible.
    # (The tiny model's scores are noise; the tolerances, not its quality, decide these tests.)
    result = refresh(served_settings, gate_ndcg_tolerance=-1.5)
    assert result.outcome == "rejected", result
    assert result.consumed.joined >= len(USERS) and result.gate is not None
    assert {m.version for m in Registry(served_settings.registry_path).versions()} == versions
    assert gateway.get("/v1/models").json()["active"] == tiny_model.version


def test_feedback_refreshes_the_served_model(
    gateway: TestClient, served_settings: Settings, tiny_model: BootstrapResult
) -> None:
    """Here every model counts as large, so refreshes train LoRA adapters: published as adapter
    versions and served as vLLM runtime adapters (the kill-and-restart test below refreshes all
    weights)."""
    serve_and_click(gateway)
    lora = {"refresh_lora_min_params": 0, "refresh_lora_rank": 4}
    registry = Registry(served_settings.registry_path)
    result = refresh(served_settings, True, **LOOSE, **lora)
    try:
        assert result.outcome == "published", result
        assert result.parent == tiny_model.version and result.train_examples >= 1
        # the clicks are interactions the bootstrap's index did not have: rebuilt, made current
        assert current_version(served_settings.data_dir) != tiny_model.index_version
        assert result.fresh_examples > 0  # recent histories join the logged lists
        # the model also rates: the latest ratings trained it, held-out ones gated it
        assert result.rating_examples > 0 and result.rating_holdout_examples > 0
        assert {"rate_rmse", "rate_baseline_rmse"} <= set(result.gate.candidate)
        manifest = registry.manifest(result.version)
        assert manifest.parent == tiny_model.version and manifest.kind == "lora"
        assert manifest.base_model == tiny_model.version
        assert manifest.policy["weights"] and manifest.training["method"] == "grpo-refresh"
        assert manifest.training["lora_rank"] == 4
        published = {path.name for path in registry.path(result.version).iterdir()}
        assert "adapter_config.json" in published and "model.safetensors" not in published
        assert wait_serving(gateway, result.version, 300)["serving"] == result.version
        body = gateway.post("/v1/recommend", json={"user_id": USERS[0], "k": 5}).json()
        assert body["model_version"] == result.version and body["source"] == "llm"
        process = gateway.app.state.serving.engine._process  # the base with room for adapters

        # A refresh of an adapter version trains its adapter on; the swap loads an adapter
        # into the process already running, and the first adapter is unloaded.
        serve_and_click(gateway)
        # The oldest trained version is pruned once this refresh publishes one more than it
        # keeps (versions other tests imported are bases, never pruned).
        old = Manifest(version="v-old", created_at=datetime(2000, 1, 1, tzinfo=UTC))
        registry.register(tiny_model.path, old)
        kept = len(trained(registry))
        second = refresh(served_settings, True, keep_versions=kept, **LOOSE)
        assert second.outcome == "published", second
        assert not registry.has("v-old") and len(trained(registry)) == kept
        manifest = registry.manifest(second.version)
        assert manifest.kind == "lora" and manifest.parent == result.version
        assert manifest.base_model == tiny_model.version and second.lora_rank == 4
        assert wait_serving(gateway, second.version, 60)["serving"] == second.version
        body = gateway.post("/v1/recommend", json={"user_id": USERS[1], "k": 5}).json()
        assert body["model_version"] == second.version and body["source"] == "llm"
        assert gateway.app.state.serving.engine._process is process
        adapter = gateway.app.state.serving.engine._lora.lora_int_id
        # The first adapter is unloaded once its requests are past their time budget.
        assert until(lambda: set(gateway.portal.call(process.llm.list_loras)) == {adapter}, 60)
    finally:
        serve(gateway, tiny_model.version)


def test_a_rollback_while_a_refresh_trains_is_not_undone(
    gateway: TestClient,
    served_settings: Settings,
    tiny_model: BootstrapResult,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    serve_and_click(gateway)
    client = redis.Redis.from_url(served_settings.redis_url, decode_responses=True)
    active = f"{served_settings.key_prefix}:model:active"
    train_and_gate = refresh_module._train_and_gate

    def operator_acts_meanwhile(*args: object) -> object:
        trained = train_and_gate(*args)
        client.set(active, "v-operator")  # as `reasonrec models activate` would, mid-training
        return trained

    monkeypatch.setattr(refresh_module, "_train_and_gate", operator_acts_meanwhile)
    try:
        result = refresh(served_settings, True, **LOOSE)
        assert result.outcome == "published" and result.version, result
        assert result.reason == (
            "gate passed; not activated: v-operator became active while it trained"
        )
        assert client.get(active) == "v-operator"
        assert Registry(served_settings.registry_path).has(result.version)
        # never announced: the gateway still serves what it served
        assert serving(gateway) == tiny_model.version
    finally:
        client.close()
        serve(gateway, tiny_model.version)


def test_killed_refresh_publishes_nothing_and_loses_no_feedback(
    gateway: TestClient, served_settings: Settings, tiny_model: BootstrapResult
) -> None:
    clicked = serve_and_click(gateway)
    registry = Registry(served_settings.registry_path)
    versions = {m.version for m in registry.versions()}
    logged = trainer_dir(served_settings) / "logged.jsonl"
    env = command_env(
        served_settings,
        REASONREC_REFRESH_GRPO_STEPS="200",  # far longer than the test lets it live
        REASONREC_REFRESH_MIN_LISTS=str(served_settings.refresh_min_lists),
    )
    started = time.time()
    trainer = subprocess.Popen(
        [sys.executable, "-c", "from cli import app; app()", "train", "--once"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=dies_with_pytest,
    )
    try:
        # Killed once it has consumed the feedback and is training.
        assert until(lambda: logged.is_file() and logged.stat().st_mtime > started, 300)
        time.sleep(5)
        assert trainer.poll() is None, "the refresh ended before it could be killed"
    finally:
        trainer.kill()
        trainer.wait()
    assert {m.version for m in registry.versions()} == versions  # nothing half-published
    assert gateway.get("/v1/models").json()["active"] == tiny_model.version
    # Its lock lapses; the restarted refresh has every click and publishes.
    assert until(lambda: not _lock_held(served_settings), 60)
    result = refresh(served_settings, True, **LOOSE)
    try:
        assert result.outcome == "published", result
        assert result.lora_rank is None  # the tiny model is small: all weights trained
        positives = {
            request_id: example.positives
            for request_id, example in logged_examples(served_settings).items()
        }
        for request_id, item in clicked.items():
            assert item in positives[request_id]
    finally:
        serve(gateway, tiny_model.version)
