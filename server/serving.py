"""What a gateway answers with: the active version's engine and the candidate index, owned by one
`Serving` object, and hot swap, which replaces them without dropping a request.

Without an index or a model, requests are answered in the retrieval or popularity order
(fallback); `problem` says why there is no engine. Each gateway process subscribes to the
`model-updates` channel. On an announcement it opens the
new version beside the one serving (the registry's contract check first), then points new
requests at it. Requests already holding the old engine finish on it: none uses an engine longer
than `REASONREC_LLM_TIMEOUT_MS` (the budget cancels it), so the old engine is closed after that.
If the new version cannot be opened, the old one keeps serving and the failure is logged.
"""

import asyncio
import logging

import faiss
from redis.exceptions import RedisError

from server import metrics
from server.active_model import open_active_engine, open_engine
from server.config import Settings
from server.engine import Engine
from server.index_files import current_version, load_current
from server.item_index import ItemIndex
from server.registry import RegistryError
from server.store import Store

log = logging.getLogger(__name__)
RETRY_SECONDS = 1.0
POLL_SECONDS = 0.25  # one wait for an announcement; bounds how long stop() takes


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
        self._stopping = asyncio.Event()
        self._following: asyncio.Task | None = None

    @property
    def version(self) -> str | None:
        """The model version answering, None without one."""
        return self.engine.model_version if self.engine else None

    async def start(self) -> None:
        """Open the index and the active model, then follow activations."""
        # One request is one small query: faiss's OpenMP threads only contend with the event loop
        # and vLLM (a query took 16 ms p50 with the default threads, 0.2 ms with one, on 2 cores).
        faiss.omp_set_num_threads(1)
        self.index = load_current(self.settings.data_dir)
        try:
            self.engine = await open_active_engine(self.settings, self.store)
        except RegistryError as exc:
            log.error("active model refused", extra={"reason": str(exc)})
            self.problem = exc.public
        except RedisError as exc:
            log.error("cannot read the active model", extra={"reason": repr(exc)})
            self.problem = "active model unknown: redis unreachable at startup"
        if self.engine is None and self.problem is None:
            self.problem = "no active model: run `reasonrec bootstrap`"
        metrics.set_model_info(self.version)
        self._following = asyncio.create_task(self.run())

    async def stop(self) -> None:
        """Stop following, and release every engine at once (shutdown)."""
        self._stopping.set()
        if self._following is not None:
            await asyncio.gather(self._following, return_exceptions=True)
        for task in list(self._closing):
            task.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)
        if self.engine is not None:
            await self.engine.close()

    async def run(self) -> None:
        """Follow announcements until `stop()` (within POLL_SECONDS); resubscribes when Redis
        goes away."""
        while not self._stopping.is_set():
            try:
                await self._follow()
            except RedisError as exc:
                log.warning("model updates lost, resubscribing", extra={"reason": repr(exc)})
                await asyncio.sleep(RETRY_SECONDS)

    async def _follow(self) -> None:
        # Polled with a timeout rather than `listen()`: a read is never cut off mid-way (a
        # cancelled read can leave the connection hanging at close), and the socket timeout of
        # the client never fires on a quiet channel.
        async with self.store.model_updates() as pubsub:
            # An activation between start-up and this subscription was announced to nobody.
            if (active := await self.store.active_model()) is not None:
                await self.swap(active)
            while not self._stopping.is_set():
                message = await pubsub.get_message(timeout=POLL_SECONDS)
                if message is not None and message["type"] == "message":
                    await self.swap(message["data"])

    async def swap(self, version: str) -> bool:
        """Serve `version` from now on; False (and the old engine kept) if it cannot open."""
        async with self._lock:
            if version == self.version:
                return True
            try:
                engine, index = await self._open_ready(version)
            except Exception as exc:  # whatever breaks the new version, the old one keeps serving
                log.error("model swap refused", extra={"version": version, "reason": str(exc)})
                return False
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

    async def _open_ready(self, version: str) -> tuple[Engine, ItemIndex | None]:
        engine, index = await asyncio.to_thread(self._open, version)
        try:
            await engine.prepare()
        except Exception:
            await engine.close()
            raise
        return engine, index

    def _open(self, version: str) -> tuple[Engine, ItemIndex | None]:
        """The new engine, and the current index (a new model usually comes with the index it was
        trained beside); both read from disk, so off the event loop."""
        engine = open_engine(self.settings, version, serving=self.engine)
        index = self.index
        if current_version(self.settings.data_dir) != (index.version if index else None):
            index = load_current(self.settings.data_dir)
        return engine, index

    async def _close_later(self, engine: Engine) -> None:
        try:
            await asyncio.sleep(self.settings.release_seconds)
        finally:  # at shutdown too
            await engine.close()
            log.info("previous engine released", extra={"version": engine.model_version})
