"""Feedback ingestion benchmark: throughput and p50/p99 latency of POST /v1/feedback.

Starts the gateway (`uvicorn server.asgi:app --workers N`) on loopback against a Redis
(REASONREC_REDIS_URL, else the local 127.0.0.1:6379 when it answers, else an embedded one) under
a key prefix of its own, sends single-event batches at concurrency 1 and 16, prints JSON, and
removes its keys.

The load comes from wrk when it is installed (apt-get install wrk): a Python client on the same
two cores costs more CPU per request than the server and would measure itself. Without wrk, an
httpx client is used and the report says so.

    .venv/bin/python bench/feedback.py [--seconds 5] [--requests 3000] [--workers 2]

Target: p50 under 2 ms at concurrency 16.
"""

import argparse
import asyncio
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import redis
from _load import positive  # bench/ is the script's folder

from server.interrupts import sigterm_as_ctrl_c

LOCAL_REDIS = "redis://127.0.0.1:6379/0"


def _redis_url() -> str | None:
    url = os.environ.get("REASONREC_REDIS_URL", LOCAL_REDIS)
    try:
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
        return url
    except redis.RedisError:
        return None


def _start_server(
    port: int, prefix: str, redis_url: str | None, workers: int, data_dir: str
) -> subprocess.Popen:
    # Its own server on loopback: API keys of the environment would refuse the load's requests.
    env = {k: v for k, v in os.environ.items() if k != "REASONREC_API_KEYS"}
    env |= {"REASONREC_KEY_PREFIX": prefix, "REASONREC_LOG_LEVEL": "warning"}
    env["REASONREC_DATA_DIR"] = data_dir
    if redis_url:
        env["REASONREC_REDIS_URL"] = redis_url
    else:  # one set but not answering must not reach the server either
        env.pop("REASONREC_REDIS_URL", None)
    command = [sys.executable, "-m", "uvicorn", "server.asgi:app", "--port", str(port)]
    command += ["--workers", str(workers), "--log-level", "warning", "--no-access-log"]
    return subprocess.Popen(command, env=env, cwd=Path(__file__).resolve().parents[1])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _check_free(port: int) -> None:
    """Refuse a port that something answers on: the load went to that server (another gateway,
    whose store it wrote to and never cleaned), and its own server's failure went unseen."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise SystemExit(f"port {port} is in use: choose another with --port, or leave it out")


async def _wait_ready(client: httpx.AsyncClient, server: subprocess.Popen) -> None:
    for _ in range(300):
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}) before it was ready")
        try:
            if (await client.get("/readyz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit("the server did not become ready in 30 s")


async def _run(client: httpx.AsyncClient, concurrency: int, requests: int) -> dict[str, float]:
    latencies: list[float] = []
    counter = iter(range(requests))

    async def worker(w: int) -> None:
        for n in counter:
            event = {"user_id": f"bench-{w}", "item_id": "bench-item", "type": "click"}
            event["event_id"] = f"{concurrency}-{n}"
            start = time.perf_counter()
            response = await client.post("/v1/feedback", json={"events": [event]})
            latencies.append(time.perf_counter() - start)
            response.raise_for_status()

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": requests,
        "throughput_rps": round(requests / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
    }


WRK_SCRIPT = r"""
counter = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  counter = counter + 1
  local body = string.format(
    '{"events":[{"user_id":"bench-%d","item_id":"bench-item","type":"click","event_id":"RUN-%d"}]}',
    counter % 16, counter)
  return wrk.format(nil, nil, nil, body)
end
done = function(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'WRK {"requests": %d, "seconds": %f, "p50_us": %d, "p99_us": %d, "errors": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50), latency:percentile(99),
    errors.status + errors.connect + errors.read + errors.write + errors.timeout))
end
"""


def _wrk(port: int, concurrency: int, seconds: int) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(WRK_SCRIPT.replace("RUN", uuid.uuid4().hex[:8]))
        script.flush()
        url = f"http://127.0.0.1:{port}/v1/feedback"
        command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "-s", script.name, url]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    stats = json.loads(output.split("WRK ", 1)[1])
    if stats["errors"]:
        raise RuntimeError(f"{stats['errors']} requests failed:\n{output}")
    return {
        "concurrency": concurrency,
        "requests": stats["requests"],
        "throughput_rps": round(stats["requests"] / stats["seconds"], 1),
        "p50_ms": stats["p50_us"] / 1000,
        "p99_ms": stats["p99_us"] / 1000,
    }


async def bench(
    port: int, server: subprocess.Popen, requests: int, seconds: int
) -> tuple[str, list[dict[str, float]]]:
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits) as client:
        await _wait_ready(client, server)
        item = {"title": "Benchmark item", "categories": ["bench"]}
        (await client.put("/v1/items/bench-item", json=item)).raise_for_status()
        await _run(client, 4, 200)  # warm-up: connections, code paths
        if shutil.which("wrk"):
            return "wrk", [_wrk(port, c, seconds) for c in (1, 16)]
        return "httpx", [await _run(client, c, requests) for c in (1, 16)]


def _remove_keys(client: redis.Redis, prefix: str) -> None:
    # In batches: one round trip per key took minutes after a long run.
    keys = client.scan_iter(match=f"{prefix}:*", count=1000)
    while batch := list(itertools.islice(keys, 1000)):
        client.unlink(*batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=positive, default=5, help="wrk: seconds per level")
    parser.add_argument("--requests", type=positive, default=3000, help="httpx: per level")
    parser.add_argument("--workers", type=positive, default=2, help="uvicorn worker processes")
    parser.add_argument("--port", type=positive, help="the server's port (default: a free one)")
    args = parser.parse_args()
    if args.port:
        _check_free(args.port)
    port = args.port or _free_port()
    # SIGTERM (a CI job cancelled) as Ctrl-C: the server stopped, the keys removed.
    sigterm_as_ctrl_c()
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    redis_url = _redis_url()
    data_dir = tempfile.mkdtemp(prefix="reasonrec-bench-")  # the embedded Redis's file, if any
    server = _start_server(port, prefix, redis_url, args.workers, data_dir)
    try:
        load_client, results = asyncio.run(bench(port, server, args.requests, args.seconds))
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(data_dir, ignore_errors=True)
        if redis_url:
            _remove_keys(redis.Redis.from_url(redis_url), prefix)
    report = {
        "benchmark": "feedback_ingestion",
        "batch_size": 1,
        "workers": args.workers,
        "load_client": load_client,
        "redis": "external" if redis_url else "embedded",
        "cpus": os.cpu_count(),
        "results": results,
        "target": {"concurrency": 16, "p50_ms_below": 2.0},
        "target_met": results[1]["p50_ms"] < 2.0,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
