"""What a gateway answers with: the active version's engine and the candidate index, owned by one
`Serving` object, and hot swap, which replaces them without dropping a request.

Without an index or a model, requests are answered in the retrieval or popularity order
(fallback); `problem` says why there is no engine. Each gateway process subscribes to the
`model-updates` channel. On an announcement it opens the
new version beside the one serving (the registry's contract check first), then points new
requests at it. Requests already holding the old engine (`hold`) finish on it: it is closed once
the last of them has answered, or when one is stuck (`server.engine.release_seconds`).
If the new version cannot be opened, the old one keeps serving and the failure is logged. The
active version is also read every RECHECK_SECONDS: an announcement sent while the subscription
was reconnecting reaches nobody. An in-process engine whose core process died (killed for
memory, say) never answers again: it is opened anew at the same check. The candidate index that
`reasonrec index` made current since is loaded at that check too, so that new items reach the
candidates without a restart or a model swap.
"""

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import faiss
from redis.exceptions import RedisError

from server import metrics
from server.active_model import open_engine
from server.config import Settings
from server.engine import Engine, release_seconds
from server.index_files import current_version, load_current
from server.item_index import ItemIndex
from server.logs import describe
from server.registry import Registry, RegistryError
from server.store import Store

log = logging.getLogger(__name__)
RETRY_SECONDS = 1.0
POLL_SECONDS = 0.25  # one wait for an announcement; bounds how long stop() takes
RECHECK_SECONDS = 30.0  # how long an activation whose announcement was lost can go unserved
MAX_BACKOFF_SECONDS = 900.0  # between tries of a version whose opening failed for a reason
PREPARE_SECONDS = 300.0  # an adapter load whose engine core died never answers
NO_ACTIVE = "no active model: run `reasonrec bootstrap`"


