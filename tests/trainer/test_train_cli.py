"""`reasonrec train --once`: JSON summary and exit status when there is nothing to train, and the
lock that keeps two refreshes apart (real Redis; the full refresh is in tests/integration)."""

import asyncio
import json

import pytest
import redis
from typer.testing import CliRunner

from server.app import open_store
from server.config import Settings
from trainer.cli import EXIT_BUSY, EXIT_SKIPPED, app
from trainer.refresh import RefreshBusy, refresh_lock


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
