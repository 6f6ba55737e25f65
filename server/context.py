"""Step 1 of a request: the user's context from Redis in one pipelined round trip."""

from pydantic import BaseModel

from server.store import Store


class UserContext(BaseModel):
    """What is known of a user. An unknown user is a cold start: everything empty, not an error."""

    user_id: str
    profile: dict[str, str | int | float | bool]
    history: list[tuple[str, float]]
    """(item id, event time), oldest first, at most the configured prompt history."""
    seen: set[str]


async def load_context(store: Store, user_id: str, history_limit: int) -> UserContext:
    profile, history, seen = await store.user_context(user_id, history_limit)
    return UserContext(user_id=user_id, profile=profile, history=history, seen=seen)
