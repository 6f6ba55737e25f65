"""Model versions: GET /v1/models (what serves, what served before, what could) and
POST /v1/models/activate (admin: roll forward or back; every gateway swaps within seconds)."""

import logging
from datetime import datetime

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from contract.prompt import Rendering
from contract.tasks import Task
from server.deps import ServingDep, SettingsDep, StoreDep, require_admin_key
from server.errors import ApiError, documented
from server.registry import Manifest, Registry, RegistryError, servable
from server.schemas import Id
from server.store import BeingRemoved

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/models", tags=["models"])


class ModelVersion(BaseModel):
    version: str
    created_at: datetime
    kind: str
    base_model: str | None = Field(description="For kind lora: the full version it adapts.")
    parent: str | None
    trained_on: str | None
    contract_version: str
    rendering: Rendering
    chat_template: bool = Field(description="Its prompts go through its chat template.")
    tasks: list[Task] = Field(
        description="What it was trained for: `rank` (POST /v1/recommend), `rate` (POST /v1/rate), "
        "`search` (POST /v1/search)."
    )
    retrieval_prior: float = Field(
        description="How much its served order leans on the retrieval order (0: not at all)."
    )
    popularity_penalty: float = Field(
        description="How much popularity its served order takes back (0: none)."
    )
    rating_weight: float = Field(
        description="Its served ratings: this much its own, the rest the lean baseline's."
    )
    ndcg_at_10: float | None = Field(
        description="NDCG@10 on the validation users it was gated on (after all training)."
    )
    retrieval_ndcg_at_10: float | None = Field(
        description="NDCG@10 of the retrieval order it reranks, on the same users: the fallback."
    )
    metrics: dict[str, float]


class ModelsResponse(BaseModel):
    active: str | None = Field(description="The version the store points serving at.")
    previous: str | None = Field(description="The version active before it (for rollback).")
    serving: str | None = Field(description="The version this gateway process answers with.")
    versions: list[ModelVersion] = Field(description="Every version in the registry, oldest first.")


class ActivateRequest(BaseModel):
    version: Id


class ActivateResponse(BaseModel):
    active: str
    previous: str | None


def _summary(manifest: Manifest) -> ModelVersion:
    return ModelVersion(
        **manifest.model_dump(include=set(ModelVersion.model_fields)),
        ndcg_at_10=manifest.metrics.get("ndcg@10"),
        retrieval_ndcg_at_10=manifest.metrics.get("retrieval_ndcg@10"),
    )


@router.get("", response_model=ModelsResponse)
async def list_models(
    store: StoreDep, settings: SettingsDep, serving: ServingDep
) -> ModelsResponse:
    versions = Registry(settings.registry_path).versions()
    return ModelsResponse(
        active=await store.active_model(),
        previous=await store.previous_model(),
        serving=serving.version,
        versions=[_summary(manifest) for manifest in versions],
    )


@router.post(
    "/activate",
    response_model=ActivateResponse,
    dependencies=[Depends(require_admin_key)],
    responses=documented(400, 403, 404, 409, 413, 415, 422),
)
async def activate(
    body: ActivateRequest, store: StoreDep, settings: SettingsDep
) -> ActivateResponse:
    """Make `version` active; gateways subscribed to model updates swap to it without restart."""
    registry = Registry(settings.registry_path)
    if not registry.has(body.version):
        raise ApiError(404, "not_found", f"model version '{body.version}' is not in the registry")
    try:
        servable(registry, body.version)
    except RegistryError as exc:  # the folders it may name are the operator's, not the client's
        log.warning("activation refused", extra={"version": body.version, "reason": str(exc)})
        raise ApiError(409, "model_refused", exc.public) from exc
    try:
        previous = await store.set_active_model(body.version)
    except BeingRemoved as exc:
        raise ApiError(404, "not_found", str(exc)) from exc
    return ActivateResponse(active=body.version, previous=previous)
