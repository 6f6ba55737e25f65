"""The request path of POST /v1/recommend, one named step after another:

context -> candidates -> prompt -> engine -> parse + repair -> policy -> response -> impression log.

When the engine is missing, fails or overruns its budget, the retrieval order is served with
`source: fallback` and `degraded: true`; the request still succeeds.
"""

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from contract.impression import Impression
from contract.prompt import (
    ANSWER_TAG,
    ITEM_MARK,
    Contract,
    answer_pattern,
    build_prompt,
    parse_answer,
    prompt_input,
    text_answer_budget,
)
from contract.ranking import first_k, served_order
from contract.tasks import Task
from server import metrics
from server.candidates import Candidate, Candidates, Query, retrieve
from server.config import Settings
from server.context import UserContext, load_context
from server.engine import MAX_LOGPROBS, Engine, EngineError, Generation, GenerationRequest
from server.item_index import ItemIndex
from server.policy import enforce, read_policy
from server.schemas import RecommendedItem, RecommendRequest, RecommendResponse, Source
from server.store import Store

log = logging.getLogger(__name__)

# Where each item is one token, a penalty on tokens already generated makes repeating an id costly
# (a regex cannot forbid repeats). 2.0 is the most vLLM accepts; the parser drops what slips by.
# A general tokenizer writes ids as digits shared by many ids and by the rationale's words: a
# penalty would push the answer away from every digit and word already written, so none there.
REPEAT_PENALTY = 2.0
# Ids the grammar asks for beyond k: a model sure of one item can name it twice despite the
# penalty (measured: 6 answers in 40 with a repeat, tiny preset on ML-100K); the first k
# distinct ids are served, so a repeat costs a spare instead of a repair.
SPARE_IDS = 5
FALLBACK_RATIONALE = (
    "Ranked by similarity to your recent history (the language model was not used)."
)
COLD_START_RATIONALE = (
    "Popular and newly added items: no history to go by yet that the item index knows (the "
    "language model was not used)."
)


@dataclass
class Outcome:
    """What the ranking step produced and how."""

    ids: list[str]
    source: Source
    rationale: str = ""
    raw: str = ""
    reason: str | None = None


def first_pick(result: Generation, order: list[str]) -> dict[str, float]:
    """Candidates and their log-probability as the answer's first item.

    Read at the step after `<answer>`, where the grammar and the allowed tokens left exactly the
    candidates: the model's next-item choice, which it learned in pretraining. Empty when the
    engine returned no such step.
    """
    allowed = set(order)
    scored = ((text.removeprefix(ITEM_MARK), lp) for text, lp in result.after(ANSWER_TAG).items())
    return {item: lp for item, lp in scored if item in allowed and math.isfinite(lp)}


def answer_choices(engine: Engine, order: list[str]) -> list[str]:
    """The candidates an answer may name. For a model whose items are tokens, those that have one:
    an item added after the model was trained has none, and letting the answer spell it would
    let it spell any item in pieces (server.vocabulary); it stays in the reserve the served list
    is filled from (`enforce`). Every candidate when none has a token, or ids are text."""
    named = engine.items.nameable(order) if engine.items else []
    return named or order


def ranking_request(
    engine: Engine, request_id: str, prompt: str, choices: list[str], k: int, max_tokens: int
) -> GenerationRequest:
    """What the engine is asked for one ranking naming `choices` (`answer_choices`)."""
    allowed = engine.items.allowed(choices) if engine.items else None
    if allowed is None:  # ids written as text: room for the longest answer the regex admits
        max_tokens = max(max_tokens, text_answer_budget(choices, k, SPARE_IDS))
    return GenerationRequest(
        request_id=request_id,
        prompt=prompt,
        regex=answer_pattern(choices, k, SPARE_IDS),
        max_tokens=max_tokens,
        presence_penalty=REPEAT_PENALTY if allowed else 0.0,
        allowed_token_ids=allowed,
        # Every candidate's score: a retrieval prior may lift one the model ranks low.
        logprobs=min(len(choices), MAX_LOGPROBS) if allowed else None,
    )


def _fallback(order: list[str], k: int, reason: str, raw: str = "") -> Outcome:
    metrics.FALLBACKS.labels(reason).inc()
    return Outcome(order[:k], Source.fallback, raw=raw, reason=reason)


def _ranked_item(candidate: Candidate, rank: int) -> RecommendedItem:
    item = candidate.item
    return RecommendedItem(
        item_id=item.item_id,
        rank=rank,
        score=candidate.score,
        title=item.title,
        categories=item.categories,
    )


async def _stays() -> bool:
    return False


