"""The request path of POST /v1/search (Rec-R1's personalised search), one step after another:

query -> retriever -> filter (seen, hidden, unavailable) -> policy -> response.

The query step is where a version trained for search rewrites what the user typed from their
recent history (METHODS.md §3). No version is trained for it yet, so every query goes to the
retriever as written, with `source: fallback` and the reason counted in
`reasonrec_search_fallbacks_total` (`no_model`, or `task_unsupported` for the active version).
"""

import asyncio
import time

from contract.candidates import OVERFETCH
from server import metrics
from server.candidates import Candidate, filtered
from server.config import Settings
from server.engine import Engine
from server.policy import enforce, read_policy
from server.schemas import SearchedItem, SearchRequest, SearchResponse, Source
from server.search_index import SearchIndexes
from server.store import Store


class Searcher:
    def __init__(self, store: Store, settings: Settings, indexes: SearchIndexes):
        self.store = store
        self.settings = settings
        self.indexes = indexes
        self.policy = read_policy(settings.policy_file)

    async def search(
        self, request: SearchRequest, request_id: str, engine: Engine | None
    ) -> SearchResponse:
        started = time.perf_counter()
        reason = "no_model" if engine is None else "task_unsupported"
        metrics.SEARCH_FALLBACKS.labels(reason).inc()
        ids, by_id = await self._retrieve(request, request.query)
        response = SearchResponse(
            request_id=request_id,
            user_id=request.user_id,
            model_version=engine.model_version if engine else None,
            query=request.query,
            retriever=self.indexes.kind.value,
            items=[
                SearchedItem(
                    item_id=item_id,
                    rank=rank,
                    score=round(by_id[item_id].score, 6),
                    title=by_id[item_id].item.title,
                    categories=by_id[item_id].item.categories,
                )
                for rank, item_id in enumerate(ids, start=1)
            ],
            source=Source.fallback,
            degraded=True,
            latency_ms=round((time.perf_counter() - started) * 1000, 2),
        )
        metrics.SEARCHES.labels(response.source.value, response.model_version or "").inc()
        return response

    async def _retrieve(
        self, request: SearchRequest, query: str
    ) -> tuple[list[str], dict[str, Candidate]]:
        """The served ids and their candidates: the retriever's matches, filtered, then the
        policy's constraints (which may promote a match or drop one)."""
        index = self.indexes.current
        if index is None:
            return [], {}
        seen = await self.store.seen_items(request.user_id) if request.user_id else set()
        exclude = seen if request.exclude_seen else set()
        n = request.k * OVERFETCH
        # off the event loop: a dense query is a model forward pass (milliseconds of CPU)
        hits = await asyncio.to_thread(index.search, query, n + len(exclude))
        unseen = [(item_id, score) for item_id, score in hits if item_id not in exclude]
        found = await filtered(self.store, unseen, n, exclude, None)
        by_id = {candidate.item.item_id: candidate for candidate in found}
        items = {item_id: candidate.item for item_id, candidate in by_id.items()}
        order = list(by_id)
        return (enforce(self.policy, order, order, items, request.k) if order else []), by_id
