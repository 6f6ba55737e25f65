"""Search benchmark: POST /v1/search against a running server, then the same queries sent straight
to the retriever in this process, to show what the gateway adds (seen items, item reads, filters,
policy) on top of retrieval.

    reasonrec serve &                      # or reasonrec demo
    .venv/bin/python bench/search.py [--url http://127.0.0.1:8000] [--requests 64]

Queries are the titles of items drawn from the store's catalog, each sent with a user drawn from
the store (REASONREC_* settings, as the server's). The retriever is REASONREC_SEARCH_RETRIEVER's.
Prints JSON: throughput and p50/p99 latency at concurrency 1 and 16 for both, and how much the
gateway adds to the retriever's p50.
"""

import argparse
import asyncio
import json

import httpx
import numpy as np
from _load import LEVELS, load, positive, require_gateway  # bench/ is the script's folder

from contract.candidates import OVERFETCH
from server.config import Settings, environment_settings
from server.search_index import SearchIndexes
from server.store import open_store

K = 10


async def _jobs(settings: Settings, count: int) -> tuple[list[tuple[str, str]], SearchIndexes]:
    """(query, user) pairs, and the retriever built from the same catalog."""
    indexes = SearchIndexes(settings.search_retriever)
    async with open_store(settings) as store:
        users = sorted(await store.user_ids())
        items = await store.get_items(await store.item_ids())
        await indexes.refresh(store)
    if not users or not items:
        raise SystemExit("the store has no users or items: load data first (reasonrec load / demo)")
    rng = np.random.default_rng(0)
    titles = [item.title for _, item in sorted(items.items())]
    queries = [titles[i] for i in rng.choice(len(titles), size=count)]
    searchers = [users[i] for i in rng.choice(len(users), size=count)]
    return list(zip(queries, searchers, strict=True)), indexes


async def _gateway(url: str, jobs: list[tuple[str, str]], key: str | None) -> dict:
    headers = {"X-API-Key": key} if key else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:

        async def call(job: tuple[str, str]) -> None:
            query, user = job
            body = {"query": query, "user_id": user, "k": K}
            (await client.post("/v1/search", json=body)).raise_for_status()

        await call(jobs[0])  # warm-up
        return {f"c{c}": await load(call, jobs, c) for c in LEVELS}


def _same_retriever(url: str, key: str | None, ours: str) -> None:
    """Refuse a gateway on another retriever than this process would build (before it builds
    it): its p50 was compared with the other one's and labelled with this one's name."""
    headers = {"X-API-Key": key} if key else {}
    body = {"query": "benchmark", "k": 1}
    response = httpx.post(f"{url}/v1/search", json=body, headers=headers, timeout=60)
    response.raise_for_status()
    if (theirs := response.json()["retriever"]) != ours:
        raise SystemExit(
            f"the gateway searches with {theirs}, this benchmark with {ours}: set "
            f"REASONREC_SEARCH_RETRIEVER={theirs} for it, as for the gateway"
        )


async def _retriever(indexes: SearchIndexes, jobs: list[tuple[str, str]]) -> dict:
    index = indexes.current

    async def call(job: tuple[str, str]) -> None:
        index.search(job[0], K * OVERFETCH)

    return {f"c{c}": await load(call, jobs, c) for c in LEVELS}


async def main(url: str, requests: int) -> dict:
    settings = environment_settings()  # a misspelled REASONREC_* variable: said, not ignored
    require_gateway(url)
    key = settings.api_keys[0] if settings.api_keys else None
    _same_retriever(url, key, settings.search_retriever.value)
    jobs, indexes = await _jobs(settings, requests)
    gateway = await _gateway(url, jobs, key)
    direct = await _retriever(indexes, jobs)
    return {
        "benchmark": "search",
        "retriever": settings.search_retriever.value,
        "items": len(indexes.current.item_ids),
        "gateway": gateway,
        "retriever_direct": direct,
        "gateway_p50_minus_retriever_ms": {
            level: round(gateway[level]["p50_ms"] - direct[level]["p50_ms"], 2) for level in gateway
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the running gateway")
    parser.add_argument(
        "--requests", type=positive, default=64, help="requests per concurrency level"
    )
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.url, args.requests)), indent=2))
