"""Which model serves: the registry's active version, opened as an engine of the configured kind."""

import logging
from pathlib import Path

from server.config import Settings
from server.engine import Engine
from server.engine.local import LocalEngine, ProcessSettings, VllmProcess
from server.engine.remote import RemoteEngine
from server.registry import (
    Registry,
    adapter_rank,
    base_version,
    check_contract,
    parameter_count,
)
from server.store import Store

log = logging.getLogger(__name__)


def open_engine(settings: Settings, version: str, serving: Engine | None = None) -> Engine:
    """Raises RegistryError for an unknown version or a contract this gateway does not speak.

    In-process, a version on the same base weights as `serving` (the base, or a LoRA adapter of
    it) shares its vLLM process: a runtime adapter swap, no model load.
    """
    registry = Registry(settings.registry_path)
    manifest = registry.manifest(version)
    check_contract(manifest)
    if settings.engine_url:
        return RemoteEngine(settings.engine_url, version, settings.engine_api_key)
    base = base_version(manifest)
    adapter = registry.path(version) if manifest.kind == "lora" else None
    rank = adapter_rank(adapter) if adapter else None
    if isinstance(serving, LocalEngine) and serving.can_serve(base, rank):
        return serving.beside(version, adapter)
    lora = _lora_room(settings, registry.path(base), rank)
    process = VllmProcess(
        registry.path(base),
        base,
        ProcessSettings(
            max_model_len=settings.max_model_len,
            kv_cache_bytes=settings.kv_cache_bytes,
            cpu_threads=settings.engine_cpu_threads,
            dtype=settings.engine_dtype,
            max_lora_rank=lora,
        ),
    )
    return LocalEngine(process, version, adapter)


def _lora_room(settings: Settings, base_dir: Path, rank: int | None) -> int | None:
    """The adapter rank a new process reserves for: the adapter it opens for, and any the
    trainer will publish on this base (it refreshes large models with LoRA); None for none."""
    if rank is None and parameter_count(base_dir) < settings.refresh_lora_min_params:
        return None
    return max(rank or 0, settings.refresh_lora_rank)


async def open_active_engine(settings: Settings, store: Store) -> Engine | None:
    version = await store.active_model()
    if version is None:
        log.warning("no active model: recommendations use the retrieval order until one exists")
        return None
    return open_engine(settings, version)
