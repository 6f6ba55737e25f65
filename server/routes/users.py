"""User routes: /v1/users."""

from fastapi import APIRouter

from server.deps import StoreDep
from server.errors import documented, not_found
from server.schemas import Id, User, UserIn, UserUpsert

router = APIRouter(prefix="/v1/users", tags=["users"])


@router.put("/{user_id}", response_model=User, responses=documented(400, 413, 415, 422))
async def put_user(user_id: Id, user: UserIn, store: StoreDep) -> User:
    """Create or replace a user's attributes (age, gender, occupation, ...)."""
    await store.upsert_users([UserUpsert(user_id=user_id, attributes=user.attributes)])
    return await get_user(user_id, store)


@router.get("/{user_id}", response_model=User, responses=documented(404, 422))
async def get_user(user_id: Id, store: StoreDep) -> User:
    """A user's attributes and recent positive interactions, newest first."""
    user = await store.get_user(user_id)
    if user is None:
        raise not_found("user", user_id)
    return user
