"""Typed dependencies shared by the routers: the store, the settings and the API-key check.

All are `async def` on purpose: FastAPI runs a plain `def` dependency in its thread pool, which
costs more than the work these do.
"""

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from server.config import Settings
from server.errors import ApiError
from server.rate import Rater
from server.recommend import Recommender
from server.search import Searcher
from server.serving import Serving
from server.store import Store


async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_serving(request: Request) -> Serving:
    return request.app.state.serving


async def get_recommender(request: Request) -> Recommender:
    return request.app.state.recommender


async def get_rater(request: Request) -> Rater:
    return request.app.state.rater


async def get_searcher(request: Request) -> Searcher:
    return request.app.state.searcher


StoreDep = Annotated[Store, Depends(get_store)]
ServingDep = Annotated[Serving, Depends(get_serving)]
RecommenderDep = Annotated[Recommender, Depends(get_recommender)]
RaterDep = Annotated[Rater, Depends(get_rater)]
SearcherDep = Annotated[Searcher, Depends(get_searcher)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


# Declared as security schemes so that the OpenAPI document says how to authenticate; either one
# will do. Neither raises by itself: the checks below answer in the API's error format.
_BEARER = HTTPBearer(
    auto_error=False, description="An API key (admin routes: an admin key), where keys are set."
)
_HEADER = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="The same key, in a header of its own."
)


async def presented_key(
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    header: Annotated[str | None, Depends(_HEADER)],
) -> str | None:
    if bearer is not None and bearer.credentials:
        return bearer.credentials.strip()
    return header


KeyDep = Annotated[str | None, Depends(presented_key)]


def _known(presented: str | None, keys: list[str]) -> bool:
    return presented is not None and any(
        secrets.compare_digest(presented.encode(), key.encode()) for key in keys
    )


def _unauthorized(what: str) -> ApiError:
    return ApiError(
        401,
        "unauthorized",
        f"{what} is required: 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
        headers={"WWW-Authenticate": "Bearer"},
    )


async def require_api_key(presented: KeyDep, settings: SettingsDep) -> None:
    """Every /v1 route: with REASONREC_API_KEYS set, a known key must come with the request.

    An admin key is accepted wherever an API key is: it is the stronger credential.
    """
    keys = settings.api_keys
    if keys and not _known(presented, [*keys, *settings.admin_keys]):
        raise _unauthorized("a valid API key")


async def require_admin_key(presented: KeyDep, settings: SettingsDep) -> None:
    """Admin routes: an admin key (REASONREC_ADMIN_KEYS) must come with the request, always.

    No key or an unknown one: 401. A valid API key that is not an admin key: 403.
    """
    if not settings.admin_keys:
        raise ApiError(403, "forbidden", "admin routes are disabled: REASONREC_ADMIN_KEYS is unset")
    if _known(presented, settings.admin_keys):
        return
    if _known(presented, settings.api_keys):
        raise ApiError(403, "forbidden", "this route needs an admin key; an API key is not one")
    raise _unauthorized("an admin key")
