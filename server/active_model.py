"""Which model serves: the registry's active version, opened as an engine of the configured kind."""

import logging

from server.config import Settings
from server.engine import Engine
from server.engine.local import LocalEngine
from server.engine.remote import RemoteEngine
from server.registry import Registry, check_contract
from server.store import Store

log = logging.getLogger(__name__)


def open_engine(settings: Settings, version: str) -> Engine:
    """Raises RegistryError for an unknown version or a contract this gateway does not speak."""
    registry = Registry(settings.registry_path)
    check_contract(registry.manifest(version))
    if settings.engine_url:
        return RemoteEngine(settings.engine_url, version, settings.engine_api_key)
    return LocalEngine(
        registry.path(version),
        version,
        max_model_len=settings.max_model_len,
        kv_cache_bytes=settings.kv_cache_bytes,
        cpu_threads=settings.engine_cpu_threads,
        dtype=settings.engine_dtype,
    )


async def open_active_engine(settings: Settings, store: Store) -> Engine | None:
    version = await store.active_model()
    if version is None:
        log.warning("no active model: recommendations use the retrieval order until one exists")
        return None
    return open_engine(settings, version)
