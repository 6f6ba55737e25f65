"""The serving pipelines as evaluation systems: the same candidates, prompt, engine and repair
the API uses (`/v1/recommend`), or the same prompt, engine and retriever (`/v1/search` with no
query: what the user wants next), on a store that holds the training split (and, after training,
the validation interactions, which come before the test item in time).

Nothing in the request path serves evaluation: the items EVAL.md excludes (training and
validation) are the user's seen items in that store, and answers that needed repair are read
from the gateway's own metric, as an operator would read them.
"""

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence

from prometheus_client import REGISTRY

from contract.tasks import Task
from server.engine import Engine
from server.item_index import ItemIndex
from server.recommend import Recommender
from server.schemas import RecommendRequest, SearchRequest, Source
from server.search import Searcher
from trainer.evaluation.split import Split

CONCURRENCY = 16


def _repairs() -> float:
    """Answers repaired or refused as malformed so far, of every task (a system serves one)."""
    counts = (
        REGISTRY.get_sample_value("reasonrec_parse_failures_total", {"task": task}) for task in Task
    )
    return sum(count or 0.0 for count in counts)


Served = tuple[list[str], float, bool]
"""The ids served, best first, the response's latency in milliseconds, and whether the path fell
back (no engine, or the engine failed, timed out or could not serve the task)."""
Serve = Callable[[Engine | None, str, int], Awaitable[Served]]


class PipelineSystem:
    """A request path answering every user, CONCURRENCY requests at a time, with an engine it
    opens for that and closes after (`open_engine`; None: no model, the path's fallback), so
    that one engine at a time holds memory."""

    def __init__(
        self,
        name: str,
        serve: Serve,
        runner: asyncio.Runner,
        open_engine: Callable[[], Engine] | None = None,
    ):
        self.name, self.serve, self.runner, self.open_engine = name, serve, runner, open_engine
        self.latencies_ms: list[float] = []
        self.repairs = 0
        self.fallbacks = 0
        self._answers: dict[str, list[str]] = {}

    def fit(self, split: Split) -> None:
        """Nothing to fit: the model and the index were trained on this split beforehand."""

    def prepare(self, users: Sequence[str], k: int) -> None:
        before = _repairs()
        engine = self.open_engine() if self.open_engine else None
        try:
            self.runner.run(self._answer_all(engine, users, k))
        finally:
            if engine is not None:
                self.runner.run(engine.close())
        self.repairs += round(_repairs() - before)

    async def _answer_all(self, engine: Engine | None, users: Sequence[str], k: int) -> None:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def answer(user: str) -> None:
            async with gate:
                self._answers[user], latency, fell_back = await self.serve(engine, user, k)
            self.latencies_ms.append(latency)
            self.fallbacks += fell_back

        await asyncio.gather(*(answer(user) for user in users))

    def recommend(self, user_id: str, k: int) -> list[str]:
        return self._answers[user_id][:k]


def recommending(
    name: str,
    recommender: Recommender,
    index: ItemIndex | None,
    runner: asyncio.Runner,
    open_engine: Callable[[], Engine] | None = None,
) -> PipelineSystem:
    """`reasonrec` with an engine; `retrieval` without one (the candidate order, as served in
    fallback)."""

    async def serve(engine: Engine | None, user: str, k: int) -> Served:
        request = RecommendRequest(user_id=user, k=k, explain=False)
        response = await recommender.recommend(request, uuid.uuid4().hex, engine, index)
        ids = [item.item_id for item in response.items]
        return ids, response.latency_ms, response.source is Source.fallback

    return PipelineSystem(name, serve, runner, open_engine)


def searching(
    name: str,
    searcher: Searcher,
    runner: asyncio.Runner,
    open_engine: Callable[[], Engine] | None = None,
) -> PipelineSystem:
    """`/v1/search` with the user and no query: the model's query for what comes next (the last
    item's title without a model)."""

    async def serve(engine: Engine | None, user: str, k: int) -> Served:
        request = SearchRequest(user_id=user, k=k)
        response = await searcher.search(request, uuid.uuid4().hex, engine)
        ids = [item.item_id for item in response.items]
        return ids, response.latency_ms, response.source is Source.fallback

    return PipelineSystem(name, serve, runner, open_engine)
