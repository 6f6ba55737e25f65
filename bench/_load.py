"""Closed-loop load for the HTTP benchmarks: N workers, each sending its next job when the last
one is answered; latency percentiles and throughput per concurrency level."""

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx
import numpy as np

LEVELS = (1, 16)


def positive(text: str) -> int:
    """An argparse type: a count of at least 1 (0 broke the percentiles, or meant "all")."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def require_gateway(url: str) -> None:
    """End the benchmark with a line, not a traceback, when no gateway answers at `url` (before
    any work: the search benchmark builds its retriever first)."""
    try:
        httpx.get(f"{url}/healthz", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        raise SystemExit(
            f"no gateway answers at {url} ({exc!r}): start one (reasonrec serve or demo)"
        ) from exc


def _summary(latencies: list[float], elapsed: float, concurrency: int) -> dict[str, float]:
    ms = np.array(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "throughput_rps": round(len(latencies) / elapsed, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
    }


async def load(
    call: Callable[[Any], Awaitable[None]], jobs: Sequence[Any], concurrency: int
) -> dict[str, float]:
    latencies: list[float] = []
    queue = iter(jobs)

    async def worker() -> None:
        for job in queue:
            start = time.perf_counter()
            await call(job)
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return _summary(latencies, time.perf_counter() - started, concurrency)
