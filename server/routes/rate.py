"""Rating route: POST /v1/rate."""

from fastapi import APIRouter, Request, Response

from server.cancellation import unless_client_leaves
from server.deps import RaterDep, ServingDep
from server.errors import documented
from server.logs import request_id_var
from server.schemas import RateRequest, RateResponse

router = APIRouter(prefix="/v1/rate", tags=["rate"])


@router.post("", response_model=RateResponse, responses=documented(400, 409, 413, 415, 422))
async def rate(
    body: RateRequest, request: Request, rater: RaterDep, serving: ServingDep
) -> RateResponse | Response:
    """Predicted ratings (1 to 5) of up to 50 items for any user, with the model's reasoning on
    request; a cold-start user is answered from the items' stats."""
    with serving.hold() as (engine, _):
        rating = rater.rate(body, request_id_var.get() or "", engine)
        return await unless_client_leaves(request, rating)
