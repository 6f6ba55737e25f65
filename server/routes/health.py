"""Liveness, readiness and metrics: open even when API keys are set."""

import asyncio
import logging
from typing import Literal

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from redis.exceptions import RedisError

from server.deps import ServingDep, StoreDep
from server.engine import Engine, EngineError
from server.logs import describe
from server.serving import Serving
from server.store import Store

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])
# The engine's whole check: a server that trickles its answer byte by byte kept it open 12 s+.
HEALTH_SECONDS = 3.0


class Readiness(BaseModel):
    status: Literal["ready", "degraded", "not_ready"]
    checks: dict[str, str]
    model_version: str | None


# HEAD too, as uptime checkers send it (FastAPI's GET routes refuse it: 405), left out of the
# OpenAPI document, where one operation for two methods would be a duplicate operation id.
@router.head("/healthz", include_in_schema=False)
@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive (it says nothing of its dependencies)."""
    return {"status": "ok"}


@router.head("/readyz", include_in_schema=False)
@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Redis does not answer."}},
)
async def readyz(store: StoreDep, serving: ServingDep) -> JSONResponse:
    """Ready to serve: Redis answers (503 with the failing check otherwise).

    The engine is reported, not required: without a model, or with its engine down, every
    request is still answered in the retrieval order, so the status is "degraded" (200). Gateways
    share the engine; failing them all at once would turn a degraded service into an outage.
    """
    with serving.hold() as (engine, _):  # not closed by a swap while it is asked
        checks = {
            "redis": await _redis_check(store),
            "engine": await _engine_check(serving, engine),
        }
    failed = checks["redis"] != "ok"
    status = "not_ready" if failed else "ready" if checks["engine"] == "ok" else "degraded"
    body = Readiness(
        status=status, checks=checks, model_version=engine.model_version if engine else None
    )
    return JSONResponse(body.model_dump(), status_code=503 if failed else 200)


async def _redis_check(store: Store) -> str:
    """Says "ok" or "unreachable": the address and the error text go to the log, not to anyone who
    can reach this unauthenticated route."""
    try:
        await store.ping()
    except RedisError as exc:
        log.warning("readiness: redis unreachable", extra={"reason": describe(exc)})
        return "unreachable"
    return "ok"


async def _engine_check(serving: Serving, engine: Engine | None) -> str:
    if engine is None:
        return serving.problem or "no engine"
    try:
        async with asyncio.timeout(HEALTH_SECONDS):
            await engine.check_health()
    except (TimeoutError, EngineError) as exc:
        reason = str(exc) or f"no answer in {HEALTH_SECONDS:g} s"
        log.warning("readiness: engine unhealthy", extra={"reason": reason})
        return "unreachable"
    return "ok"


@router.head("/metrics", include_in_schema=False)
@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text."}},
)
async def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
