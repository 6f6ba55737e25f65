"""docker/serve_vllm.py: vLLM serves the active version under the name gateways ask for, and
follows activations. A `sleep` process stands in for vLLM; the store is the test's real Redis."""

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Callable

import httpx
import pytest

from server.config import Settings
from server.registry import ADAPTER_CONFIG, Manifest, Registry, RegistryError
from server.store import open_store
from tests.conftest import RedisProcess
from tests.deploy.helpers import (
    COMPOSE_CPU,
    COMPOSE_GPU,
    DOCKER,
    K8S,
    compose_config,
    kustomize,
    load_script,
    reasonrec_env,
)
from tests.server.helpers import publish_version

serve_vllm = load_script(DOCKER / "serve_vllm.py")
POLL = 0.05


def publish(settings: Settings, *versions: str, **fields: object) -> None:
    registry = Registry(settings.registry_path)
    for version in versions:
        publish_version(registry, version, **fields)


def publish_adapter(settings: Settings, version: str, base: str, rank: int = 8) -> None:
    registry = Registry(settings.registry_path)
    staging = registry.staging()
    (staging / ADAPTER_CONFIG).write_text(json.dumps({"r": rank}))
    (staging / "adapter_model.safetensors").write_bytes(b"")  # read by vLLM alone
    registry.publish(staging, Manifest(version=version, kind="lora", base_model=base))


