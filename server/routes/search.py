"""Search route: POST /v1/search."""

from fastapi import APIRouter, Request, Response

from server.cancellation import unless_client_leaves
from server.deps import SearcherDep, ServingDep
from server.errors import documented
from server.logs import request_id_var
from server.schemas import SearchRequest, SearchResponse

router = APIRouter(prefix="/v1/search", tags=["search"])


@router.post("", response_model=SearchResponse, responses=documented(400, 413, 415, 422))
async def search(
    body: SearchRequest, request: Request, searcher: SearcherDep, serving: ServingDep
) -> SearchResponse | Response:
    """Catalog items matching a free-text query, ranked by the fixed retriever (BM25 or dense);
    with a `user_id`, the items they have seen are left out."""
    with serving.hold() as (engine, _):
        searching = searcher.search(body, request_id_var.get() or "", engine)
        return await unless_client_leaves(request, searching)
