"""The request path of POST /v1/rate, one named step after another:

items -> rating context -> one prompt per item -> engine (rating grammar) -> rating -> response.

The model's rating is the mean of its distribution over the five ratings where its answer writes
one (`contract.rating.expected_rating`); the served rating mixes it with the lean baseline's
(`contract.rating.lean_rating`: the global mean, the item's bias and the user's lean over their
latest ratings) by the weight validation chose for the version (`rating_weight`; 1: the model's
alone). An item the engine fails on, or that overruns the budget, is rated by the lean baseline
with `source: fallback`; so is every item when no model is active. A model that was not trained to
rate is refused (409): its numbers would mean nothing.
"""

import asyncio
import logging
import time
from collections import Counter
from typing import NamedTuple

from contract.rating import (
    RATING_TAG,
    STEPS,
    RatingInput,
    Stats,
    build_rating_prompt,
    expected_rating,
    lean_rating,
    parse_rating,
    rating_answer_budget,
    rating_input,
    rating_pattern,
    served_rating,
)
from contract.tasks import Task
from server import metrics
from server.config import Settings
from server.engine import Engine, EngineError, GenerationRequest
from server.errors import ApiError
from server.schemas import Item, RatedItem, RateRequest, RateResponse, Reasoning, Source
from server.store import RatingContext, Store

log = logging.getLogger(__name__)
RATING_LOGPROBS = 8  # the five ratings and a margin; the grammar leaves only the five


def not_trained_to_rate(version: str) -> ApiError:
    return ApiError(
        409,
        "task_unsupported",
        f"the active model {version} was not trained to rate; bootstrap one with "
        "`reasonrec bootstrap --task rate` (or --task rank --task rate) and activate it",
    )


def unknown_items(request: RateRequest, missing: set[str]) -> ApiError:
    details = [
        {
            "loc": ["body", "item_ids", i],
            "message": f"unknown item '{item}'",
            "type": "unknown_item",
        }
        for i, item in enumerate(request.item_ids)
        if item in missing
    ]
    return ApiError(422, "validation_error", "the request names unknown items", details)


def baseline(context: RatingContext, item_id: str) -> float:
    return lean_rating(context.everyone, context.items.get(item_id, Stats()), context.lean)


class Answer(NamedTuple):
    """One item's rating, and why the fallback gave it (None: the model did)."""

    item: RatedItem
    fallback: str | None = None
    error: str | None = None


class Rater:
    def __init__(self, store: Store, settings: Settings):
        self.store, self.settings = store, settings

    async def rate(
        self, request: RateRequest, request_id: str, engine: Engine | None
    ) -> RateResponse:
        started = time.perf_counter()
        if engine is not None and Task.rate not in engine.contract.tasks:
            raise not_trained_to_rate(engine.model_version)
        found = await self.store.get_items(request.item_ids)
        items = {item_id: item for item_id, item in found.items() if not item.hidden}
        if missing := set(request.item_ids) - set(items):  # a deleted item is gone for clients
            raise unknown_items(request, missing)
        history = engine.contract.history if engine else 0
        context = await self.store.rating_context(request.user_id, request.item_ids, history)
        recent = await self.store.get_items([item for item, _ in context.recent])
        shown = [(recent[i], value) for i, value in context.recent if i in recent]
        answers = await asyncio.gather(
            *(
                self._rate_one(context, shown, items[item_id], request, request_id, engine)
                for item_id in request.item_ids
            )
        )
        rated = [answer.item for answer in answers]
        _log_fallbacks(answers)
        degraded = any(item.source is Source.fallback for item in rated)
        # Counted together, after the last await: a request its client left counts in neither.
        for answer in answers:
            if answer.fallback is not None:
                metrics.RATE_FALLBACKS.labels(answer.fallback).inc()
            version = engine.model_version if engine else ""
            metrics.RATINGS.labels(answer.item.source.value, version).inc()
        return RateResponse(
            request_id=request_id,
            user_id=request.user_id,
            model_version=engine.model_version if engine else None,
            items=rated,
            source=Source.fallback if degraded else Source.llm,
            degraded=degraded,
            latency_ms=round((time.perf_counter() - started) * 1000, 2),
        )

    async def _rate_one(
        self,
        context: RatingContext,
        shown: list[tuple[Item, float]],
        item: Item,
        request: RateRequest,
        request_id: str,
        engine: Engine | None,
    ) -> Answer:
        item_id = item.item_id
        if engine is None:
            return self._fallback(context, item_id, "no_model")
        user = Stats.of(sum(context.ratings.values()), len(context.ratings))
        data: RatingInput = rating_input(
            context.profile,
            shown,
            user,
            item,
            context.items.get(item_id, Stats()),
            len(shown),
            context.lean,
        )
        generation = GenerationRequest(
            request_id=f"{request_id}:{item_id}",
            prompt=build_rating_prompt(data, engine.contract.rendering),
            regex=rating_pattern(engine.contract.rendering),
            max_tokens=max(
                self.settings.max_answer_tokens, rating_answer_budget(engine.contract.rendering)
            ),
            logprobs=RATING_LOGPROBS,
        )
        try:
            with metrics.engine_timer(Task.rate):
                result = await asyncio.wait_for(
                    engine.generate(generation), self.settings.llm_timeout_ms / 1000
                )
        except TimeoutError:
            return self._fallback(context, item_id, "timeout")
        except EngineError as exc:
            return self._fallback(context, item_id, "engine_error", str(exc))
        metrics.ENGINE_TOKENS.labels("prompt").inc(result.prompt_tokens)
        metrics.ENGINE_TOKENS.labels("completion").inc(result.completion_tokens)
        answer = parse_rating(result.text)
        rating = expected_rating(result.after(RATING_TAG)) or answer.rating
        if rating is None:
            metrics.PARSE_FAILURES.labels(Task.rate).inc()
            return self._fallback(context, item_id, "malformed")
        rating = served_rating(rating, baseline(context, item_id), engine.contract.rating_weight)
        explained = request.explain and answer.well_formed
        return Answer(
            RatedItem(
                item_id=item_id,
                rating=round(rating, 3),
                source=Source.llm,
                reasoning=Reasoning(**dict(zip(STEPS, answer.steps, strict=True)))
                if explained
                else None,
            )
        )

    def _fallback(
        self, context: RatingContext, item_id: str, reason: str, error: str | None = None
    ) -> Answer:
        rating = round(baseline(context, item_id), 3)
        return Answer(
            RatedItem(item_id=item_id, rating=rating, source=Source.fallback), reason, error
        )


def _log_fallbacks(answers: list[Answer]) -> None:
    """One line for a request whose items the engine failed on (not one per item: a request
    rates up to 50), with how many for each reason and the first engine error."""
    reasons = Counter(a.fallback for a in answers if a.fallback not in (None, "no_model"))
    if reasons:
        error = next((a.error for a in answers if a.error), None)
        log.warning(
            "items rated by the fallback",
            extra={"reasons": dict(reasons), "items": len(answers), "error": error},
        )
