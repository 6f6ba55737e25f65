"""`reasonrec train --once`: JSON summary and exit status when there is nothing to train, and the
lock that keeps two refreshes apart (real Redis; the full refresh is in tests/integration)."""

import asyncio
import json
from datetime import UTC, datetime, timedelta

import pytest
import redis
from redis.exceptions import TimeoutError as RedisTimeout
from typer.testing import CliRunner

from cli import app
from server.config import Settings
from server.registry import Manifest, Registry
from server.store import Store, open_store, skip_unreadable
from trainer import metrics, sidecar
from trainer.cli import EXIT_BUSY, EXIT_SKIPPED
from trainer.grpo import STATE_FILE
from trainer.rating import RatingExample, RatingExamples
from trainer.refresh import REFRESH_METHOD, RefreshBusy, _shortage, read_training, refresh_lock
from trainer.sidecar import last_refresh


def test_without_an_active_model_the_refresh_is_skipped(env: Settings) -> None:
    result = CliRunner().invoke(app, ["train", "--once"])
    assert result.exit_code == EXIT_SKIPPED, result.output
    summary = json.loads(result.stdout)
    assert summary["outcome"] == "skipped" and summary["reason"] == "no active model"


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


def test_the_sidecar_reports_refreshes_another_process_published(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The nightly `train --once` job publishes into the registry the sidecar serves the
    staleness gauge for."""
    registry = Registry(env.registry_path)
    published = datetime(2026, 3, 1, tzinfo=UTC)
    polls: list[int] = []

    async def event_count(self: Store) -> int:
        polls.append(1)
        if len(polls) == 1:  # the job publishes while the sidecar runs
            manifest = Manifest(
                version="r1", training={"method": REFRESH_METHOD}, created_at=published
            )
            registry.publish(registry.staging(), manifest)
        if len(polls) == 3:
            raise asyncio.CancelledError
        return 0

    monkeypatch.setattr(Store, "event_count", event_count)
    monkeypatch.setattr(sidecar, "POLL_SECONDS", 0.01)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(sidecar.run_sidecar(env.model_copy(update={"trainer_metrics_port": 0})))
    gauge = metrics.REGISTRY.get_sample_value("reasonrec_trainer_last_success_timestamp")
    assert gauge == published.timestamp()


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
    assert _shortage(Manifest(version="v", tasks=tasks), 50, rating) == reason