class Serving:
    """The engine and index requests use now; `swap` replaces both together."""

    def __init__(self, settings: Settings, store: Store):
        self.settings, self.store = settings, store
        self.engine: Engine | None = None
        self.index: ItemIndex | None = None
        self.problem: str | None = None
        """Why there is no engine, for /readyz."""
        self._lock = asyncio.Lock()  # one swap at a time, in announcement order
        self._closing: set[asyncio.Task] = set()
        self._opening: asyncio.Task | None = None  # a swap's new engine, until it serves
        self._holders: Counter[Engine] = Counter()  # requests holding each engine
        self._idle: dict[Engine, asyncio.Event] = {}  # set once no request holds an outgoing one
        self._stopping = asyncio.Event()
        self._following: asyncio.Task | None = None
        self._wanted: str | None = None  # the version last swapped to, served or refused
        self._failed: str | None = None  # the version whose opening failed last
        self._retry_at = 0.0  # monotonic time before which `_failed` is not tried again
        self._backoff = RECHECK_SECONDS

    @property
    def version(self) -> str | None:
        """The model version answering, None without one."""
        return self.engine.model_version if self.engine else None

    @contextmanager
    def hold(self) -> Iterator[tuple[Engine | None, ItemIndex | None]]:
        """The engine and index one request uses, read together (a swap replaces both); a swap
        does not close the engine while a request holds it."""
        engine, index = self.engine, self.index
        if engine is not None:
            self._holders[engine] += 1
        try:
            yield engine, index
        finally:
            if engine is not None:
                self._holders[engine] -= 1
                if self._holders[engine] == 0:
                    del self._holders[engine]
                    if engine in self._idle:
                        self._idle[engine].set()

    async def start(self) -> None:
        """Open the index and the active model, then follow activations. Nothing that fails here
        stops the gateway: it answers in the retrieval or popularity order, and /readyz says
        why."""
        # One request is one small query: faiss's OpenMP threads only contend with the event loop
        # and vLLM (a query took 16 ms p50 with the default threads, 0.2 ms with one, on 2 cores).
        faiss.omp_set_num_threads(1)
        self.index = self._current_index()
        try:
            active = await self.store.active_model()
        except RedisError as exc:
            log.error("cannot read the active model", extra={"reason": describe(exc)})
            self.problem = "active model unknown: redis unreachable at startup"
        else:
            if active is None:
                log.warning("no active model: the retrieval order answers until one exists")
                self.problem = NO_ACTIVE
            else:
                await self.swap(active)
        metrics.set_model_info(self.version)
        self._following = asyncio.create_task(self.run())

    async def stop(self) -> None:
        """Stop following, and release every engine at once (shutdown). A swap in progress is
        abandoned, its engine released: a handover waits up to 30 s for a remote server, longer
        than shutdown may take."""
        self._stopping.set()
        if self._opening is not None:
            self._opening.cancel()
        if self._following is not None:
            await asyncio.gather(self._following, return_exceptions=True)
        for task in list(self._closing):
            task.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)
        if self.engine is not None:
            await _release(self.engine)

    async def run(self) -> None:
        """Follow announcements until `stop()` (within POLL_SECONDS); resubscribes when Redis
        goes away."""
        while not self._stopping.is_set():
            try:
                await self._follow()
            except RedisError as exc:
                log.warning("model updates lost, resubscribing", extra={"reason": describe(exc)})
                await asyncio.sleep(RETRY_SECONDS)

    async def _follow(self) -> None:
        # Polled with a timeout rather than `listen()`: a read is never cut off mid-way (a
        # cancelled read can leave the connection hanging at close), and the socket timeout of
        # the client never fires on a quiet channel.
        async with self.store.model_updates() as pubsub:
            # An activation between start-up and this subscription was announced to nobody.
            await self._catch_up()
            checked = time.monotonic()
            while not self._stopping.is_set():
                message = await pubsub.get_message(timeout=POLL_SECONDS)
                if message is not None and message["type"] == "message":
                    await self.swap(message["data"])
                elif time.monotonic() - checked > RECHECK_SECONDS:
                    await self._reindex()
                    await self._revive()
                    # The client resubscribes by itself after a dropped connection, silently:
                    # what was announced meanwhile is only found by asking.
                    await self._catch_up()
                    checked = time.monotonic()

    async def _catch_up(self) -> None:
        """Swap to the active version if it is neither served nor already refused (a refused
        version is tried again when it is announced again; one whose opening failed otherwise,
        at a later check)."""
        active = await self.store.active_model()
        if active is None and self.engine is None:
            self.problem = NO_ACTIVE  # not "redis unreachable" once it answers
        waiting = active == self._failed and time.monotonic() < self._retry_at
        if active is not None and active != self._wanted and not waiting:
            await self.swap(active)

    async def _reindex(self) -> None:
        """Hold the current candidate index if it is not the one held; the engine stays."""
        async with self._lock:
            held = self.index
            self.index = await asyncio.to_thread(self._current_index)
        if self.index is not held:
            previous = held.version if held else None
            log.info("index loaded", extra={"version": self.index.version, "previous": previous})

    async def _revive(self) -> None:
        """Open the served version again if its engine died; until then requests get the
        fallback."""
        engine = self.engine
        if engine is not None and engine.dead:
            log.error("engine dead, opening it again", extra={"version": engine.model_version})
            await self.swap(engine.model_version, reopen=True)

    async def swap(self, version: str, reopen: bool = False) -> bool:
        """Serve `version` from now on; False (and the old engine kept) if it cannot open.
        `reopen`: open a new engine even if `version` is the one served."""
        async with self._lock:
            self._wanted = version
            if version == self.version and not reopen:
                return True
            if self._stopping.is_set():  # stop() cancels only a swap already opening
                return False
            self._opening = asyncio.create_task(self._open_ready(version))
            try:
                engine, index = await self._opening
            except asyncio.CancelledError:
                if not self._stopping.is_set() or asyncio.current_task().cancelling():
                    raise  # this swap itself was cancelled, not only its opening
                log.info("model swap abandoned at shutdown", extra={"version": version})
                return False
            except Exception as exc:  # whatever breaks the new version, the old one keeps serving
                log.error("model swap refused", extra={"version": version, "reason": str(exc)})
                if not isinstance(exc, RegistryError):
                    self._try_later(version)
                if self.engine is None:
                    self.problem = _refusal(version, exc)
                return False
            finally:
                self._opening = None
            if await self._rolled_back(version):
                log.info(
                    "model swap dropped: the version served is active again",
                    extra={"version": version, "serving": self.version},
                )
                await _release(engine)
                self._wanted = self.version
                return False
            self._backoff = RECHECK_SECONDS
            self.index = index
            old, self.engine = self.engine, engine
            self.problem = None
            metrics.set_model_info(version)
            previous = old.model_version if old else None
            log.info("model swapped", extra={"version": version, "previous": previous})
            if old is not None:
                task = asyncio.create_task(self._close_later(old))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            return True

    async def _rolled_back(self, version: str) -> bool:
        """Whether the version served became active again while `version` opened (minutes for a
        real engine): the rolled-back version served until the one rolled back to, its engine
        released, had opened again. Only then: any other version active now may be one this
        gateway cannot open, and a reopened engine (`version` served) is kept. Unknown (Redis
        gone): not rolled back."""
        if self.store is None or self.version in (None, version):
            return False
        try:
            return await self.store.active_model() == self.version
        except RedisError:
            return False

    def _try_later(self, version: str) -> None:
        """Not refused for good: memory still held by an engine on its way out, a file being
        written. Tried again at a later check, each wait twice the one before; another version
        activated meanwhile is served at the next check."""
        if version != self._failed:
            self._backoff = RECHECK_SECONDS
        self._failed, self._wanted = version, self.version
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, MAX_BACKOFF_SECONDS)

    async def _open_ready(self, version: str) -> tuple[Engine, ItemIndex | None]:
        """The new engine and index, once the engine is ready; cancelled (at shutdown), the engine
        is released, once its thread has opened it if it was opening (a thread cannot be
        stopped: the process would wait for it anyway)."""
        opening = asyncio.ensure_future(asyncio.to_thread(self._open, version))
        try:
            engine, index = await asyncio.shield(opening)
        except asyncio.CancelledError:
            with suppress(Exception):  # an engine that failed to open holds nothing
                await _release((await opening)[0])
            raise
        try:
            # Bounded: a swap holds the lock, and one that never returns stops every later one.
            await asyncio.wait_for(
                engine.prepare(handover=self.engine is not None), PREPARE_SECONDS
            )
        except BaseException:  # cancelled too
            await _release(engine)
            raise
        return engine, index

    def _open(self, version: str) -> tuple[Engine, ItemIndex | None]:
        """The new engine, and the current index (a new model usually comes with the index it was
        trained beside); both read from disk, so off the event loop. The index first: a failure
        after the engine started would leave it running."""
        index = self._current_index()
        return open_engine(self.settings, version, serving=self.engine), index

    def _current_index(self) -> ItemIndex | None:
        """The published index: the one held unless a newer one is current, and the one held
        when the current one cannot be read (candidates then stay as they were)."""
        held = self.index
        try:
            current = current_version(self.settings.data_dir)
            if current == (held.version if held else None):
                return held
            if current is None:  # the pointer went away (a data folder being restored, say)
                log.error("no current candidate index, keeping the one held")
                return held
            return load_current(self.settings.data_dir)
        except Exception as exc:
            log.error(
                "candidate index unreadable, keeping the one held", extra={"reason": describe(exc)}
            )
            return held

    async def _close_later(self, engine: Engine) -> None:
        idle = self._idle[engine] = asyncio.Event()
        if not self._holders[engine]:
            idle.set()
        try:
            await asyncio.wait_for(idle.wait(), release_seconds(self.settings.llm_timeout_ms))
        except TimeoutError:
            log.warning(
                "outgoing engine closed under requests still holding it",
                extra={"version": engine.model_version, "requests": self._holders[engine]},
            )
        finally:  # at shutdown too
            del self._idle[engine]
            await _release(engine)
        await asyncio.to_thread(self._forget_pruned)

    def _forget_pruned(self) -> None:
        """Drop the metrics of versions pruned from the registry (the previous version stays
        there, so its series do too); a registry that cannot be read now is read at the next
        swap."""
        try:
            kept = {
                manifest.version for manifest in Registry(self.settings.registry_path).versions()
            }
        except OSError as exc:
            log.warning("registry unreadable", extra={"reason": describe(exc)})
            return
        metrics.forget_versions(kept | {self.version} if self.version else kept)


async def _release(engine: Engine) -> None:
    """Close an engine; a failure is logged (it happens at shutdown and in background tasks,
    where nobody could act on it)."""
    try:
        await engine.close()
    except Exception as exc:
        log.error(
            "engine not released", extra={"version": engine.model_version, "reason": describe(exc)}
        )
    else:
        log.info("engine released", extra={"version": engine.model_version})


def _refusal(version: str, exc: Exception) -> str:
    """Why `version` is not served, for /readyz (an open route: no folders)."""
    if isinstance(exc, RegistryError):
        return exc.public
    return f"model {version} could not be opened (the gateway's log says why)"
