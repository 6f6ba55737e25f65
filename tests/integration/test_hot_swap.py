"""Zero-downtime swap between two real vLLM engines while requests keep coming, and a gateway whose
in-process engine died serving its model again."""

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from peft import get_peft_model
from transformers import AutoModelForCausalLM

import server.serving
from server.config import Settings
from server.registry import Registry, new_version
from tests.integration.conftest import activate, serve, serving
from tests.server.helpers import until
from trainer.bootstrap import BootstrapResult
from trainer.grpo import lora_config

pytestmark = pytest.mark.slow
CLIENTS = 4


def swap_under_load(gateway: TestClient, settings: Settings, old: str, new: str) -> None:
    """Clients keep asking while `new` is activated and until each had an answer after the old
    engine was released: from the activation on, every answer is 200 from the LLM, each client's
    answers name `old` then `new`, never back. Before it, each client waits for an answer from
    the LLM: a first request can overrun its budget on a busy machine (the old engine's first
    grammars compile), which is no part of the swap."""
    seen: list[list[tuple[int, str | None, str | None]]] = [[] for _ in range(CLIENTS)]
    stop = threading.Event()
    state = gateway.app.state.serving

    def client(n: int) -> None:
        while not stop.is_set():
            response = gateway.post("/v1/recommend", json={"user_id": f"u0000{n + 1}", "k": 5})
            body = response.json()
            seen[n].append((response.status_code, body.get("model_version"), body.get("source")))

    def answered_by_new() -> bool:
        return all(any(v == new for _, v, _ in s) for s in seen)

    def warm() -> bool:
        return all(any(source == "llm" for _, _, source in s) for s in seen)

    def answered_since(counts: list[int]) -> bool:
        return all(len(s) > n for s, n in zip(seen, counts, strict=True))

    with ThreadPoolExecutor(CLIENTS) as pool:
        running = [pool.submit(client, n) for n in range(CLIENTS)]
        try:
            assert until(warm, 120)
            activated_at = [len(answers) for answers in seen]
            activate(gateway, new)
            assert until(answered_by_new, 300), "the new version never answered"
            # The outgoing engine is released once no request holds it (at the latest after the
            # requests' budget): clients go on past that.
            assert until(lambda: not state._closing, settings.llm_timeout_ms / 1000 + 30)
            released_at = [len(answers) for answers in seen]
            assert until(lambda: answered_since(released_at), 60)
        finally:
            stop.set()
            for future in running:
                future.result()
    for answers, first in zip(seen, activated_at, strict=True):
        swap = answers[first:]
        assert all(status == 200 and source == "llm" for status, _, source in swap), answers
        versions = [version for _, version, _ in answers]
        switched = versions.index(new)
        assert set(versions[:switched]) == {old} and set(versions[switched:]) == {new}
    assert serving(gateway) == new


def publish_adapter(registry: Registry, base: str) -> str:
    """A LoRA version of `base` (untrained adapters: this is about swapping, not quality)."""
    model = AutoModelForCausalLM.from_pretrained(registry.path(base))
    staging = registry.staging()
    get_peft_model(model, lora_config(4)).save_pretrained(staging)
    update = {"version": new_version(), "parent": base, "kind": "lora", "base_model": base}
    return registry.publish(staging, registry.manifest(base).model_copy(update=update)).name


def test_swap_under_load_fails_no_request(swapping: TestClient, served_settings: Settings) -> None:
    registry = Registry(served_settings.registry_path)
    old, new = serving(swapping), new_version()
    manifest = registry.manifest(old).model_copy(update={"version": new, "parent": old})
    registry.register(registry.path(old), manifest)
    swap_under_load(swapping, served_settings, old, new)


def test_adapter_swap_under_load_stays_in_one_engine(
    swapping: TestClient, served_settings: Settings, tiny_model: BootstrapResult
) -> None:
    registry = Registry(served_settings.registry_path)
    base = tiny_model.version
    first, second = publish_adapter(registry, base), publish_adapter(registry, base)
    serve(swapping, first)  # the tiny base has no adapter room: a LoRA engine starts
    process = swapping.app.state.serving.engine._process
    swap_under_load(swapping, served_settings, first, second)
    assert swapping.app.state.serving.engine._process is process  # a runtime adapter swap


def test_a_merged_adapter_is_swapped_in_on_its_own_weights(
    swapping: TestClient,
    served_settings: Settings,
    tiny_model: BootstrapResult,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """REASONREC_MERGE_ADAPTERS: the LoRA version runs on its merged weights, a new engine of its
    own, swapped in like any full version."""
    state = swapping.app.state.serving
    merging = state.settings.model_copy(update={"merge_adapters": True})
    monkeypatch.setattr(state, "settings", merging)
    adapter = publish_adapter(Registry(served_settings.registry_path), tiny_model.version)
    swap_under_load(swapping, served_settings, serving(swapping), adapter)
    process = state.engine._process
    assert process.base_version == adapter and process.max_lora_rank is None
    assert (merging.data_dir / "merged" / adapter / "config.json").is_file()


def test_an_engine_whose_core_was_killed_serves_again(
    swapping: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM never restarts a dead engine core (the kernel's OOM killer, say): the gateway opens
    the version anew."""
    monkeypatch.setattr(server.serving, "RECHECK_SECONDS", 1.0)
    state = swapping.app.state.serving
    died, version = state.engine, state.version
    [core] = died._process.llm.engine_core.resources.engine_manager.processes
    os.kill(core.pid, signal.SIGKILL)
    assert until(lambda: died.dead, 60)
    assert until(lambda: state.engine is not died, 300), "the engine was not opened again"
    assert state.version == version
    body = swapping.post("/v1/recommend", json={"user_id": "u00001", "k": 5}).json()
    assert body["source"] == "llm", body
    assert swapping.get("/readyz").json()["status"] == "ready"