def test_vllm_serves_the_registry_folder_under_the_version_name(settings: Settings) -> None:
    settings = settings.model_copy(update={"engine_dtype": "auto", "max_model_len": 4096})
    publish(settings, "v7")
    command = serve_vllm.vllm_command(settings, "v7", ["--tensor-parallel-size", "2"])
    assert command[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    args = dict(zip(command[3::2], command[4::2], strict=True))
    # RemoteEngine sends {"model": <version>}: the served name must be the version itself.
    assert args == {
        "--model": str(settings.registry_path / "v7"),
        "--served-model-name": "v7",
        "--dtype": "auto",
        "--max-model-len": "4096",
        "--max-logprobs": "64",  # the gateway ranks by the first pick's log-probabilities
        "--logprobs-mode": "processed_logprobs",
        "--tensor-parallel-size": "2",
    }


def test_an_adapter_runs_on_its_base_with_room_for_more(settings: Settings) -> None:
    publish(settings, "v1")
    publish_adapter(settings, "v2", base="v1", rank=4)
    command = serve_vllm.vllm_command(settings, "v2", [])
    flag = command.index("--enable-lora")  # the one switch without a value
    args = dict(zip(command[3:flag:2], command[4:flag:2], strict=True))
    args.update(zip(command[flag + 1 :: 2], command[flag + 2 :: 2], strict=True))
    assert args["--model"] == str(settings.registry_path / "v1")
    assert args["--served-model-name"] == "v1"
    # The trainer's rank (16 by default), rounded to a slot vLLM reserves; two adapters in a swap.
    assert args["--max-lora-rank"] == "16" and args["--max-loras"] == "2"
    # RemoteEngine asks for {"model": "v2"}: the adapter is served under its version.
    assert args["--lora-modules"] == f"v2={settings.registry_path / 'v2'}"
    # A base too small for LoRA refreshes reserves nothing.
    assert "--enable-lora" not in serve_vllm.vllm_command(settings, "v1", [])
    large = settings.model_copy(update={"refresh_lora_min_params": 0})
    assert "--enable-lora" in serve_vllm.vllm_command(large, "v1", [])


# vLLM's own parser and checks, in a process of its own (importing vLLM takes seconds).
PARSE_VLLM_ARGS = """
import json, sys
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.utils.argparse_utils import FlexibleArgumentParser
for argv in json.load(sys.stdin):
    validate_parsed_serve_args(make_arg_parser(FlexibleArgumentParser()).parse_args(argv))
"""


def _deployed_vllm_args() -> dict[str, tuple[dict[str, str], list[str]]]:
    """Where vLLM is deployed: its REASONREC_* settings and the arguments its launcher gets."""
    found = {}
    for name, files in (("compose", COMPOSE_GPU), ("compose-cpu", COMPOSE_CPU)):
        service = compose_config(files)["services"]["vllm"]
        found[name] = (reasonrec_env(service["environment"]), service["command"][2:])
    for overlay in ("dev", "gpu"):
        resources = kustomize(K8S / "overlays" / overlay)
        [env] = [
            r["data"] for r in resources if r["metadata"]["name"].startswith("reasonrec-config")
        ]
        [vllm] = [
            r for r in resources if r["kind"] == "Deployment" and r["metadata"]["name"] == "vllm"
        ]
        found[f"k8s-{overlay}"] = (env, vllm["spec"]["template"]["spec"]["containers"][0]["args"])
    return found


def test_the_installed_vllm_accepts_every_deployed_command_line(settings: Settings) -> None:
    publish(settings, "v1")
    publish_adapter(settings, "v2", base="v1")
    argvs = []
    for env, extra in _deployed_vllm_args().values():
        deployed = Settings(**{k.removeprefix("REASONREC_").lower(): v for k, v in env.items()})
        # v2's adapter has no weights to merge, and its runtime flags are what vLLM must accept
        # (a merged version is started like a full one).
        deployed = deployed.model_copy(
            update={"registry_dir": settings.registry_path, "merge_adapters": False}
        )
        argvs += [serve_vllm.vllm_command(deployed, v, extra)[3:] for v in ("v1", "v2")]
    done = subprocess.run(
        [sys.executable, "-c", PARSE_VLLM_ARGS],
        input=json.dumps(argvs),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{argvs}\n{done.stderr[-3000:]}"


async def test_a_version_missing_from_the_registry_is_refused(settings: Settings) -> None:
    with pytest.raises(RegistryError, match="not in the registry"):
        await serve_vllm.vllm_starter(settings, [])("v-elsewhere")


class FakeVllm:
    """Starts `sleep` for each version it is asked to serve."""

    def __init__(self) -> None:
        self.started: list[tuple[str, asyncio.subprocess.Process]] = []

    async def __call__(self, version: str) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec("sleep", "60")
        self.started.append((version, process))
        return process

    @property
    def versions(self) -> list[str]:
        return [version for version, _ in self.started]


async def until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not check():
            await asyncio.sleep(POLL)


async def test_waits_for_a_version_then_restarts_on_each_activation(settings: Settings) -> None:
    publish(settings, "v1", "v2")
    vllm = FakeVllm()
    async with open_store(settings) as store:
        following = asyncio.create_task(serve_vllm.follow(store, vllm, poll=POLL))
        await asyncio.sleep(5 * POLL)
        assert vllm.versions == []  # no active model yet: nothing to serve

        await store.set_active_model("v1")
        await until(lambda: vllm.versions == ["v1"])
        await store.set_active_model("v2")
        await until(lambda: vllm.versions == ["v1", "v2"])
        [(_, first), (_, second)] = vllm.started
        assert first.returncode == -signal.SIGTERM  # stopped before the new one started

        # vLLM dying on its own ends the launcher with its status (the container restarts).
        second.kill()
        assert await asyncio.wait_for(following, 10) == -signal.SIGKILL


async def follow_v1(store, vllm: "FakeVllm", swap=serve_vllm._never) -> asyncio.Task:
    """The launcher following a store whose active version is v1, once it has started vLLM."""
    await store.set_active_model("v1")
    following = asyncio.create_task(serve_vllm.follow(store, vllm, swap, poll=POLL))
    await until(lambda: len(vllm.started) == 1)
    return following


async def test_stopping_the_launcher_stops_vllm(settings: Settings) -> None:
    publish(settings, "v1")
    vllm = FakeVllm()
    async with open_store(settings) as store:
        following = await follow_v1(store, vllm)
        following.cancel()  # what SIGTERM does
        with pytest.raises(asyncio.CancelledError):
            await following
        [(_, process)] = vllm.started
        assert process.returncode == -signal.SIGTERM


async def test_redis_going_away_leaves_vllm_serving(
    settings: Settings, redis_process: RedisProcess
) -> None:
    settings = settings.model_copy(update={"redis_url": redis_process.url})
    publish(settings, "v1")
    vllm = FakeVllm()
    async with open_store(settings) as store:
        following = await follow_v1(store, vllm)
        redis_process.stop()
        await asyncio.sleep(10 * POLL)
        [(_, process)] = vllm.started
        assert process.returncode is None and not following.done()
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)


class FakeSwap:
    """Swaps in place what `allowed` names; records every call."""

    def __init__(self, *allowed: str) -> None:
        self.allowed, self.calls = set(allowed), []

    async def __call__(self, started: str, serving: str, new: str) -> bool:
        self.calls.append((started, serving, new))
        return new in self.allowed


async def v2_asked_of(store, swap: FakeSwap) -> None:
    """v2 activated, the launcher asked to swap to it, and a few polls after."""
    await store.set_active_model("v2")
    await until(lambda: len(swap.calls) == 1)
    await asyncio.sleep(5 * POLL)


async def test_swaps_in_place_what_it_can_and_restarts_for_the_rest(settings: Settings) -> None:
    publish(settings, "v1", "v2", "v3")
    vllm, swap = FakeVllm(), FakeSwap("v2")
    async with open_store(settings) as store:
        following = await follow_v1(store, vllm, swap)
        await v2_asked_of(store, swap)
        assert vllm.versions == ["v1"]  # swapped in place: no restart
        await store.set_active_model("v3")
        await until(lambda: vllm.versions == ["v1", "v3"])
        assert swap.calls == [("v1", "v1", "v2"), ("v1", "v2", "v3")]
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)


