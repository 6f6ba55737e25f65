"""Recommendation route: POST /v1/recommend."""

from fastapi import APIRouter, Request, Response

from server.cancellation import unless_client_leaves
from server.deps import RecommenderDep, ServingDep
from server.errors import documented
from server.logs import request_id_var
from server.schemas import RecommendRequest, RecommendResponse

router = APIRouter(prefix="/v1/recommend", tags=["recommend"])


@router.post("", response_model=RecommendResponse, responses=documented(400, 413, 415, 422))
async def recommend(
    body: RecommendRequest, request: Request, recommender: RecommenderDep, serving: ServingDep
) -> RecommendResponse | Response:
    """A ranked list with a rationale, for any user (an unknown user is a cold start)."""
    request_id = request_id_var.get() or ""
    with serving.hold() as (engine, index):
        listing = recommender.recommend(body, request_id, engine, index, request.is_disconnected)
        return await unless_client_leaves(request, listing)
