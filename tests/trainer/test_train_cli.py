"""`reasonrec train --once`: JSON summary and exit status when there is nothing to train, and the
lock that keeps two refreshes apart (real Redis; the full refresh is in tests/integration)."""

import asyncio
import errno
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis
import typer
from peft import get_peft_model
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeout
from safetensors import SafetensorError
from typer.testing import CliRunner

from cli import app
from server.config import Settings
from server.durable import weights_written
from server.logs import JsonFormatter
from server.registry import Manifest, Registry, RegistryError
from server.schemas import ItemUpsert
from server.store import Store, open_store, skip_unreadable
from tests.conftest import RedisProcess
from tests.trainer.gguf_files import tiny_model
from trainer import metrics, sidecar
from trainer import refresh as refresh_module
from trainer.cli import EXIT_BUSY, EXIT_SKIPPED, EXIT_TERMINATED, run_stoppable
from trainer.feedback_log import ConsumeResult
from trainer.gate import Gate, refresh_gate
from trainer.grpo import STATE_FILE, Stopped, lora_config
from trainer.presets import GrpoSettings
from trainer.rating import RatingExample, RatingExamples
from trainer.refresh import (
    REFRESH_METHOD,
    Lessons,
    RefreshBusy,
    RefreshOutcome,
    RefreshResult,
    Training,
    _shortage,
    read_training,
    refresh_lock,
    refresh_once,
)
from trainer.sidecar import last_refresh


def test_without_an_active_model_the_refresh_is_skipped(env: Settings) -> None:
    result = CliRunner().invoke(app, ["train", "--once"])
    assert result.exit_code == EXIT_SKIPPED, result.output
    summary = json.loads(result.stdout)
    assert summary["outcome"] == "skipped" and summary["reason"] == "no active model"