class RefusingSwap(FakeSwap):
    """Refuses what `refused` names, as placing a version that cannot be placed does."""

    def __init__(self, *refused: str) -> None:
        super().__init__()
        self.refused = set(refused)

    async def __call__(self, started: str, serving: str, new: str) -> bool:
        if new in self.refused:
            self.calls.append((started, serving, new))
            raise RegistryError(f"{new} holds no readable LoRA adapter")
        return await super().__call__(started, serving, new)


async def test_a_version_that_cannot_be_placed_leaves_vllm_serving(settings: Settings) -> None:
    """It stopped the vLLM that served, then failed, and failed again at every restart."""
    publish(settings, "v1", "v2", "v3")
    vllm, swap = FakeVllm(), RefusingSwap("v2")
    async with open_store(settings) as store:
        following = await follow_v1(store, vllm, swap)
        await v2_asked_of(store, swap)  # refused once, not again at every poll
        [(_, serving)] = vllm.started
        assert serving.returncode is None and not following.done()
        assert swap.calls == [("v1", "v1", "v2")]
        await store.set_active_model("v3")  # the next activation is served
        await until(lambda: vllm.versions == ["v1", "v3"])
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)


async def test_an_active_version_that_cannot_start_waits_for_another(settings: Settings) -> None:
    publish(settings, "v1")
    started: list[str] = []
    vllm = FakeVllm()

    async def start(version: str) -> asyncio.subprocess.Process:
        started.append(version)
        if version == "v-broken":
            raise RegistryError("model version 'v-broken' is not in the registry")
        return await vllm(version)

    async with open_store(settings) as store:
        await store.set_active_model("v-broken")
        following = asyncio.create_task(serve_vllm.follow(store, start, poll=POLL))
        await asyncio.sleep(5 * POLL)
        assert started == ["v-broken"] and not following.done()
        await store.set_active_model("v1")
        await until(lambda: vllm.versions == ["v1"])
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)


