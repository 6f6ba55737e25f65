"""Keep the registry to its newest trained versions (REASONREC_KEEP_VERSIONS): after each
published refresh, and `reasonrec models prune`."""

import asyncio
import uuid

from server.registry import Registry
from server.store import Store
from trainer.threads import finish_in_thread


class PruneBusy(Exception):
    """Another prune holds the registry (a refresh's, or `reasonrec models prune`)."""


async def prune(registry: Registry, store: Store, keep: int) -> list[str]:
    """Remove all but the newest `keep` trained versions (`Registry.prunable`); the removed
    versions, oldest first. Those chosen are refused activation while they are removed, and
    one activated before that is kept: an operator activating an old version as it was chosen
    would have had its folder removed under the gateways. One prune at a time: a second one
    ended the first's refusal while the first was still removing."""
    token = uuid.uuid4().hex
    if not await store.take_prune_lock(token):
        raise PruneBusy("another prune is running (a refresh's or `reasonrec models prune`)")
    try:
        chosen = await asyncio.to_thread(registry.prunable, keep, await store.serving_models())
        serving = await store.mark_pruning(chosen)
        try:
            still = await asyncio.to_thread(registry.prunable, keep, serving)
            removed = [version for version in still if version in chosen]
            await finish_in_thread(registry.remove, removed)
        finally:
            await store.unmark_pruning(chosen)
    finally:
        await store.release_prune_lock(token)
    return removed
