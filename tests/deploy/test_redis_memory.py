"""The deployments' Redis memory cap: at the cap, what the gateway writes on every request goes on
being written, and the oldest feedback attribution keys (which expire) make room. A real
redis-server with the deployments' policy. That keys without an expiry are never evicted is the
policy's definition (volatile-lru), pinned by the first test: eviction samples keys, so no test of
a few thousand can tell it from allkeys-lru for certain."""

import asyncio
import time
from pathlib import Path

import redis
import yaml

from contract.impression import Impression
from server.config import Settings
from server.store import open_store
from tests.conftest import RedisProcess
from tests.deploy.helpers import COMPOSE_GPU, K8S, compose_config

CAP_BYTES = 2 * 1024 * 1024  # above what the server holds empty


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def _k8s_redis() -> dict:
    [redis_set] = [
        doc
        for doc in yaml.safe_load_all((K8S / "base/redis.yaml").read_text())
        if doc["kind"] == "StatefulSet"
    ]
    [container] = redis_set["spec"]["template"]["spec"]["containers"]
    return container


def _bytes(size: str) -> int:
    units = {"gb": 1024**3, "mb": 1024**2, "Gi": 1024**3, "Mi": 1024**2}
    for unit, factor in units.items():
        if size.endswith(unit):
            return int(size.removesuffix(unit)) * factor
    return int(size)


def test_both_deployments_cap_redis_below_its_memory_limit_and_evict_only_expiring_keys() -> None:
    k8s = _k8s_redis()
    compose = compose_config(COMPOSE_GPU)["services"]["redis"]["command"]
    for args in (k8s["args"], compose):
        assert _flag(args, "--maxmemory-policy") == "volatile-lru"
    assert _flag(k8s["args"], "--maxmemory") == _flag(compose, "--maxmemory")
    # An append-only rewrite forks: the copy's pages count against the container's limit too.
    limit = _bytes(k8s["resources"]["limits"]["memory"])
    assert _bytes(_flag(k8s["args"], "--maxmemory")) <= 0.75 * limit


def _impression(n: int) -> Impression:
    return Impression(
        request_id=f"r{n:06d}",
        user_id=f"u{n % 50}",
        model_version="v1",
        ts=1_700_000_000.0 + n,
        source="llm",
        items=["i1"],
        candidates=["i1", "i2"],
        prompt="p",
        output="",
    )


async def _serve(settings: Settings, lists: range) -> None:
    async with open_store(settings) as store:
        if lists.start == 0:
            await store.set_active_model("v1")
        for n in lists:
            # No stream cap, a week's attribution: only the memory cap bounds what is written.
            await store.log_impression(_impression(n), None, 7 * 24 * 3600)


async def _read(settings: Settings, earlier: range, later: range) -> dict[str, object]:
    async with open_store(settings) as store:
        before = await store.served_by([f"r{n:06d}" for n in earlier])
        after = await store.served_by([f"r{n:06d}" for n in later])
        return {
            "active": await store.active_model(),
            "impressions": await store.redis.xlen(store.keys.impressions),
            "earlier forgotten": sum(v is None for v in before) / len(before) > 0.1,
            "later kept": all(v is not None and v.version == "v1" for v in after),
        }


def test_at_the_cap_attribution_makes_room_and_serving_goes_on(
    redis_process: RedisProcess, tmp_path: Path
) -> None:
    policy = _flag(_k8s_redis()["args"], "--maxmemory-policy")
    client = redis.Redis.from_url(redis_process.url)
    client.config_set("maxmemory", client.info("memory")["used_memory"] + CAP_BYTES)
    client.config_set("maxmemory-policy", policy)
    settings = Settings(redis_url=redis_process.url, data_dir=tmp_path, key_prefix="cap")
    # A list costs a stream entry (~90 bytes, as small as one gets) and an attribution key
    # (~150): the earlier lists fill 90% of the cap, the later ones go past it. Redis's LRU
    # clock ticks each second: the wait tells the earlier keys from the later ones.
    earlier, later = range(7_500), range(7_500, 10_500)
    asyncio.run(_serve(settings, earlier))
    time.sleep(2.5)
    asyncio.run(_serve(settings, later))
    assert client.info("stats")["evicted_keys"] > 0
    # Lifted to look: reading touches keys, and replies take memory, both of which evict.
    client.config_set("maxmemory", 0)
    client.close()
    assert asyncio.run(_read(settings, earlier, later)) == {
        "active": "v1",
        "impressions": 10_500,
        "earlier forgotten": True,
        "later kept": True,
    }