class Recommender:
    def __init__(self, store: Store, settings: Settings):
        self.store = store
        self.settings = settings
        self.policy = read_policy(settings.policy_file)

    async def recommend(
        self,
        request: RecommendRequest,
        request_id: str,
        engine: Engine | None,
        index: ItemIndex | None,
        client_gone: Callable[[], Awaitable[bool]] = _stays,
    ) -> RecommendResponse:
        """The list for `request`; logged as an impression unless `client_gone` says the client
        stopped waiting for it (a list nobody saw would teach the model it was passed over)."""
        started = time.perf_counter()
        contract = engine.contract if engine else Contract()
        # Without a model no prompt shows a history: only retrieval's is left out.
        shown = contract.history if engine else 0
        context, found = await self._candidates(request, index, shown)
        by_id = {candidate.item.item_id: candidate for candidate in found.items}
        order = list(by_id)
        shown = [candidate.item for candidate in found.items]
        data = prompt_input(context.profile, found.history, shown, request.k, contract.history)
        prompt = build_prompt(data, contract.rendering) if order else ""
        popularity = index.popularity(order) if index else {}
        outcome = await self._rank(prompt, order, popularity, request, request_id, engine)
        if outcome.source is Source.fallback:
            outcome.rationale = COLD_START_RATIONALE if found.cold_start else FALLBACK_RATIONALE
        items = {item_id: candidate.item for item_id, candidate in by_id.items()}
        outcome.ids = enforce(self.policy, outcome.ids, order, items, request.k) if order else []
        response = RecommendResponse(
            request_id=request_id,
            user_id=request.user_id,
            model_version=engine.model_version if engine else None,
            items=[_ranked_item(by_id[i], rank) for rank, i in enumerate(outcome.ids, start=1)],
            rationale=outcome.rationale if request.explain else None,
            source=outcome.source,
            degraded=outcome.source is Source.fallback,
            latency_ms=round((time.perf_counter() - started) * 1000, 2),
        )
        # Counted though the client left: the fallback ratio's numerator counted it already.
        metrics.RECOMMENDATIONS.labels(response.source.value, response.model_version or "").inc()
        if await client_gone():
            log.info("client gone before the list was sent: no impression logged")
            return response
        await self._log_impression(response, prompt, contract, order, outcome)
        return response

    async def _candidates(
        self,
        request: RecommendRequest,
        index: ItemIndex | None,
        prompt_history: int,
    ) -> tuple[UserContext, Candidates]:
        """Retrieval queries with the configured history; the prompt may show a longer one."""
        query = self.settings.prompt_history
        with metrics.CANDIDATES_SECONDS.time():
            context = await load_context(self.store, request.user_id, max(query, prompt_history))
            found = await retrieve(
                self.store,
                index,
                context,
                Query(
                    # at least k: a list is never short for want of candidates asked for
                    n=max(self.settings.candidates, request.k),
                    history=query,
                    shown=prompt_history,
                    exclude_seen=request.exclude_seen,
                    categories=request.categories,
                ),
                self.policy,
            )
        return context, found

    async def _rank(
        self,
        prompt: str,
        order: list[str],
        popularity: dict[str, float],
        request: RecommendRequest,
        request_id: str,
        engine: Engine | None,
    ) -> Outcome:
        if not order:
            return _fallback(order, request.k, "no_candidates")
        if engine is None:
            return _fallback(order, request.k, "no_model")
        if Task.rank not in engine.contract.tasks:
            return _fallback(order, request.k, "task_unsupported")
        choices = answer_choices(engine, order)
        generation = ranking_request(
            engine, request_id, prompt, choices, request.k, self.settings.max_answer_tokens
        )
        budget = self.settings.llm_timeout_ms / 1000
        try:
            with metrics.engine_timer(Task.rank):
                result = await asyncio.wait_for(engine.generate(generation), budget)
        except TimeoutError:
            log.warning("engine timed out", extra={"budget_ms": self.settings.llm_timeout_ms})
            return _fallback(order, request.k, "timeout")
        except EngineError as exc:
            log.warning("engine failed", extra={"reason": str(exc)})
            return _fallback(order, request.k, "engine_error")
        metrics.ENGINE_TOKENS.labels("prompt").inc(result.prompt_tokens)
        metrics.ENGINE_TOKENS.labels("completion").inc(result.completion_tokens)
        if result.completion_tokens >= generation.max_tokens:
            # The grammar ends every answer sooner unless the budget is too small for the model's
            # tokenizer (ids written as text): raise REASONREC_MAX_ANSWER_TOKENS.
            log.warning(
                "answer cut at the token budget", extra={"max_tokens": generation.max_tokens}
            )
        answer = parse_answer(result.text)
        if not first_k(answer.items, choices, 1):  # nothing of it could be served
            metrics.PARSE_FAILURES.labels(Task.rank).inc()
            return _fallback(order, request.k, "malformed", raw=result.text)
        scores = first_pick(result, choices)
        blend = engine.contract.blend
        ids, repaired = served_order(answer, scores, choices, request.k, blend, popularity)
        if repaired:
            metrics.PARSE_FAILURES.labels(Task.rank).inc()
        return Outcome(ids, Source.llm, answer.rationale, raw=result.text)

    async def _log_impression(
        self,
        response: RecommendResponse,
        prompt: str,
        contract: Contract,
        order: list[str],
        outcome: Outcome,
    ) -> None:
        """Everything needed to join later feedback to exactly what was shown, and to train on."""
        impression = Impression(
            request_id=response.request_id,
            user_id=response.user_id,
            model_version=response.model_version or "",
            ts=time.time(),
            source=response.source.value,
            fallback_reason=outcome.reason or "",
            items=[item.item_id for item in response.items],
            candidates=order,
            prompt=prompt,
            rendering=contract.rendering,
            output=outcome.raw,
        )
        await self.store.log_impression(
            impression, self.settings.impressions_maxlen or None, self.settings.attribution_seconds
        )