def test_a_refresh_ends_with_one_line_that_says_why(
    env: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    async def once() -> RefreshResult:
        async with open_store(env) as store:
            return await refresh_once(env, store, progress=False)

    with caplog.at_level("INFO", logger="trainer"):
        result = asyncio.run(once())

    [line] = [r for r in caplog.records if r.getMessage() == "refresh finished"]
    assert (line.outcome, line.reason, line.parent) == ("skipped", "no active model", None)
    assert line.seconds == result.seconds and line.version is None


def test_the_lines_of_a_refresh_carry_its_id(
    env: Settings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines: list[dict] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:  # formatted in the refresh's context
            lines.append(json.loads(JsonFormatter().format(record)))

    async def twice() -> None:
        async with open_store(env) as store:
            for _ in range(2):
                await refresh_once(env, store, progress=False)
        logging.getLogger("trainer").info("between refreshes")

    handler, logger = Collect(), logging.getLogger("trainer")
    logger.addHandler(handler)
    try:
        with caplog.at_level("INFO", logger="trainer"):
            asyncio.run(twice())
    finally:
        logger.removeHandler(handler)
    ids = [line.get("refresh_id") for line in lines if line["msg"] == "refresh finished"]
    assert len(ids) == 2 and all(ids) and ids[0] != ids[1]
    assert "refresh_id" not in lines[-1] and lines[-1]["msg"] == "between refreshes"

    async def broken(*_: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(refresh_module, "_refresh", broken)
    logger.addHandler(handler)
    try:
        with caplog.at_level("INFO", logger="trainer"), pytest.raises(RuntimeError):
            asyncio.run(twice())
    finally:
        logger.removeHandler(handler)
    [failed] = [line for line in lines if line["msg"] == "refresh failed"]
    assert failed["refresh_id"] not in ids and "disk on fire" in failed["exc"]


@pytest.mark.parametrize(
    ("error", "traceback"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), False),
        (OSError(errno.EROFS, "Read-only file system"), False),
        (FileNotFoundError(errno.ENOENT, "No such file or directory"), True),  # a bug, likely
        (TimeoutError(), True),
    ],
)
def test_a_refresh_that_failed_for_the_machine_logs_no_traceback(
    env: Settings,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    error: OSError,
    traceback: bool,
) -> None:
    """Every OSError was logged without its traceback, a missing file and a timeout too."""

    async def failing(*_: object) -> None:
        raise error

    async def once() -> None:
        async with open_store(env) as store:
            await refresh_once(env, store, progress=False)

    monkeypatch.setattr(refresh_module, "_refresh", failing)
    with caplog.at_level("INFO", logger="trainer"), pytest.raises(type(error)):
        asyncio.run(once())

    [failed] = [r for r in caplog.records if r.getMessage() == "refresh failed"]
    assert bool(failed.exc_info) is traceback, failed.reason


def test_once_is_required(env: Settings) -> None:
    assert CliRunner().invoke(app, ["train"]).exit_code == 2


def test_a_held_lock_refuses_a_second_refresh(env: Settings, rdb: redis.Redis) -> None:
    async def try_inside() -> None:
        async with open_store(env) as store, refresh_lock(store):
            with pytest.raises(RefreshBusy):
                async with refresh_lock(store):
                    pass

    asyncio.run(try_inside())
    assert rdb.get(f"{env.key_prefix}:trainer:lock") is None  # released on the way out
    rdb.set(f"{env.key_prefix}:trainer:lock", "another-refresh")
    assert CliRunner().invoke(app, ["train", "--once"]).exit_code == EXIT_BUSY


@pytest.mark.parametrize(
    ("zero_spread", "learned"), [([1.0, 1.0, 1.0], False), ([1.0, 0.5, 1.0], True)]
)
def test_a_run_learned_only_if_some_group_had_a_reward_spread(
    tmp_path, zero_spread: list[float], learned: bool
) -> None:
    history = [
        {"reward": 1.0 + i, "frac_reward_zero_std": share} for i, share in enumerate(zero_spread)
    ]
    (tmp_path / STATE_FILE).write_text(json.dumps({"log_history": [*history, {"loss": 0.1}]}))
    training = read_training(tmp_path)
    assert training.learned is learned
    assert training.reward_mean == 2.0


def test_a_restarted_sidecar_reports_the_newest_published_refresh(tmp_path) -> None:
    registry = Registry(tmp_path / "models")
    assert last_refresh(registry) is None
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    versions = [
        ("base", {"method": "sft+grpo"}, t0),
        ("r1", {"method": REFRESH_METHOD}, t0 + timedelta(hours=1)),
        ("r2", {"method": REFRESH_METHOD}, t0 + timedelta(hours=2)),
        ("registered", {}, t0 + timedelta(hours=3)),
    ]
    for version, training, created_at in versions:
        manifest = Manifest(version=version, training=training, created_at=created_at)
        registry.publish(registry.staging(), manifest)
    assert last_refresh(registry) == (t0 + timedelta(hours=2)).timestamp()


def test_the_sidecar_outlives_redis_going_away_between_polls(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = iter([RedisTimeout("away"), RedisTimeout("away"), 0, 0])
    polls: list[int] = []

    async def event_count(self: Store) -> int:
        polls.append(1)
        answer = next(answers, None)
        if answer is None:
            raise asyncio.CancelledError  # enough polls: stop the sidecar
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(Store, "event_count", event_count)
    monkeypatch.setattr(sidecar, "POLL_SECONDS", 0.01)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(sidecar.run_sidecar(env.model_copy(update={"trainer_metrics_port": 0})))
    assert len(polls) == 5  # the start and every poll after, Redis's two timeouts included


def _publish_refresh(settings: Settings, version: str, at: datetime | None = None) -> None:
    """A refresh published into the registry, as another process (`train --once`) does."""
    registry = Registry(settings.registry_path)
    created = {"created_at": at} if at else {}
    manifest = Manifest(version=version, training={"method": REFRESH_METHOD}, **created)
    registry.publish(registry.staging(), manifest)


def _sidecar_while_a_refresh_is_published(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, published: datetime, polls: list[int]
) -> float | None:
    """Run the sidecar while another process publishes a refresh at its first poll; it stops at
    the fourth. The staleness gauge it serves after."""

    async def event_count(self: Store) -> int:
        polls.append(1)
        if len(polls) == 1:
            _publish_refresh(settings, "r1", published)
        if len(polls) == 4:
            raise asyncio.CancelledError
        return 0

    monkeypatch.setattr(Store, "event_count", event_count)
    monkeypatch.setattr(sidecar, "POLL_SECONDS", 0.01)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(sidecar.run_sidecar(settings.model_copy(update={"trainer_metrics_port": 0})))
    return metrics.REGISTRY.get_sample_value("reasonrec_trainer_last_success_timestamp")


def test_the_sidecar_reports_refreshes_another_process_published(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The nightly `train --once` job publishes into the registry the sidecar serves the
    staleness gauge for."""
    published = datetime(2026, 3, 1, tzinfo=UTC)
    assert _sidecar_while_a_refresh_is_published(env, monkeypatch, published, []) == (
        published.timestamp()
    )


def test_a_registry_that_cannot_be_read_at_one_poll_does_not_end_the_sidecar(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shared volume's hiccup (a stale NFS handle) at one poll: read again at the next."""
    published = datetime(2026, 4, 1, tzinfo=UTC)
    polls: list[int] = []
    versions = Registry.versions

    def stale(self: Registry) -> list[Manifest]:
        if len(polls) == 1:
            raise OSError(116, "Stale file handle")
        return versions(self)

    monkeypatch.setattr(Registry, "versions", stale)
    gauge = _sidecar_while_a_refresh_is_published(env, monkeypatch, published, polls)
    assert len(polls) == 4  # it went on polling
    assert gauge == published.timestamp()  # read at the poll after the failed one


def test_sigterm_stops_a_command_as_ctrl_c_does() -> None:
    """`docker stop` sends SIGTERM: the main task is cancelled (a refresh then stops training
    and gives its lock back) and the command exits 143."""
    cancelled = threading.Event()

    async def main() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            # A second SIGTERM would kill at once: the handler is gone.
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
            cancelled.set()
            raise

    with pytest.raises(typer.Exit) as stopped:
        run_stoppable(main())
    assert stopped.value.exit_code == EXIT_TERMINATED == 143
    assert cancelled.is_set()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # nothing left installed


def test_a_cancellation_that_is_no_sigterm_is_not_reported_as_one() -> None:
    async def main() -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        run_stoppable(main())


def test_the_trainer_serves_the_records_it_skipped() -> None:
    def skipped() -> float:
        found = metrics.REGISTRY.get_sample_value(
            "reasonrec_unreadable_records_total", {"kind": "event"}
        )
        return found or 0.0

    before = skipped()
    skip_unreadable("event", "e1", ValueError("time nan"))
    assert skipped() == before + 1


@pytest.mark.parametrize(
    ("tasks", "rated", "reason"),
    [
        (["rank", "rate"], None, None),  # rating refresh off: the ranking part still trains
        (
            ["rate"],
            None,
            "rating refresh is off (REASONREC_REFRESH_RATING_EXAMPLES=0), nothing to train",
        ),
        (["search"], None, "refresh trains ranking and rating; this version does neither"),
        (["rank"], None, None),
        (["rank", "rate"], 3, "3 users with 2+ ratings to learn rating from, 4 needed"),
        (["rank", "rate"], 4, None),
    ],
)
def test_what_a_refresh_needs_follows_what_it_refreshes(
    tasks: list[str], rated: int | None, reason: str | None
) -> None:
    example = RatingExample(user_id="u", prompt="p", rating=4, baseline=3.5, target="t")
    rating = None
    if rated is not None:
        rating = RatingExamples(rendering="compact", train=[], validation=[example] * rated)
    assert _shortage(Manifest(version="v", tasks=tasks), 50, rating, min_lists=50) == reason


def test_a_refresh_with_too_few_logged_lists_for_the_gate_is_skipped(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four lists were enough: the gate then decided on one held-out list, by chance."""
    passed = refresh_gate({"ndcg@10": 0.3}, {"ndcg@10": 0.3, "retrieval_ndcg@10": 0.2}, env)
    few = env.model_copy(update={"refresh_min_lists": 7})  # six lists are logged

    result, published, active = _refresh_trained(few, monkeypatch, passed)

    assert result.outcome == "skipped" and published == [] and active == "v1"
    assert result.reason == (
        "6 logged lists with a positive and a rich prompt, 7 needed (REASONREC_REFRESH_MIN_LISTS)"
    )


@pytest.fixture
def lock_key(env: Settings, monkeypatch: pytest.MonkeyPatch) -> str:
    """The refresh lock's key; the lock is renewed every 20 ms."""
    monkeypatch.setattr(refresh_module, "RENEW_SECONDS", 0.02)
    return f"{env.key_prefix}:trainer:lock"


def test_the_lock_is_renewed_through_a_redis_error(
    env: Settings, rdb: redis.Redis, lock_key: str
) -> None:
    async def body() -> None:
        async with open_store(env) as store:
            script, calls = store._renew, []

            async def flaky(**kwargs: Any) -> Any:
                calls.append(1)
                if len(calls) == 1:
                    raise RedisConnectionError("away for a moment")
                return await script(**kwargs)

            store._renew = flaky
            async with refresh_lock(store) as lock:
                rdb.expire(lock_key, 5)  # so that a renewal shows: back to LOCK_SECONDS
                await asyncio.sleep(0.3)
                assert len(calls) >= 3  # renewal went on after the error
                assert rdb.ttl(lock_key) > 5 and lock.lost is None

    asyncio.run(body())


def test_a_lock_taken_over_is_lost(env: Settings, rdb: redis.Redis, lock_key: str) -> None:
    async def body() -> None:
        async with open_store(env) as store, refresh_lock(store) as lock:
            rdb.set(lock_key, "another-refresh")  # it lapsed and another refresh took it
            await asyncio.sleep(0.2)
            assert lock.lost == "it lapsed, or another refresh took it"

    asyncio.run(body())
    assert rdb.get(lock_key) == "another-refresh"  # not released: it is not ours


def test_a_renewal_under_way_ends_before_the_lock_is_released(
    env: Settings, rdb: redis.Redis, lock_key: str
) -> None:
    """The renewal is not cancelled in the middle of a Redis call: the release runs after it."""
    calls: list[str] = []

    async def body() -> None:
        async with open_store(env) as store:
            renew = store.renew_trainer_lock

            async def slow_renew(token: str, seconds: int) -> bool:
                calls.append("renewing")
                await asyncio.sleep(0.3)
                calls.append("renewed")
                return await renew(token, seconds)

            store.renew_trainer_lock = slow_renew
            async with refresh_lock(store):
                await asyncio.sleep(0.05)  # renewed every 20 ms: one is under way
            calls.append("released")

    asyncio.run(body())
    assert calls[:3] == ["renewing", "renewed", "released"]
    assert rdb.get(lock_key) is None


def test_a_lock_redis_could_not_renew_for_its_lifetime_is_lost(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(refresh_module, "RENEW_SECONDS", 0.02)
    monkeypatch.setattr(refresh_module, "LOCK_SECONDS", 1)

    async def body() -> None:
        async with open_store(env) as store:

            async def away(**_: Any) -> Any:
                raise RedisTimeout("away")

            store._renew = away
            async with refresh_lock(store) as lock:
                await asyncio.sleep(0.2)
                assert lock.lost is None  # errors for less than the lock lives: still held
                await asyncio.sleep(1.0)
                assert lock.lost == "not renewed for 1 s"

    asyncio.run(body())


async def _ready_to_refresh(settings: Settings, store: Store) -> None:
    """An active version that ranks, and six logged lists with a click each."""
    registry = Registry(settings.registry_path)
    registry.publish(registry.staging(), Manifest(version="v1"))
    await store.set_active_model("v1")
    for n in range(6):
        impression = {
            "request_id": f"r{n}",
            "user_id": f"u{n}",
            "model_version": "v1",
            "ts": f"{1700000000 + n}.0",
            "items": json.dumps(["a", "b"]),
            "candidates": json.dumps(["a", "b", "c"]),
            "prompt": f"prompt {n}",
        }
        await store.redis.xadd(store.keys.impressions, impression)
        click = {"user_id": f"u{n}", "item_id": "a", "type": "click", "ts": "1"}
        await store.redis.xadd(store.keys.events, click | {"request_id": f"r{n}"})


def _refresh_trained(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    gate: Gate,
    meanwhile: Any = None,
    force: bool = False,
    while_publishing: Any = None,
    candidate: Any = None,
) -> tuple[RefreshResult, list[str], str | None]:
    """A refresh whose training answers `candidate` and `gate` after calling `meanwhile` (and
    whose publishing calls `while_publishing`); the result, what it published, and the active
    version after it."""
    published: list[str] = []

    def train_and_gate(*_: Any) -> tuple:
        if meanwhile is not None:
            meanwhile()
        return candidate, None, Training(reward_mean=0.5, learned=True), gate

    def publish(registry: Registry, model: Any, tokenizer: Any, manifest: Manifest) -> None:
        if while_publishing is not None:
            while_publishing()
        published.append(manifest.version)

    monkeypatch.setattr(refresh_module, "_train_and_gate", train_and_gate)
    monkeypatch.setattr(refresh_module, "publish_model", publish)

    async def body() -> tuple[RefreshResult, str | None]:
        async with open_store(settings) as store:
            await _ready_to_refresh(settings, store)
            result = await refresh_once(settings, store, progress=False, force=force)
            return result, await store.active_model()

    result, active = asyncio.run(body())
    return result, published, active


def test_a_registry_that_cannot_be_written_fails_the_refresh_before_it_trains(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It trained for minutes, every period, to fail at publishing."""
    trained: list[bool] = []
    monkeypatch.setattr(refresh_module, "_train_and_gate", lambda *_: trained.append(True))

    def read_only(registry: Registry) -> Path:
        raise RegistryError(f"cannot write to the model registry {registry.root}: read-only")

    async def body() -> None:
        async with open_store(env) as store:
            await _ready_to_refresh(env, store)
            monkeypatch.setattr(Registry, "staging", read_only)
            await refresh_once(env, store, progress=False)

    with pytest.raises(RegistryError, match="cannot write to the model registry"):
        asyncio.run(body())
    assert trained == []


def test_a_cancelled_refresh_stops_its_training(
    env: Settings, rdb: redis.Redis, lock_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C: `asyncio.run` waits for the training thread before the process exits, so the
    thread is told to stop instead of running all its GRPO steps, and the lock is held until it
    has stopped: no other refresh trains beside it."""
    started, stopped = threading.Event(), threading.Event()
    held_to_the_end: list[bool] = []

    def train_and_gate(registry, manifest, lessons, grpo, settings, force, stop) -> tuple:
        started.set()
        if stop.wait(30):
            stopped.set()
        time.sleep(0.5)  # the rest of the GRPO step
        held_to_the_end.append(rdb.get(lock_key) is not None)
        raise Stopped("stopped")

    monkeypatch.setattr(refresh_module, "_train_and_gate", train_and_gate)

    async def body() -> None:
        async with open_store(env) as store:
            await _ready_to_refresh(env, store)
            refreshing = asyncio.create_task(refresh_once(env, store, progress=False))
            assert await asyncio.to_thread(started.wait, 30)
            refreshing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await refreshing

    asyncio.run(body())

    assert stopped.is_set() and held_to_the_end == [True]
    assert rdb.get(lock_key) is None


class _Model:
    def to(self, device: object) -> "_Model":
        return self


def test_a_stop_while_the_gate_scores_skips_the_candidate(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate answers every held-out list with both models, minutes on a CPU: a stop asked
    during the first is not held until the second is done too."""
    registry = Registry(env.registry_path)
    registry.publish(registry.staging(), Manifest(version="v1"))
    stop, scored = threading.Event(), []

    def scores(model, *_: Any) -> dict[str, float]:
        scored.append(model)
        stop.set()  # SIGTERM arrives while the active model answers
        return {"ndcg@10": 0.1}

    monkeypatch.setattr(refresh_module.AutoTokenizer, "from_pretrained", lambda path: None)
    monkeypatch.setattr(refresh_module, "load_version", lambda *a, **k: _Model())
    monkeypatch.setattr(refresh_module, "refreshed_with_lora", lambda *a: False)
    learned = Training(reward_mean=0.5, learned=True)
    monkeypatch.setattr(refresh_module, "_train", lambda model, *a: (model, learned))
    monkeypatch.setattr(refresh_module, "_scores", scores)
    grpo = GrpoSettings(max_steps=1)

    with pytest.raises(Stopped, match="at the gate"):
        refresh_module._train_and_gate(
            registry, registry.manifest("v1"), None, grpo, env, stop=stop
        )
    assert len(scored) == 1


def _lessons_of_a_refresh(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    tasks: list[str],
    titles: dict[str, str],
    event: dict[str, str],
) -> Lessons:
    """What a refresh of an active version trained for `tasks` trains and gates on, with one
    user's `event` on each of the `titles`' items (a second apart)."""
    given: list[Lessons] = []

    def train_and_gate(registry, manifest, lessons: Lessons, *_: Any) -> tuple:
        given.append(lessons)
        return None, None, Training(reward_mean=0.5, learned=False), None

    monkeypatch.setattr(refresh_module, "_train_and_gate", train_and_gate)

    async def body() -> None:
        async with open_store(settings) as store:
            await _ready_to_refresh(settings, store)
            registry = Registry(settings.registry_path)
            registry.publish(registry.staging(), Manifest(version="v2", tasks=tasks))
            await store.set_active_model("v2")
            await store.upsert_items([ItemUpsert(item_id=i, title=t) for i, t in titles.items()])
            for n, item in enumerate(titles):
                fields = event | {"item_id": item, "ts": str(1700000000 + n)}
                await store.redis.xadd(store.keys.events, fields)
            await refresh_once(settings, store, progress=False)

    asyncio.run(body())
    [lessons] = given
    return lessons


def test_a_refresh_that_does_not_train_rating_still_gates_it(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REASONREC_REFRESH_RATING_EXAMPLES=0 on a version that ranks and rates: ranking's GRPO
    changes the weights that rate too, and the gate saw no rating."""
    unrefreshed = env.model_copy(update={"refresh_rating_examples": 0})
    rating = {"user_id": "r", "type": "rating", "value": "4"}
    titles = {i: i for i in "abc"}
    lessons = _lessons_of_a_refresh(unrefreshed, monkeypatch, ["rank", "rate"], titles, rating)

    assert lessons.rating is not None and lessons.rating.train == []
    assert [example.user_id for example in lessons.rating.validation] == ["r"]
    assert lessons.rating_terms == []


def test_a_refresh_of_a_version_that_searches_gates_its_queries(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    titles = {"a": "Alien", "b": "Brazil", "c": "Casablanca", "d": "Dune"}
    click = {"user_id": "s", "type": "click"}
    lessons = _lessons_of_a_refresh(env, monkeypatch, ["rank", "search"], titles, click)

    assert lessons.search is not None and lessons.search.train == []
    assert [(e.user_id, e.item_id) for e in lessons.search.validation] == [("s", "d")]
    assert lessons.retriever is not None
    assert lessons.retriever.rank_of("dune", "d", []) == 1  # the catalog's retriever


def test_no_retriever_is_built_with_no_search_to_gate(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One interaction: no history to write a query from. The dense retriever would embed the
    whole catalog for nothing."""
    built: list[object] = []
    monkeypatch.setattr(refresh_module, "catalog_retriever", lambda *a: built.append(a))
    click = {"user_id": "s", "type": "click"}
    lessons = _lessons_of_a_refresh(env, monkeypatch, ["rank", "search"], {"a": "Alien"}, click)

    assert lessons.search is not None and lessons.search.validation == []
    assert lessons.retriever is None and built == []


def _lock_taken_over(
    env: Settings, rdb: redis.Redis, lock_key: str
) -> tuple[Gate, Callable[[], None]]:
    """A gate that passes, and another refresh taking the lock (renewed every 20 ms: this one
    sees it gone within the half second it waits)."""

    def take() -> None:
        rdb.set(lock_key, "another-refresh")
        time.sleep(0.5)

    return _passed(env), take


def _passed(env: Settings) -> Gate:
    return refresh_gate(
        {"ndcg@10": 0.1, "invalid_rate": 0.0},
        {"ndcg@10": 0.2, "retrieval_ndcg@10": 0.1, "invalid_rate": 0.0},
        env,
    )


def test_a_refresh_that_lost_its_lock_publishes_nothing(
    env: Settings, rdb: redis.Redis, lock_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    passed, take = _lock_taken_over(env, rdb, lock_key)
    result, published, active = _refresh_trained(env, monkeypatch, passed, take)  # while training

    assert result.outcome == "skipped"
    assert result.reason == (
        "lost the refresh lock: it lapsed, or another refresh took it; nothing published"
    )
    assert published == [] and active == "v1"
    assert rdb.get(lock_key) == "another-refresh"


def test_a_refresh_that_lost_its_lock_while_publishing_activates_nothing(
    env: Settings, rdb: redis.Redis, lock_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Publishing runs off the event loop, so the lock is renewed (and its loss seen) meanwhile."""
    passed, take = _lock_taken_over(env, rdb, lock_key)
    result, published, active = _refresh_trained(env, monkeypatch, passed, while_publishing=take)

    assert result.outcome == "published" and published == [result.version] and active == "v1"
    assert result.reason == (
        "gate passed; not activated: lost the refresh lock while publishing: "
        "it lapsed, or another refresh took it"
    )


def test_an_adapter_whose_base_was_pruned_while_it_trained_is_not_published(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Activations moved on while it trained, and a prune removed the version it adapts: it
    would have been published, and refused by every gateway."""
    adapter = get_peft_model(tiny_model(vocab_size=32), lora_config(2))
    pruned = partial(shutil.rmtree, Registry(env.registry_path).path("v1"))
    result, published, active = _refresh_trained(
        env, monkeypatch, _passed(env), pruned, candidate=adapter
    )

    assert result.outcome == "skipped" and published == [] and active == "v1"
    assert result.reason.endswith("nothing published: its base v1 was pruned while it trained")


def test_a_refresh_whose_activation_found_redis_gone_says_it_published(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It said "refresh failed", naming no version, while the version sat in the registry."""

    async def redis_gone(*_: Any, **__: Any) -> None:
        raise RedisConnectionError("Error 111 connecting to redis:6379")

    def as_it_activates() -> None:
        monkeypatch.setattr(Store, "set_active_model", redis_gone)

    result, published, active = _refresh_trained(
        env, monkeypatch, _passed(env), while_publishing=as_it_activates
    )
    assert result.outcome == "published" and published == [result.version] and active == "v1"
    assert result.reason.startswith("gate passed; not activated: Redis failed: ConnectionError")


def test_a_refresh_stopped_while_it_publishes_names_the_version_it_left(
    env: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM as the weights were saved: the version was written, not activated, and no line
    named it."""
    publishing = threading.Event()

    def train_and_gate(*_: Any) -> tuple:
        return None, None, Training(reward_mean=0.5, learned=True), _passed(env)

    def publish(registry: Registry, model: Any, tokenizer: Any, manifest: Manifest) -> None:
        publishing.set()
        time.sleep(0.3)  # saving the weights; the stop comes meanwhile
        registry.publish(registry.staging(), manifest)

    monkeypatch.setattr(refresh_module, "_train_and_gate", train_and_gate)
    monkeypatch.setattr(refresh_module, "publish_model", publish)

    async def body() -> str | None:
        async with open_store(env) as store:
            await _ready_to_refresh(env, store)
            refreshing = asyncio.create_task(refresh_once(env, store, progress=False))
            assert await asyncio.to_thread(publishing.wait, 30)
            refreshing.cancel()  # as `reasonrec trainer` does on SIGTERM
            with pytest.raises(asyncio.CancelledError):
                await refreshing
            return await store.active_model()

    with caplog.at_level("INFO", logger="trainer"):
        active = asyncio.run(body())
    said = {r.getMessage(): r for r in caplog.records}
    left = said["refresh stopped: published, not activated"]
    assert Registry(env.registry_path).has(left.version) and active == "v1"
    assert "refresh stopped" in said


def test_no_prune_runs_while_a_refresh_publishes(
    env: Settings, rdb: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until the version is in place a prune does not see it, and could remove its base."""
    lock = f"{env.key_prefix}:model:prune-lock"
    held: list[int] = []
    result, published, _ = _refresh_trained(
        env, monkeypatch, _passed(env), while_publishing=lambda: held.append(rdb.exists(lock))
    )
    assert result.outcome == "published" and published == [result.version] and held == [1]
    assert not rdb.exists(lock)


def test_a_rejected_refresh_says_what_failed(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    worse = refresh_gate(  # worse than both; --force passes it only past the retrieval order
        {"ndcg@10": 0.3, "invalid_rate": 0.0},
        {"ndcg@10": 0.2, "retrieval_ndcg@10": 0.25, "invalid_rate": 0.0},
        env,
        force=True,
    )

    result, published, active = _refresh_trained(env, monkeypatch, worse, force=True)

    assert result.outcome == "rejected" and published == [] and active == "v1"
    assert result.reason == (
        "gate failed: the candidate ranks worse than the active version "
        "(NDCG@10 0.2000 against 0.3000, tolerance 0.01)"
    )
    assert result.gate is not None and not result.gate.forced


@pytest.mark.parametrize(("hours_ago", "refreshed_at"), [(3.0, [2]), (0.5, [])])
def test_a_restarted_sidecar_keeps_the_schedule_of_the_last_refresh(
    env: Settings, monkeypatch: pytest.MonkeyPatch, hours_ago: float, refreshed_at: list[int]
) -> None:
    """Restarted more often than REASONREC_REFRESH_SECONDS, it still refreshes on schedule."""
    _publish_refresh(env, "r1", datetime.now(UTC) - timedelta(hours=hours_ago))
    polls: list[int] = []
    ran: list[int] = []

    async def event_count(self: Store) -> int:
        polls.append(1)
        if len(polls) == 4:
            raise asyncio.CancelledError  # enough polls: stop the sidecar
        return 0

    async def refresh_once(*_: Any, **__: Any) -> RefreshResult:
        ran.append(len(polls))
        raise RefreshBusy("not this time")

    monkeypatch.setattr(Store, "event_count", event_count)
    monkeypatch.setattr(sidecar, "refresh_once", refresh_once)
    monkeypatch.setattr(sidecar, "POLL_SECONDS", 0.01)
    hourly = env.model_copy(update={"trainer_metrics_port": 0, "refresh_seconds": 3600})
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(sidecar.run_sidecar(hourly))
    # Overdue: at the first poll after the start's count (the stream's length, poll 1).
    assert ran == refreshed_at


def test_a_message_with_brackets_is_printed_as_it_is(env: Settings) -> None:
    """Rich read "[smollm2]" in an install hint as markup and dropped it."""
    result = CliRunner().invoke(app, ["models", "activate", "v[smollm2]"])
    assert result.exit_code == 1
    assert "v[smollm2]" in result.output


def test_an_adapter_whose_base_is_gone_is_not_activated(env: Settings, rdb: redis.Redis) -> None:
    """Every gateway would refuse it and go on serving the version before, while the pointer
    named it."""
    registry = Registry(env.registry_path)
    registry.publish(registry.staging(), Manifest(version="v-orphan", kind="lora", base_model="v0"))

    result = CliRunner().invoke(app, ["models", "activate", "v-orphan"])

    assert result.exit_code == 1
    assert "LoRA version v-orphan adapts v0, which is not in the registry" in result.output
    assert rdb.get(f"{env.key_prefix}:model:active") is None


def test_a_version_without_weights_is_not_activated(env: Settings, rdb: redis.Redis) -> None:
    """Its manifest alone (weights removed by hand, a copy cut short): activated, every gateway
    then failed to open it."""
    registry = Registry(env.registry_path)
    registry.publish(registry.staging(), Manifest(version="v-bare"))

    result = CliRunner().invoke(app, ["models", "activate", "v-bare"])

    assert result.exit_code == 1
    said = " ".join(result.output.split())
    assert "model version v-bare cannot be served: no config.json" in said
    assert rdb.get(f"{env.key_prefix}:model:active") is None


def test_an_active_version_missing_from_the_registry_is_one_line(
    env: Settings, rdb: redis.Redis
) -> None:
    """A registry emptied under a Redis that outlived it: an error (exit status 1), said once."""
    rdb.set(f"{env.key_prefix}:model:active", "v-gone")

    result = CliRunner().invoke(app, ["train", "--once"])

    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not a traceback
    assert "model version 'v-gone' is not in the registry" in " ".join(result.output.split())


def test_a_full_disk_ends_a_refresh_with_its_reason_not_a_traceback(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GRPO writes the KL reference to disk (`trainer.grpo`); safetensors reports a full disk
    with an error of its own, no OSError, and `train --once` printed a traceback, as did the
    sidecar's "refresh failed" line."""

    def full_disk(*_: object) -> None:
        with weights_written(Path("/tmp/reference")):
            raise SafetensorError("I/O error: No space left on device (os error 28)")

    async def ready() -> None:
        async with open_store(env) as store:
            await _ready_to_refresh(env, store)

    asyncio.run(ready())
    monkeypatch.setattr(refresh_module, "_train_and_gate", full_disk)

    result = CliRunner().invoke(app, ["train", "--once"])

    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    [failed] = [
        json.loads(line) for line in result.output.splitlines() if '"refresh failed"' in line
    ]
    assert "No space left on device" in failed["reason"] and "exc" not in failed
    said = [line for line in result.output.splitlines() if not line.startswith("{")]
    assert "weights not written to /tmp/reference" in " ".join(said)


def _sidecar_refreshing(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    events: Callable[[int], int],
    refresh: Callable[[int], RefreshOutcome],
    min_events: int = 100,
) -> list[tuple[int, float]]:
    """When an hourly sidecar refreshed, over 40 polls (0.8 s at least): the poll (numbered from
    1) and the monotonic time; the stream holds `events(poll)` events, and `refresh(run)` is the
    refresh (numbered from 1)."""
    polls: list[int] = []
    ran: list[tuple[int, float]] = []

    async def event_count(self: Store) -> int:
        polls.append(1)
        if len(polls) == 40:
            raise asyncio.CancelledError
        await asyncio.sleep(0.01)
        return events(len(polls))

    async def refresh_once(*_: Any, **__: Any) -> RefreshResult:
        ran.append((len(polls), time.monotonic()))
        outcome = refresh(len(ran))
        return RefreshResult(outcome=outcome, reason="", parent=None, consumed=ConsumeResult())

    monkeypatch.setattr(Store, "event_count", event_count)
    monkeypatch.setattr(sidecar, "refresh_once", refresh_once)
    monkeypatch.setattr(sidecar, "POLL_SECONDS", 0.01)
    monkeypatch.setattr(sidecar, "LOCK_SECONDS", 0.1)
    monkeypatch.setattr(sidecar, "FAILED_RETRY_SECONDS", 0.1)
    update = {"trainer_metrics_port": 0, "refresh_seconds": 3600, "refresh_min_events": min_events}
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(sidecar.run_sidecar(settings.model_copy(update=update)))
    return ran


def _sidecar_finding_the_lock_held(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    meanwhile: Callable[[], None],
    burst: int = 0,
) -> list[float]:
    """An hourly sidecar whose refreshes find the lock held (a trainer killed mid-refresh, or one
    running); `meanwhile` runs after the first such refresh, and `burst` events arrive after the
    start. When it tried to refresh (monotonic; the lock lapses in 0.1 s)."""

    def refresh(run: int) -> RefreshOutcome:
        if run == 1:
            meanwhile()
        raise RefreshBusy("the lock is held")

    def events(poll: int) -> int:
        return 0 if poll == 1 else burst

    ran = _sidecar_refreshing(settings, monkeypatch, events, refresh, min_events=1000)
    return [at for _, at in ran]


def test_a_refresh_that_found_the_lock_held_is_tried_again_once_it_lapses(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trainer killed mid-refresh and restarted found its own lock and waited an hour."""
    ran = _sidecar_finding_the_lock_held(env, monkeypatch, lambda: None)
    gaps = [later - earlier for earlier, later in itertools.pairwise(ran)]
    assert gaps and min(gaps) >= 0.1  # tried again, once the lock may have lapsed each time


@pytest.mark.parametrize("burst", [0, 5000], ids=["due by time", "due by events"])
def test_a_refresh_another_process_published_meanwhile_restarts_the_schedule(
    env: Settings, monkeypatch: pytest.MonkeyPatch, burst: int
) -> None:
    """Not a refresh again right after `train --once`, on what it trained on."""
    if burst:
        _publish_refresh(env, "r0")  # not due by time: due by the events only
    ran = _sidecar_finding_the_lock_held(
        env, monkeypatch, lambda: _publish_refresh(env, "r1"), burst
    )
    assert len(ran) == 1


def test_a_failed_refresh_is_tried_again_before_the_next_period(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis gone as it published: the feedback it consumed waited a whole period (an hour)."""
    _publish_refresh(env, "r0")  # the period runs from now: due by the events only

    def refresh(run: int) -> RefreshOutcome:
        if run == 1:
            raise RedisConnectionError("Error 111 connecting to redis:6379")
        return "skipped"

    ran = _sidecar_refreshing(env, monkeypatch, lambda poll: 0 if poll == 1 else 150, refresh)
    assert len(ran) == 2 and ran[1][1] - ran[0][1] >= 0.1, ran  # not at once


def test_events_that_came_while_the_sidecar_published_count_towards_the_next(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its own publication reset the count of new events as another process's does: the 400
    that came as it trained waited for the next period."""
    _publish_refresh(env, "r0")
    arrived: list[int] = []

    def refresh(run: int) -> RefreshOutcome:
        arrived.append(run)  # 400 more as it trains
        if run == 1:
            _publish_refresh(env, "r1")
        return "published"

    ran = _sidecar_refreshing(
        env, monkeypatch, lambda poll: 0 if poll == 1 else (550 if arrived else 150), refresh
    )
    assert len(ran) == 2, ran


def test_events_another_process_trained_on_while_the_sidecar_refreshed_count_no_more(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`train --once` published as the sidecar's refresh ran and published nothing: it trained on
    the 400 events that came meanwhile, which are not new to the next refresh."""
    _publish_refresh(env, "r0")
    arrived: list[int] = []

    def refresh(run: int) -> RefreshOutcome:
        arrived.append(run)
        if run == 1:
            _publish_refresh(env, "r1")  # the other process
        return "skipped"

    ran = _sidecar_refreshing(
        env, monkeypatch, lambda poll: 0 if poll == 1 else (550 if arrived else 150), refresh
    )
    assert len(ran) == 1, ran


def test_the_sidecar_reports_redis_memory_against_its_cap(
    redis_process: RedisProcess, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_process.url)
    client.config_set("maxmemory", 300_000_000)
    used = client.info("memory")["used_memory"]
    client.close()
    settings = Settings(redis_url=redis_process.url, data_dir=tmp_path, redis_timeout_seconds=0.5)

    async def report() -> None:
        async with open_store(settings) as store:
            await sidecar.report_memory(store)

    def gauge(name: str) -> float | None:
        return metrics.REGISTRY.get_sample_value(f"reasonrec_trainer_redis_{name}_bytes")

    asyncio.run(report())
    assert gauge("max") == 300_000_000
    assert used / 2 < gauge("used") < used * 2  # type: ignore[operator]
    redis_process.stop()
    asyncio.run(report())  # Redis gone: the last reading stays, nothing raises
    assert gauge("max") == 300_000_000


def test_models_list_says_when_the_active_version_is_not_in_the_registry(env: Settings) -> None:
    async def activate() -> None:
        async with open_store(env) as store:
            await store.set_active_model("v20250101-000000-abcdef")  # a registry emptied since

    asyncio.run(activate())
    result = CliRunner().invoke(app, ["models", "list"])
    said = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "the active version v20250101-000000-abcdef is not in the registry" in said


def test_register_and_activate_without_redis_copies_nothing(
    env: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REASONREC_REDIS_URL", "redis://127.0.0.1:1/0")  # nothing listens there
    monkeypatch.setenv("REASONREC_REDIS_TIMEOUT_SECONDS", "0.5")
    monkeypatch.setenv("REASONREC_REGISTRY_DIR", str(tmp_path / "registry"))
    source = tmp_path / "model"
    source.mkdir()
    (source / "config.json").write_text("{}")

    result = CliRunner().invoke(app, ["models", "register", str(source), "--activate"])

    assert isinstance(result.exception, RedisConnectionError), result.output
    assert not any((tmp_path / "registry").glob("v*"))


def test_a_taken_metrics_port_is_named_with_its_setting(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("REASONREC_TRAINER_METRICS_PORT", str(port))
        result = CliRunner().invoke(app, ["trainer"])
    assert isinstance(result.exception, OSError), result.output
    assert f"metrics port {port} (REASONREC_TRAINER_METRICS_PORT)" in str(result.exception)


def test_a_stream_made_again_restarts_the_count_of_new_events(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleted and made again, the stream counts from 1: new events up to the old count did not
    count, and a busy hour went without the refresh its events asked for."""
    _publish_refresh(env, "r0")  # not due by time
    counts = iter([5000, 10, 10, 500, 1010, 1010])
    ran: list[int] = []

    async def event_count(self: Store) -> int:
        await asyncio.sleep(0.01)
        try:
            return next(counts)
        except StopIteration:
            raise asyncio.CancelledError from None

    async def refresh_once(*_: Any, **__: Any) -> RefreshResult:
        ran.append(1)
        raise RefreshBusy("counted")

    monkeypatch.setattr(Store, "event_count", event_count)
    monkeypatch.setattr(sidecar, "refresh_once", refresh_once)
    monkeypatch.setattr(sidecar, "POLL_SECONDS", 0.01)
    update = {"trainer_metrics_port": 0, "refresh_seconds": 3600, "refresh_min_events": 1000}
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(sidecar.run_sidecar(env.model_copy(update=update)))
    assert ran == [1]  # at 1010: 1,000 events after the stream was made again
