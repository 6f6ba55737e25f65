"""The request path of POST /v1/search (Rec-R1's personalised search), one step after another:

user context -> query (the model writes it, or the fallback) -> retriever -> filter (seen,
hidden, unavailable) -> policy -> response.

A version trained for search (`reasonrec bootstrap --task search`) reads the user's recent
history and what they typed, and writes a query under the search grammar
(`contract.search.search_pattern`); the retriever is sent the typed text followed by the model's
query. Without such a version, or when the engine fails, overruns the budget or writes no query,
the typed text goes as written (`source: fallback`, the reason counted in
`reasonrec_search_fallbacks_total`); with nothing typed, the title of the user's last item does.
"""

import asyncio
import logging
import time
from dataclasses import dataclass

from contract.candidates import OVERFETCH
from contract.search import (
    MAX_QUERY_CHARS,
    build_search_prompt,
    clean,
    parse_search,
    retriever_query,
    search_answer_budget,
    search_input,
    search_pattern,
)
from contract.tasks import Task
from server import metrics
from server.candidates import MAX_DEPTH, Candidate, filtered
from server.config import Settings
from server.engine import Engine, EngineError, GenerationRequest
from server.policy import enforce, read_policy
from server.schemas import Item, SearchedItem, SearchRequest, SearchResponse, Source
from server.search_index import SearchIndexes
from server.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    profile: dict
    history: list[Item]
    """Oldest first: as much as the model reads, or the last item only without a model."""
    seen: set[str]


@dataclass(frozen=True)
class Query:
    text: str
    source: Source
    reasoning: str | None = None
    fallback: str | None = None
    """Why the fallback wrote it (None: the model did)."""


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
        writer = engine if engine is not None and Task.search in engine.contract.tasks else None
        context = await self._context(request, writer)
        query = await self._query(request, request_id, context, engine, writer)
        ids, by_id = await self._retrieve(request, query.text, context.seen)
        response = SearchResponse(
            request_id=request_id,
            user_id=request.user_id,
            model_version=engine.model_version if engine else None,
            typed=request.query,
            query=query.text,
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
            reasoning=query.reasoning if request.explain else None,
            source=query.source,
            degraded=query.source is Source.fallback,
            latency_ms=round((time.perf_counter() - started) * 1000, 2),
        )
        # Counted together, after the last await: a request its client left counts in neither.
        if query.fallback is not None:
            metrics.SEARCH_FALLBACKS.labels(query.fallback).inc()
        metrics.SEARCHES.labels(response.source.value, response.model_version or "").inc()
        return response

    async def _context(self, request: SearchRequest, writer: Engine | None) -> Context:
        if request.user_id is None:
            return Context(profile={}, history=[], seen=set())
        shown = writer.contract.history if writer else 1
        profile, history, seen = await self.store.user_context(request.user_id, shown)
        items = await self.store.get_items([item_id for item_id, _ in history])
        return Context(profile, [items[i] for i, _ in history if i in items], seen)

    async def _query(
        self,
        request: SearchRequest,
        request_id: str,
        context: Context,
        engine: Engine | None,
        writer: Engine | None,
    ) -> Query:
        # Cleaned for both paths; something is left of a query (`SEARCHABLE`).
        typed = clean(request.query or "", MAX_QUERY_CHARS)
        if writer is None:
            return self._fallback(
                typed, context, "no_model" if engine is None else "task_unsupported"
            )
        data = search_input(context.profile, context.history, typed, len(context.history))
        generation = GenerationRequest(
            request_id=request_id,
            prompt=build_search_prompt(data, writer.contract.rendering),
            regex=search_pattern(writer.contract.rendering),
            max_tokens=max(
                self.settings.max_answer_tokens, search_answer_budget(writer.contract.rendering)
            ),
        )
        try:
            with metrics.engine_timer(Task.search):
                result = await asyncio.wait_for(
                    writer.generate(generation), self.settings.llm_timeout_ms / 1000
                )
        except TimeoutError:
            log.warning("engine timed out")
            return self._fallback(typed, context, "timeout")
        except EngineError as exc:
            log.warning("engine failed", extra={"reason": str(exc)})
            return self._fallback(typed, context, "engine_error")
        metrics.ENGINE_TOKENS.labels("prompt").inc(result.prompt_tokens)
        metrics.ENGINE_TOKENS.labels("completion").inc(result.completion_tokens)
        answer = parse_search(result.text)
        if not answer.well_formed:
            metrics.PARSE_FAILURES.labels(Task.search).inc()
            return self._fallback(typed, context, "malformed")
        text = retriever_query(data.typed, answer.query)
        return Query(text=text, source=Source.llm, reasoning=answer.reasoning)

    def _fallback(self, typed: str, context: Context, reason: str) -> Query:
        last = context.history[-1].title if context.history else ""
        return Query(text=typed or last, source=Source.fallback, fallback=reason)

    async def _retrieve(
        self, request: SearchRequest, query: str, seen: set[str]
    ) -> tuple[list[str], dict[str, Candidate]]:
        """The served ids and their candidates: the retriever's matches, filtered, then the
        policy's constraints (which may promote a match or drop one)."""
        index = self.indexes.current
        if index is None or not query:
            return [], {}
        exclude = seen if request.exclude_seen else set()
        n = request.k * OVERFETCH
        asked = n + len(exclude)
        while True:
            # off the event loop: a dense query is a model forward pass (milliseconds of CPU)
            hits = await asyncio.to_thread(index.search, query, asked)
            unseen = [(item_id, score) for item_id, score in hits if item_id not in exclude]
            found = await filtered(self.store, unseen, n, exclude, None, self.policy)
            # Hidden and unavailable matches took places: read further down while there is more.
            if len(found) >= n or len(hits) < asked or asked >= MAX_DEPTH:
                break
            asked = min(asked * OVERFETCH, MAX_DEPTH)
        by_id = {candidate.item.item_id: candidate for candidate in found}
        items = {item_id: candidate.item for item_id, candidate in by_id.items()}
        order = list(by_id)
        return (enforce(self.policy, order, order, items, request.k) if order else []), by_id
