"""Catalog routes: /v1/items."""

from fastapi import APIRouter, Response

from server.deps import StoreDep
from server.errors import documented, not_found
from server.schemas import Id, Item, ItemBatch, ItemIn, ItemUpsert, UpsertResult

router = APIRouter(prefix="/v1/items", tags=["items"])


@router.put("/{item_id}", response_model=Item, responses=documented(400, 413, 415, 422))
async def put_item(item_id: Id, item: ItemIn, store: StoreDep) -> Item:
    """Create or replace one item. Re-putting a deleted item makes it recommendable again."""
    await store.upsert_items([ItemUpsert(item_id=item_id, **item.model_dump())])
    return await get_item(item_id, store)


@router.post("", response_model=UpsertResult, responses=documented(400, 413, 415, 422))
async def post_items(batch: ItemBatch, store: StoreDep) -> UpsertResult:
    """Create or replace up to 1000 items in one call."""
    return UpsertResult(upserted=await store.upsert_items(batch.items))


@router.get("/{item_id}", response_model=Item, responses=documented(404, 422))
async def get_item(item_id: Id, store: StoreDep) -> Item:
    """An item. A deleted one answers 404 like one that never existed, until it is put again."""
    item = await store.get_item(item_id)
    if item is None or item.hidden:
        raise not_found("item", item_id)
    return item


@router.delete("/{item_id}", status_code=204, responses=documented(404, 422))
async def delete_item(item_id: Id, store: StoreDep) -> Response:
    """Hide an item: it is never recommended again; its history and feedback are kept."""
    if not await store.hide_item(item_id):
        raise not_found("item", item_id)
    return Response(status_code=204)
