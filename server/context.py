"""Step 1 of a request: the user's context from Redis in one pipelined round trip."""

from pydantic import BaseModel

from server.schemas import readable_time
from server.store import Store, attributes_of


class UserContext(BaseModel):
    """What is known of a user. An unknown user is a cold start: everything empty, not an error."""

    user_id: str
    profile: dict[str, str | int | float | bool]
    history: list[tuple[str, float]]
    """(item id, event time), oldest first, at most the configured prompt history."""
    seen: set[str]


async def load_context(store: Store, user_id: str, history_limit: int) -> UserContext:
    keys = store.keys
    async with store.redis.pipeline(transaction=False) as pipe:
        pipe.hget(keys.user(user_id), "attributes")
        pipe.zrange(keys.history(user_id), -history_limit, -1, withscores=True)
        pipe.smembers(keys.seen(user_id))
        attributes, history, seen = await pipe.execute()
    return UserContext(
        user_id=user_id,
        profile=attributes_of(user_id, attributes),
        history=[(i, ts) for i, ts in history if readable_time(ts)] if history_limit else [],
        seen=set(seen),
    )
