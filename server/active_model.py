"""Which model serves: the registry's active version, opened as an engine of the configured kind."""

import logging
import os
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path

from pydantic import BaseModel, Field

from contract.prompt import chat_prompt
from contract.rating import LEAN_WINDOW
from contract.tasks import Task
from server.config import Settings
from server.engine import Engine
from server.engine.local import LocalEngine, ProcessSettings, VllmProcess
from server.engine.remote import RemoteEngine
from server.merged_adapter import merged_weights
from server.registry import (
    Manifest,
    Registry,
    RegistryError,
    adapter_rank,
    base_version,
    servable,
    stored_parameters,
)
from server.vocabulary import ItemTokens

log = logging.getLogger(__name__)


class Placement(BaseModel):
    """Where a version runs in vLLM: on which base weights, with which adapter, and how much
    adapter room an engine started for it reserves."""

    version: str
    base: str
    base_dir: Path
    adapter: Path | None = Field(None, description="The LoRA adapter's folder, for kind lora.")
    adapter_rank: int | None = None
    lora_room: int | None = Field(
        None, description="Largest adapter rank a new engine makes room for; None: no LoRA."
    )


def placement(settings: Settings, version: str) -> Placement:
    """Raises RegistryError for a version it cannot serve (`server.registry.servable`).

    An engine started for a base reserves adapter room when the base is large enough for the
    trainer to refresh it with LoRA (`REASONREC_REFRESH_LORA_MIN_PARAMS`), so that its adapters
    swap in without a restart. When adapters are merged (`merges_adapters`), a LoRA version runs
    on its own merged weights instead, and no engine reserves adapter room.
    """
    registry = Registry(settings.registry_path)
    manifest = servable(registry, version)
    base = base_version(manifest)
    merging = merges_adapters(settings)
    if manifest.kind == "lora" and merging:
        weights = merged_weights(
            merged_folder(settings),
            version,
            registry.path(base),
            registry.path(version),
            settings.engine_dtype,
        )
        return Placement(version=version, base=version, base_dir=weights)
    adapter = registry.path(version) if manifest.kind == "lora" else None
    rank = adapter_rank(adapter) if adapter else None
    large = refreshed_with_lora(settings, registry.path(base))
    reserve = (rank or large) and not merging
    room = max(rank or 0, settings.refresh_lora_rank) if reserve else None
    return Placement(
        version=version,
        base=base,
        base_dir=registry.path(base),
        adapter=adapter,
        adapter_rank=rank,
        lora_room=room,
    )


def merged_folder(settings: Settings) -> Path:
    return settings.data_dir / "merged"


def merges_adapters(settings: Settings) -> bool:
    """Whether LoRA versions are served merged (`REASONREC_MERGE_ADAPTERS`). 'auto': where vLLM
    runs on the CPU, whose runtime adapters are slow, and the merged folder can be written (the
    shipped vLLM pods mount the data read-only: there adapters stay runtime ones, and an engine
    started on a base keeps room to swap them in)."""
    if settings.merge_adapters != "auto":
        return settings.merge_adapters
    if not vllm_on_cpu():
        return False
    if writable(merged_folder(settings)):
        return True
    log.warning(
        "merged weights cannot be written: LoRA versions are served as runtime adapters",
        extra={"path": str(merged_folder(settings))},
    )
    return False


def writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


@cache
def vllm_on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def refreshed_with_lora(settings: Settings, weights: Path) -> bool:
    """Whether the trainer refreshes the full weights in `weights` through LoRA adapters."""
    return stored_parameters(weights) >= settings.refresh_lora_min_params


def open_engine(settings: Settings, version: str, serving: Engine | None = None) -> Engine:
    """Raises RegistryError for a version it cannot serve (`server.registry.servable`).

    In-process, a version on the same base weights as `serving` (the base, or a LoRA adapter of
    it) shares its vLLM process: a runtime adapter swap, no model load. A remote server places
    versions itself (docker/serve_vllm.py): the gateway only checks the contract.
    """
    registry = Registry(settings.registry_path)
    manifest = servable(registry, version)
    _warn_mismatches(manifest, settings)
    base_dir = registry.path(base_version(manifest))
    items = _item_tokens(base_dir)
    template = chat_template(base_dir) if manifest.contract.chat else None
    # The engine last: one started before a failure would be left running.
    engine = _open(settings, version, serving)
    engine.contract, engine.items, engine.template = manifest.contract, items, template
    return engine


def _warn_mismatches(manifest: Manifest, settings: Settings) -> None:
    """Settings under which a version still answers, but worse than it was trained to: the
    operator should know. A query model learnt what its retriever finds; prompts show at most
    REASONREC_HISTORY_SIZE items (and ratings: the rating lean reads LEAN_WINDOW of them)."""
    trained = manifest.training.get("search_retriever")
    if trained is not None and trained != settings.search_retriever.value:
        log.warning(
            "search model trained against another retriever",
            extra={
                "version": manifest.version,
                "trained_against": trained,
                "serving": settings.search_retriever.value,
            },
        )
    contract = manifest.contract
    shown = max(contract.history, LEAN_WINDOW if Task.rate in contract.tasks else 0)
    if shown > settings.history_size:
        log.warning(
            "prompts shortened by REASONREC_HISTORY_SIZE",
            extra={
                "version": manifest.version,
                "trained_with": shown,
                "history_size": settings.history_size,
            },
        )


def _item_tokens(folder: Path) -> ItemTokens | None:
    try:
        return ItemTokens.load(folder)
    # What the folder holds, as for the chat template: the tokenizers library raises a bare
    # Exception for a tokenizer.json it cannot parse (it was retried for ever).
    except Exception as exc:
        unreadable = f"the tokenizer of {folder.name} cannot be read"
        raise RegistryError(f"{unreadable}: {exc}", public=unreadable) from exc


def chat_template(folder: Path) -> Callable[[str], str]:
    """The version's chat template, applied by the gateway: the same text reaches an in-process
    and a remote engine, and the impression log keeps the prompt without it."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:  # what the folder holds: no later try would differ
        unreadable = f"the chat template of {folder.name} cannot load"
        raise RegistryError(f"{unreadable}: {exc}", public=unreadable) from exc
    return partial(chat_prompt, tokenizer)


def _open(settings: Settings, version: str, serving: Engine | None) -> Engine:
    if settings.engine_url:
        return RemoteEngine(settings.engine_url, version, settings.engine_api_key)
    where = placement(settings, version)
    if isinstance(serving, LocalEngine) and serving.can_serve(where.base, where.adapter_rank):
        return serving.beside(version, where.adapter)
    process = VllmProcess(
        where.base_dir,
        where.base,
        ProcessSettings(
            max_model_len=settings.max_model_len,
            kv_cache_bytes=settings.kv_cache_bytes,
            cpu_threads=settings.engine_cpu_threads,
            dtype=settings.engine_dtype,
            max_lora_rank=where.lora_room,
        ),
    )
    return LocalEngine(process, version, where.adapter)
