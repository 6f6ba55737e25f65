"""Hot swap: follow the active model version and switch engines without dropping a request.

Each gateway process subscribes to the `model-updates` channel. On an announcement it opens the
new version beside the one serving (the registry's contract check first), then points new
requests at it. Requests already holding the old engine finish on it: none uses an engine longer
than `REASONREC_LLM_TIMEOUT_MS` (the budget cancels it), so the old engine is closed after that.
If the new version cannot be opened, the old one keeps serving and the failure is logged.
"""

import asyncio
import logging

from fastapi import FastAPI
from redis.exceptions import RedisError

from server import metrics
from server.active_model import open_engine
from server.config import Settings
from server.engine import Engine
from server.item_index import ItemIndex, current_version, load_current
from server.store import Store

log = logging.getLogger(__name__)
RETRY_SECONDS = 1.0
POLL_SECONDS = 0.25  # one wait for an announcement; bounds how long stop() takes


class ModelFollower:
    def __init__(self, app: FastAPI, settings: Settings, store: Store):
        self.app, self.settings, self.store = app, settings, store
        self._lock = asyncio.Lock()  # one swap at a time, in announcement order
        self._closing: set[asyncio.Task] = set()
        self._stopping = asyncio.Event()

    @property
    def serving(self) -> str | None:
        engine = self.app.state.engine
        return engine.model_version if engine else None

    async def run(self) -> None:
        """Follow announcements until `stop()`; resubscribes when Redis goes away."""
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
        async with self.store.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.subscribe(self.store.keys.model_updates)
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
            if version == self.serving:
                return True
            try:
                engine, index = await self._open_ready(version)
            except Exception as exc:  # whatever breaks the new version, the old one keeps serving
                log.error("model swap refused", extra={"version": version, "reason": str(exc)})
                return False
            self.app.state.index = index
            old, self.app.state.engine = self.app.state.engine, engine
            self.app.state.engine_problem = None
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
        engine = open_engine(self.settings, version, serving=self.app.state.engine)
        index = self.app.state.index
        if current_version(self.settings.data_dir) != (index.version if index else None):
            index = load_current(self.settings.data_dir)
        return engine, index

    async def _close_later(self, engine: Engine) -> None:
        try:
            await asyncio.sleep(self.settings.release_seconds)
        finally:  # at shutdown too
            await engine.close()
            log.info("previous engine released", extra={"version": engine.model_version})

    def stop(self) -> None:
        """`run()` returns within POLL_SECONDS."""
        self._stopping.set()

    async def close(self) -> None:
        """Release at once the engines still waiting for their requests to finish (shutdown)."""
        for task in list(self._closing):
            task.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)
