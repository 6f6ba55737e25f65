"""Typed dependencies shared by the routers: the store, the settings and the API-key check.

All are `async def` on purpose: FastAPI runs a plain `def` dependency in its thread pool, which
costs more than the work these do.
"""

import secrets
from typing import Annotated

from fastapi import Depends, Request

from server.config import Settings
from server.engine import Engine
from server.errors import ApiError
from server.item_index import ItemIndex
from server.recommend import Recommender
from server.store import Store


async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_engine(request: Request) -> Engine | None:
    return request.app.state.engine


async def get_index(request: Request) -> ItemIndex | None:
    return request.app.state.index


async def get_recommender(request: Request) -> Recommender:
    return request.app.state.recommender


StoreDep = Annotated[Store, Depends(get_store)]
EngineDep = Annotated[Engine | None, Depends(get_engine)]
IndexDep = Annotated[ItemIndex | None, Depends(get_index)]
RecommenderDep = Annotated[Recommender, Depends(get_recommender)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def _presented_key(request: Request) -> str | None:
    authorization = request.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token:
        return token.strip()
    return request.headers.get("x-api-key")


def _known(presented: str | None, keys: list[str]) -> bool:
    return presented is not None and any(
        secrets.compare_digest(presented.encode(), key.encode()) for key in keys
    )


async def require_api_key(request: Request, settings: SettingsDep) -> None:
    """Every /v1 route: with REASONREC_API_KEYS set, a known key must come with the request."""
    if settings.api_keys and not _known(_presented_key(request), settings.api_keys):
        raise ApiError(
            401,
            "unauthorized",
            "a valid API key is required: 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def require_admin_key(request: Request, settings: SettingsDep) -> None:
    """Admin routes: an admin key (REASONREC_ADMIN_KEYS) must come with the request, always."""
    if not settings.admin_keys:
        raise ApiError(403, "forbidden", "admin routes are disabled: REASONREC_ADMIN_KEYS is unset")
    if not _known(_presented_key(request), settings.admin_keys):
        raise ApiError(
            401,
            "unauthorized",
            "an admin key is required: 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
