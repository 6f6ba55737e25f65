"""The serving pipeline as an evaluation system: the same candidates, prompt, engine and repair
the API uses, on a store that holds the training split (and, after training, the validation
interactions, which come before the test item in time).

Nothing in the request path serves evaluation: the items EVAL.md excludes (training and
validation) are the user's seen items in that store, and answers that needed repair are read
from the gateway's own metric, as an operator would read them.
"""

import asyncio
import uuid
from collections.abc import Sequence

from prometheus_client import REGISTRY

from server.engine import Engine
from server.item_index import ItemIndex
from server.recommend import Recommender
from server.schemas import RecommendRequest
from trainer.evaluation.split import Split

CONCURRENCY = 16


def _repairs() -> float:
    return REGISTRY.get_sample_value("reasonrec_parse_failures_total") or 0.0


class PipelineSystem:
    """`reasonrec` with an engine; `retrieval` without one (the candidate order, as served in
    fallback)."""

    def __init__(
        self,
        name: str,
        recommender: Recommender,
        engine: Engine | None,
        index: ItemIndex | None,
        runner: asyncio.Runner,
    ):
        self.name = name
        self.recommender, self.engine, self.index, self.runner = recommender, engine, index, runner
        self.latencies_ms: list[float] = []
        self.repairs = 0
        self._answers: dict[str, list[str]] = {}

    def fit(self, split: Split) -> None:
        """Nothing to fit: the model and the index were trained on this split beforehand."""

    def prepare(self, users: Sequence[str], k: int) -> None:
        before = _repairs()
        self.runner.run(self._answer_all(users, k))
        self.repairs += round(_repairs() - before)

    async def _answer_all(self, users: Sequence[str], k: int) -> None:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def answer(user: str) -> None:
            async with gate:
                response = await self.recommender.recommend(
                    RecommendRequest(user_id=user, k=k, explain=False),
                    uuid.uuid4().hex,
                    self.engine,
                    self.index,
                )
            self._answers[user] = [item.item_id for item in response.items]
            self.latencies_ms.append(response.latency_ms)

        await asyncio.gather(*(answer(user) for user in users))

    def recommend(self, user_id: str, k: int) -> list[str]:
        return self._answers[user_id][:k]
