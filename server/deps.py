"""Typed dependencies shared by the routers: the store, the settings and the API-key check.

All are `async def` on purpose: FastAPI runs a plain `def` dependency in its thread pool, which
costs more than the work these do.
"""

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from server.auth import api_key_refusal, known, presented, unauthorized
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
    request: Request,
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    _header: Annotated[str | None, Depends(_HEADER)],
) -> str | None:
    headers = request.headers
    return presented(headers.get("authorization"), headers.get("x-api-key"))


KeyDep = Annotated[str | None, Depends(presented_key)]


async def require_api_key(presented: KeyDep, settings: SettingsDep) -> None:
    """Every /v1 route: with REASONREC_API_KEYS set, a known key must come with the request
    (`RequestMiddleware` refuses it before the body is read; this documents it)."""
    if refusal := api_key_refusal(presented, settings.api_keys, settings.admin_keys):
        raise refusal


async def require_admin_key(presented: KeyDep, settings: SettingsDep) -> None:
    """Admin routes: an admin key (REASONREC_ADMIN_KEYS) must come with the request, always.

    No key or an unknown one: 401. A valid API key that is not an admin key: 403.
    """
    if not settings.admin_keys:
        raise ApiError(403, "forbidden", "admin routes are disabled: REASONREC_ADMIN_KEYS is unset")
    if known(presented, settings.admin_keys):
        return
    if known(presented, settings.api_keys):
        raise ApiError(403, "forbidden", "this route needs an admin key; an API key is not one")
    raise unauthorized("an admin key")
