"""Recommendation benchmark: POST /v1/recommend against a running server, then the same prompts
sent straight to the engine, to show what the gateway adds (context, candidates, prompt, parse,
impression log) on top of the LLM.

    reasonrec serve &                      # or reasonrec demo
    .venv/bin/python bench/recommend.py [--url http://127.0.0.1:8000] [--requests 64]

Reads users and the logged prompts from the same Redis as the server (REASONREC_* settings).
The engine side is the server's kind: REASONREC_ENGINE_URL when set, else an in-process vLLM on
the active model (started after the gateway runs, so the two never compete for the CPU), asked
exactly what the gateway asks it (`server.recommend.ranking_request`).
Prints JSON: throughput and p50/p99 latency at concurrency 1 and 16 for both, and their ratios.
"""

import argparse
import asyncio
import json
import os
import uuid
from functools import partial

import httpx
import numpy as np
from _load import LEVELS, load, positive, require_gateway  # bench/ is the script's folder

from server.active_model import open_engine
from server.config import Settings, environment_settings
from server.engine import Engine
from server.interrupts import sigterm_as_ctrl_c
from server.recommend import answer_choices, ranking_request
from server.store import open_store

K = 10


async def _gateway(
    url: str, warm_up: str, users: dict[int, list[str]], key: str | None
) -> tuple[dict, dict[int, list[str]]]:
    """The figures per level, and each level's request ids."""
    headers = {"X-API-Key": key} if key else {}
    request_ids: dict[int, list[str]] = {level: [] for level in users}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:

        async def call(user: str, level: int | None = None) -> None:
            response = await client.post("/v1/recommend", json={"user_id": user, "k": K})
            response.raise_for_status()
            body = response.json()
            if body["source"] != "llm":
                raise RuntimeError(f"the gateway answered in fallback: {body}")
            if level is not None:  # not the warm-up
                request_ids[level].append(body["request_id"])

        await call(warm_up)
        results = {
            f"c{c}": await load(partial(call, level=c), level_users, c)
            for c, level_users in users.items()
        }
    return results, request_ids


async def _logged_prompts(
    settings: Settings, request_ids: list[str]
) -> tuple[list[tuple[str, list]], str | None]:
    wanted = set(request_ids)
    async with open_store(settings) as store:
        entries = await store.redis.xrevrange(store.keys.impressions, count=len(wanted) * 4)
        version = await store.active_model()
    found = [
        (fields["prompt"], json.loads(fields["candidates"]))
        for _, fields in entries
        if fields["request_id"] in wanted
    ]
    return found, version


async def _engine(
    engine: Engine, prompts: dict[int, list[tuple[str, list]]], max_tokens: int
) -> dict:
    async def call(job: tuple[str, list]) -> None:
        prompt, candidates = job
        choices = answer_choices(engine, candidates)
        request = ranking_request(engine, uuid.uuid4().hex, prompt, choices, K, max_tokens)
        await engine.generate(request)

    await call(prompts[LEVELS[0]][0])  # warm-up: a prompt the first level then sends cached
    return {f"c{c}": await load(call, level_prompts, c) for c, level_prompts in prompts.items()}


async def _users(settings: Settings, count: int) -> list[str]:
    async with open_store(settings) as store:
        users = sorted(await store.redis.smembers(store.keys.users))
    if not users:
        raise SystemExit("the store has no users: load data first (reasonrec load / demo)")
    rng = np.random.default_rng(0)
    return [users[i] for i in rng.choice(len(users), size=count, replace=len(users) < count)]


async def main(url: str, requests: int) -> dict:
    settings = environment_settings()  # a misspelled REASONREC_* variable: said, not ignored
    require_gateway(url)
    # Other users at each level: vLLM caches prompt prefixes, and one user's prompt is the same
    # at both levels (the second level measured cached prefills).
    drawn = await _users(settings, 1 + requests * len(LEVELS))
    users = {c: drawn[1 + n * requests : 1 + (n + 1) * requests] for n, c in enumerate(LEVELS)}
    key = settings.api_keys[0] if settings.api_keys else None
    gateway, request_ids = await _gateway(url, drawn[0], users, key)
    # Each level's prompts, replayed at that level.
    prompts, version = {}, None
    for level, ids in request_ids.items():
        prompts[level], version = await _logged_prompts(settings, ids)
        if not prompts[level]:
            raise SystemExit(
                "the gateway's lists are not in this store's impression log: run the benchmark "
                "with the gateway's REASONREC_* settings (REASONREC_KEY_PREFIX, ...)"
            )
    engine = open_engine(settings, version)
    try:
        direct = await _engine(engine, prompts, settings.max_answer_tokens)
    finally:
        await engine.close()
    ratios = {
        level: {
            "p50": round(gateway[level]["p50_ms"] / direct[level]["p50_ms"], 3),
            "throughput": round(
                gateway[level]["throughput_rps"] / direct[level]["throughput_rps"], 3
            ),
        }
        for level in gateway
    }
    return {
        "benchmark": "recommend",
        "model_version": version,
        "engine": "remote" if settings.engine_url else "in-process",
        "gateway": gateway,
        "engine_direct": direct,
        "gateway_over_engine": ratios,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the running gateway")
    parser.add_argument(
        "--requests", type=positive, default=64, help="requests per concurrency level"
    )
    args = parser.parse_args()
    # SIGTERM (a CI job cancelled) as Ctrl-C: the engine it started is shut down.
    sigterm_as_ctrl_c()
    # vLLM logs on stdout by default (read when it is first imported): keep stdout for the JSON.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    print(json.dumps(asyncio.run(main(args.url, args.requests)), indent=2))
