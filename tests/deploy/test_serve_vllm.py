"""docker/serve_vllm.py: vLLM serves the active version under the name gateways ask for, and
follows activations. A `sleep` process stands in for vLLM; the store is the test's real Redis."""

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Callable

import pytest

from server.app import open_store
from server.config import Settings
from server.registry import Manifest, Registry, RegistryError
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

serve_vllm = load_script(DOCKER / "serve_vllm.py")
POLL = 0.05


def publish(settings: Settings, *versions: str) -> None:
    registry = Registry(settings.registry_path)
    for version in versions:
        registry.publish(registry.staging(), Manifest(version=version))


def test_vllm_serves_the_registry_folder_under_the_version_name(settings: Settings) -> None:
    settings = settings.model_copy(update={"engine_dtype": "auto", "max_model_len": 4096})
    command = serve_vllm.vllm_command(settings, "v7", ["--tensor-parallel-size", "2"])
    assert command[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    args = dict(zip(command[3::2], command[4::2], strict=True))
    # RemoteEngine sends {"model": <version>}: the served name must be the version itself.
    assert args == {
        "--model": str(settings.registry_path / "v7"),
        "--served-model-name": "v7",
        "--dtype": "auto",
        "--max-model-len": "4096",
        "--tensor-parallel-size": "2",
    }


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


def test_the_installed_vllm_accepts_every_deployed_command_line() -> None:
    argvs = []
    for env, extra in _deployed_vllm_args().values():
        settings = Settings(**{k.removeprefix("REASONREC_").lower(): v for k, v in env.items()})
        argvs.append(serve_vllm.vllm_command(settings, "v1", extra)[3:])
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


async def follow_v1(store, vllm: "FakeVllm") -> asyncio.Task:
    """The launcher following a store whose active version is v1, once it has started vLLM."""
    await store.set_active_model("v1")
    following = asyncio.create_task(serve_vllm.follow(store, vllm, poll=POLL))
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
