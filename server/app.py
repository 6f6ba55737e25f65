"""The FastAPI application: wiring of settings, Redis, engine, middleware, errors and routers."""

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI

from server import errors
from server.config import Settings
from server.deps import require_api_key
from server.middleware import RequestMiddleware
from server.rate import Rater
from server.recommend import Recommender
from server.redis_client import connect
from server.routes import feedback, health, items, models, rate, recommend, search, users
from server.schemas import latest_time
from server.search import Searcher
from server.search_index import SearchIndexes
from server.serving import Serving
from server.store import build_store

log = logging.getLogger(__name__)


def _openapi_of_the_hour(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """The OpenAPI document, made again when the hour changes: it states the latest time the API
    accepts, which moves on each hour (server.schemas.latest_time)."""
    made: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        hour = latest_time()
        if made.get("hour") != hour:
            app.openapi_schema = None
            made.update(hour=hour, document=FastAPI.openapi(app))
        return made["document"]

    return openapi


def _reachable_from_outside(host: str) -> bool:
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name
        return host != "localhost"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        handle = connect(settings)
        store = build_store(settings, handle.client)
        app.state.settings, app.state.store = settings, store
        app.state.recommender = Recommender(store, settings)
        app.state.rater = Rater(store, settings)
        indexes = SearchIndexes(settings.search_retriever)
        app.state.searcher = Searcher(store, settings, indexes)
        app.state.serving = Serving(settings, store)
        if not settings.api_keys and _reachable_from_outside(settings.host):
            # No keys is the embedded default's convenience; on an open address it is anyone's
            # catalog, users and feedback to read and rewrite.
            log.warning(
                "no API keys (REASONREC_API_KEYS): every /v1 route but the admin ones is open to "
                "whoever reaches this address",
                extra={"host": settings.host, "port": settings.port},
            )
        await app.state.serving.start()
        await indexes.start(store)
        stopping = asyncio.Event()
        following = asyncio.create_task(
            indexes.follow(store, settings.search_refresh_seconds, stopping)
        )
        try:
            yield
        finally:
            stopping.set()
            await following
            await app.state.serving.stop()
            await handle.close()

    app = FastAPI(
        title="reasonrec",
        summary="Recommendations ranked by a reasoning LLM; catalog, users and feedback API.",
        version="0.1.0",
        lifespan=lifespan,
        responses=errors.documented(414, 500),
        # A path id holding an encoded slash ("0%2F") arrives decoded ("/v1/users/0/"): the
        # redirect to "/v1/users/0" wrote and read another user's record.
        redirect_slashes=False,
    )
    app.openapi = _openapi_of_the_hour(app)
    errors.install(app)
    app.add_middleware(
        RequestMiddleware,
        max_body_bytes=settings.max_body_bytes,
        api_keys=settings.api_keys,
        admin_keys=settings.admin_keys,
    )
    app.include_router(health.router)
    routers = (items, users, feedback, recommend, rate, search, models)
    for router in (module.router for module in routers):
        app.include_router(
            router, dependencies=[Depends(require_api_key)], responses=errors.documented(401, 503)
        )
    return app
