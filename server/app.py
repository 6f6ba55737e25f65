"""The FastAPI application: wiring of settings, Redis, middleware, error handlers and routers."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from server import errors
from server.config import Settings
from server.deps import require_api_key
from server.keys import Keys
from server.middleware import RequestMiddleware
from server.redis_client import connect
from server.routes import feedback, health, items, users
from server.store import Store


def build_store(settings: Settings, redis) -> Store:
    return Store(
        redis,
        Keys(settings.key_prefix),
        history_size=settings.history_size,
        dedup_ttl_seconds=settings.dedup_ttl_seconds,
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        handle = connect(settings)
        app.state.settings = settings
        app.state.store = build_store(settings, handle.client)
        try:
            yield
        finally:
            await handle.close()

    app = FastAPI(
        title="reasonrec",
        summary="Recommendations ranked by a reasoning LLM; catalog, users and feedback API.",
        version="0.1.0",
        lifespan=lifespan,
    )
    errors.install(app)
    app.add_middleware(RequestMiddleware, max_body_bytes=settings.max_body_bytes)
    app.include_router(health.router)
    for router in (items.router, users.router, feedback.router):
        app.include_router(router, dependencies=[Depends(require_api_key)])
    return app
