"""`reasonrec trainer`: refresh on a schedule, or sooner when enough feedback arrived.

Checks every few seconds how many events the feedback stream has gained since the last refresh;
refreshes when `REASONREC_REFRESH_MIN_EVENTS` were added or `REASONREC_REFRESH_SECONDS` passed.
The schedule counts from the newest refresh published in the registry (by this sidecar, before a
restart too, or by `train --once`): a refresh that is overdue, or when none was ever published,
starts at the first poll. One that finds another refresh running (its lock held) is tried again
LOCK_SECONDS later: a trainer killed mid-refresh leaves its lock that long.
A failed refresh is logged and counted (`reasonrec_trainer_runs_total{outcome="failed"}`) and
tried again a minute later, then after twice as long each time it fails again, up to
`REASONREC_REFRESH_SECONDS`; the loop goes on while Redis does not answer; the lock in
`trainer.refresh` keeps two sidecars from training at once. Each poll also reads Redis's memory
against its cap (`reasonrec_trainer_redis_used_bytes`, `reasonrec_trainer_redis_max_bytes`; an
alert fires near the cap).
"""

import asyncio
import logging
import time

from prometheus_client import start_http_server
from redis.exceptions import RedisError

from server.config import Settings
from server.logs import describe
from server.registry import REFRESH_METHOD, Registry
from server.store import Store, open_store
from trainer import metrics
from trainer.refresh import LOCK_SECONDS, RefreshBusy, refresh_once

log = logging.getLogger(__name__)
POLL_SECONDS = 10.0
FAILED_RETRY_SECONDS = 60.0  # after a failed refresh, doubling while it keeps failing


def last_refresh(registry: Registry) -> float | None:
    """Unix time of the newest published refresh, so that a restarted sidecar does not report
    "never" (0) to the staleness alert."""
    refreshes = [m for m in registry.versions() if m.training.get("method") == REFRESH_METHOD]
    return refreshes[-1].created_at.timestamp() if refreshes else None


def _report_last_refresh(
    registry: Registry, read_at: float | None
) -> tuple[float | None, float | None]:
    """Set the staleness gauge to the newest published refresh when the registry changed since
    `read_at` (its folder's modification time): the nightly `train --once` job publishes there
    too, not only this sidecar. The modification time, and the refresh's Unix time if read."""
    try:
        changed = registry.root.stat().st_mtime
    except OSError:  # no registry yet
        return read_at, None
    if changed == read_at:
        return changed, None
    try:
        published = last_refresh(registry)
    except OSError as exc:  # a shared volume's hiccup (a stale NFS handle) must not end the loop
        log.warning(
            "registry unreadable, read again at the next poll", extra={"reason": describe(exc)}
        )
        return read_at, None
    if published is not None:
        metrics.LAST_SUCCESS.set(published)
    return changed, published


def _schedule_start(registry: Registry, refresh_seconds: float) -> float:
    """The `time.monotonic()` the schedule counts from: when the newest published refresh was,
    or a full period ago when there was none, so that the first poll refreshes."""
    try:
        published = last_refresh(registry)
    except OSError as exc:  # as if none was published: the first poll refreshes
        log.warning("registry unreadable", extra={"reason": describe(exc)})
        published = None
    return time.monotonic() - refresh_seconds if published is None else _monotonic(published)


def _monotonic(unix_time: float) -> float:
    """The `time.monotonic()` of a past Unix time."""
    return time.monotonic() - max(time.time() - unix_time, 0.0)


async def _event_count(store: Store) -> int | None:
    """Events ever added to the feedback stream (`Store.event_count`); None while Redis does not
    answer (the next poll retries)."""
    try:
        return await store.event_count()
    except RedisError as exc:
        log.warning("feedback stream unreadable", extra={"reason": describe(exc)})
        return None


async def report_memory(store: Store) -> None:
    """Redis's memory against its cap, as gauges; kept as they were while Redis does not say."""
    try:
        memory = await store.memory()
    except RedisError as exc:
        log.warning("redis memory unreadable", extra={"reason": describe(exc)})
        return
    if memory is None:
        return
    metrics.REDIS_USED.set(memory.used_bytes)
    metrics.REDIS_MAX.set(memory.max_bytes)


async def run_sidecar(settings: Settings) -> None:
    registry = Registry(settings.registry_path)
    read_at, _ = _report_last_refresh(registry, None)
    if port := settings.trainer_metrics_port:
        try:
            start_http_server(port, registry=metrics.REGISTRY)
        except OSError as exc:  # `reasonrec` prints the reason alone: say which port, and why
            reason = f"metrics port {port} (REASONREC_TRAINER_METRICS_PORT): {exc.strerror}"
            raise OSError(exc.errno, reason) from exc
    async with open_store(settings) as store:
        last_run = _schedule_start(registry, settings.refresh_seconds)
        last_length = await _event_count(store)
        retry_at = 0.0  # monotonic: no try before (another refresh was running, or this failed)
        backoff = FAILED_RETRY_SECONDS
        while True:
            await asyncio.sleep(POLL_SECONDS)
            read_at, published = _report_last_refresh(registry, read_at)
            # A refresh published since (by `train --once`, say) restarts the schedule and the
            # count of new events: it trained on them.
            if published is not None and _monotonic(published) > last_run:
                last_run, last_length = _monotonic(published), None
            if (length := await _event_count(store)) is None:
                continue
            await report_memory(store)
            # Counted from here: Redis was away, a refresh published, or the count went down (a
            # stream deleted and made again).
            if last_length is None or length < last_length:
                last_length = length
            due = time.monotonic() - last_run >= settings.refresh_seconds
            if not due and length - last_length < settings.refresh_min_events:
                continue
            if time.monotonic() < retry_at:
                continue
            counted_from = last_run, last_length
            last_run, last_length = time.monotonic(), length
            try:
                result = await refresh_once(settings, store, progress=False)  # it logs its end
            except RefreshBusy:
                # Not refreshed: tried again once the lock of a trainer killed mid-refresh has
                # lapsed; a live one that publishes meanwhile restarts the schedule instead.
                log.info("refresh skipped: another one is running")
                last_run, last_length = counted_from
                retry_at = time.monotonic() + LOCK_SECONDS
                continue
            except Exception:  # logged and counted; the sidecar outlives it
                # Not refreshed either: tried again sooner than the next period (Redis or a disk
                # is often back within minutes), less often while it keeps failing.
                last_run, last_length = counted_from
                retry_at = time.monotonic() + backoff
                backoff = min(backoff * 2, max(settings.refresh_seconds, FAILED_RETRY_SECONDS))
                continue
            backoff = FAILED_RETRY_SECONDS
            read_at, published = _report_last_refresh(registry, read_at)
            if published is None or _monotonic(published) <= last_run:
                continue
            last_run = _monotonic(published)
            # Its own version: the events that came as it trained still count towards the next.
            # Another process's (`train --once` meanwhile) trained on them: counted from here.
            if result.outcome != "published":
                last_length = None
