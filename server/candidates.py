"""Step 2 of a request: candidates from the faiss index, filtered, or popular and new items.

Hidden, unavailable, already seen (unless asked otherwise) and filtered-out items never reach
the prompt. A user with no history the index knows (cold start) gets popular items interleaved
with the newest ones, so that new items get exposure.
"""

from pydantic import BaseModel, Field

from contract.candidates import OVERFETCH, allowed, candidate_order
from reward_rules.policy import DEFAULT_POLICY, Policy
from server.context import UserContext
from server.item_index import ItemIndex
from server.policy import servable
from server.schemas import Item
from server.store import Store

# How deep retrieval reads at most, in index hits and in popular items, to fill a request its
# filters thin out: bounded, so that a category no item has cannot make every request read the
# whole catalog.
MAX_DEPTH = 10_000


class Candidate(BaseModel):
    item: Item
    score: float


class Candidates(BaseModel):
    items: list[Candidate]
    history: list[tuple[Item, float]]
    """The user's history as items (oldest first), for the prompt."""
    cold_start: bool


class Query(BaseModel):
    """What one request asks of retrieval."""

    n: int = Field(description="Candidates wanted.")
    history: int = Field(description="Most recent history items the index is queried with.")
    shown: int = Field(0, description="Most recent history items the prompt shows.")
    exclude_seen: bool = True
    categories: list[str] | None = None


async def retrieve(
    store: Store,
    index: ItemIndex | None,
    context: UserContext,
    query: Query,
    policy: Policy = DEFAULT_POLICY,
) -> Candidates:
    """Candidates for `context`, none that `policy` would not serve; `history` holds the whole
    context history for the prompt. The items the prompt shows as history are never candidates.
    While the filters (a rare category, many hidden or unavailable items) leave fewer than n,
    retrieval reads four times deeper, up to MAX_DEPTH items of each source."""
    n = query.n
    ids = [item_id for item_id, _ in context.history]
    recent = _last(ids, query.history)
    shown = _last(ids, max(query.history, query.shown))
    exclude = set(shown) | (context.seen if query.exclude_seen else set())
    categories = set(query.categories) if query.categories else None
    depth = n * OVERFETCH
    while True:
        hits = index.search(recent, depth, exclude=exclude) if index else []
        popular = await store.popular(depth)
        # New items deepen too: an item of a wanted category that nobody engaged with and that
        # is not among the newest n was never reached for a user without indexed history.
        newest = await store.newest(depth)
        ranked = candidate_order(hits, popular, newest)
        chosen = await filtered(store, ranked, n, exclude, categories, policy)
        deeper = any(len(source) == depth for source in (hits, popular, newest))
        if len(chosen) >= n or not deeper or depth >= MAX_DEPTH:
            break
        depth = min(depth * OVERFETCH, MAX_DEPTH)
    history_items = await store.get_items([item_id for item_id, _ in context.history])
    history = [(history_items[i], ts) for i, ts in context.history if i in history_items]
    return Candidates(items=chosen, history=history, cold_start=not hits)


def _last(items: list[str], count: int) -> list[str]:
    return items[-count:] if count else []


async def filtered(
    store: Store,
    ranked: list[tuple[str, float]],
    n: int,
    exclude: set[str],
    categories: set[str] | None,
    policy: Policy = DEFAULT_POLICY,
) -> list[Candidate]:
    """The first n allowed items of `ranked` ((id, score), best first), hidden, unavailable (by
    the item or by `policy`), excluded and filtered-out ones dropped: an item the policy drops
    later took a candidate's place, and lists came back short. Items are read a chunk at a time:
    most requests need only the first 2n of the ranking."""
    chosen: list[Candidate] = []
    for start in range(0, len(ranked), 2 * n):
        chunk = ranked[start : start + 2 * n]
        # Those excluded (seen, in the history) are never read: `allowed` needs nothing of them.
        listed = await store.listings([item_id for item_id, _ in chunk if item_id not in exclude])
        passed = [
            (item_id, score)
            for item_id, score in chunk
            if item_id in listed
            and allowed(listed[item_id], exclude, categories)
            and servable(policy, listed[item_id])
        ]
        # Whole only what passed: one deleted meanwhile, or unreadable beyond what the filters
        # read, is skipped as before, and the next one takes its place.
        records = await store.get_items([item_id for item_id, _ in passed])
        chosen += [
            Candidate(item=records[item_id], score=round(score, 6))
            for item_id, score in passed
            if item_id in records
        ]
        if len(chosen) >= n:
            break
    return chosen[:n]
