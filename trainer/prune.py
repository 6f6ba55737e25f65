"""Keep the registry to its newest trained versions (REASONREC_KEEP_VERSIONS): after each
published refresh, and `reasonrec models prune`."""

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from redis.exceptions import RedisError

from server.logs import describe
from server.registry import Registry
from server.store import Store
from trainer.threads import finish_in_thread

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5


class PruneBusy(Exception):
    """Another prune holds the registry (a refresh's, or `reasonrec models prune`)."""


@asynccontextmanager
async def prune_held(store: Store, wait: float = 0) -> AsyncIterator[str]:
    """No other prune runs meanwhile (the prune lock, whose token it yields); waits up to `wait`
    seconds for one in progress, then raises PruneBusy."""
    token, deadline = uuid.uuid4().hex, time.monotonic() + wait
    while not await store.take_prune_lock(token):
        if time.monotonic() >= deadline:
            raise PruneBusy(
                "another prune is running (a refresh's or `reasonrec models prune`; one killed "
                "holds the registry up to 5 minutes)"
            )
        await asyncio.sleep(POLL_SECONDS)
    try:
        yield token
    finally:
        try:
            await store.release_prune_lock(token)
        except RedisError as exc:  # it lapses within PRUNING_SECONDS; what it held is done
            log.warning("prune lock not released", extra={"reason": describe(exc)})


async def prune(
    registry: Registry, store: Store, keep: int, on_removed: Callable[[str], object] | None = None
) -> list[str]:
    """Remove all but the newest `keep` trained versions (`Registry.prunable`); the removed
    versions, oldest first, each passed to `on_removed` once gone (cancelled, it stops after the
    one being removed). Those chosen are refused activation while they are removed (the removed
    ones until the marks lapse, PRUNING_SECONDS), and one activated before that is kept: an
    operator activating an old version as it was chosen would have had its folder removed under
    the gateways. One prune at a time: a second one ended the first's refusal while the first
    was still removing."""
    removed: list[str] = []
    async with prune_held(store) as token:
        chosen = await asyncio.to_thread(registry.prunable, keep, await store.serving_models())
        serving = await store.mark_pruning(chosen)
        try:
            still = await asyncio.to_thread(registry.prunable, keep, serving)
            for version in [version for version in still if version in chosen]:
                # A prune can outlast its marks and its lock (a slow disk, many large versions):
                # both renewed before each removal, and what serves read again.
                if not await store.renew_prune_lock(token):
                    break  # another prune took over once this one's lock lapsed
                if version in await store.mark_pruning([version]):
                    continue  # activated once the marks had lapsed
                try:
                    await finish_in_thread(registry.remove, [version])
                finally:  # cancelled too: the thread finished the version first
                    if not registry.has(version):
                        removed.append(version)
                        if on_removed is not None:
                            on_removed(version)
        finally:
            # The removed stay refused until the marks lapse: an activation checked before
            # the removal and written after it pointed every gateway at a folder gone.
            await store.unmark_pruning([version for version in chosen if version not in removed])
    return removed