def recording_vllm(status: int = 200) -> tuple[httpx.MockTransport, list[tuple[str, dict]]]:
    calls: list[tuple[str, dict]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append((request.url.path, json.loads(request.content)))
        return httpx.Response(status, text="ok")

    return httpx.MockTransport(answer), calls


def unload_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """No wait for gateways' requests on the outgoing adapter."""
    monkeypatch.setattr(serve_vllm, "RECHECK_SECONDS", 0.0)
    monkeypatch.setattr(serve_vllm, "release_seconds", lambda _: 0.01)


async def test_the_swapper_loads_adapters_of_the_running_base_and_unloads_the_old(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    unload_at_once(monkeypatch)
    publish(settings, "v1", "other")
    publish_adapter(settings, "v2", base="v1")
    publish_adapter(settings, "v3", base="v1")
    publish_adapter(settings, "big", base="v1", rank=64)
    transport, calls = recording_vllm()
    swap = serve_vllm.vllm_swapper(settings, ["--port", "8123"], transport)

    assert await swap("v2", "v2", "v3")
    assert calls == [
        (
            "/v1/load_lora_adapter",
            {"lora_name": "v3", "lora_path": str(settings.registry_path / "v3")},
        )
    ]
    await until(lambda: len(calls) == 2)  # once the outgoing adapter's requests are over
    assert calls[1] == ("/v1/unload_lora_adapter", {"lora_name": "v2"})
    assert await swap("v2", "v3", "v1")  # the base itself: nothing to load
    await until(lambda: calls[-1] == ("/v1/unload_lora_adapter", {"lora_name": "v3"}))
    # Another base, or an adapter above the room vLLM reserved: a restart.
    assert not await swap("v2", "v1", "other")
    assert not await swap("v2", "v1", "big")
    assert len(calls) == 3


async def test_adapters_swap_in_after_the_version_vllm_started_on_was_pruned(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM started on an adapter runs its base for as long as it runs; once the registry pruned
    that version, every later activation was refused as 'not in the registry'."""
    unload_at_once(monkeypatch)
    publish(settings, "v1")
    for version in ("v2", "v3", "v4"):
        publish_adapter(settings, version, base="v1")
    transport, calls = recording_vllm()
    swap = serve_vllm.vllm_swapper(settings, [], transport)

    assert await swap("v2", "v2", "v3")
    registry = Registry(settings.registry_path)
    registry.remove(registry.prunable(1, serving={"v3"}))  # v2 removed, v1 a kept base
    assert await swap("v2", "v3", "v4")
    await until(lambda: len(calls) == 4)
    assert sorted((path.rsplit("_", 2)[0], body["lora_name"]) for path, body in calls) == [
        ("/v1/load", "v3"),
        ("/v1/load", "v4"),
        ("/v1/unload", "v2"),
        ("/v1/unload", "v3"),
    ]


async def test_an_adapter_activated_again_before_its_unload_stays_loaded(
    settings: Settings,
) -> None:
    # The outgoing adapter's unload is far off: a gateway's requests may hold it for 90 s.
    publish(settings, "v1")
    publish_adapter(settings, "v2", base="v1")
    publish_adapter(settings, "v3", base="v1")
    transport, calls = recording_vllm()
    swap = serve_vllm.vllm_swapper(settings, [], transport)

    assert await swap("v2", "v2", "v3")
    assert await swap("v2", "v3", "v2")  # a rollback: v2 was never unloaded
    assert [(path, body["lora_name"]) for path, body in calls] == [("/v1/load_lora_adapter", "v3")]
    # A restart (another base) loses every adapter: v3, pending unload, is loaded again after it.
    publish(settings, "other")
    assert not await swap("v2", "v2", "other")
    assert await swap("v2", "v2", "v3")
    assert [body["lora_name"] for _, body in calls] == ["v3", "v3"]


async def test_a_failed_adapter_load_falls_back_to_a_restart(settings: Settings) -> None:
    publish(settings, "v1")
    publish_adapter(settings, "v2", base="v1")
    transport, calls = recording_vllm(status=400)
    large = settings.model_copy(update={"refresh_lora_min_params": 0})  # v1 reserved room
    swap = serve_vllm.vllm_swapper(large, [], transport)
    assert not await swap("v1", "v1", "v2")
    assert [path for path, _ in calls] == ["/v1/load_lora_adapter"]
