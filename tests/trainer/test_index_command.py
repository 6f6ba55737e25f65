"""`reasonrec index`: rebuild the candidate index on demand from the store."""

import asyncio
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from server.config import Settings
from server.index_files import current_version, load_current
from server.schemas import ItemUpsert
from server.store import open_store
from trainer.bootstrap import current_index
from trainer.corpus import read_corpus


def test_index_rebuilds_from_the_store_and_becomes_current(env: Settings) -> None:
    runner = CliRunner()
    loaded = runner.invoke(app, ["load", "--format", "synthetic", "--users", "40", "--items", "80"])
    assert loaded.exit_code == 0, loaded.output
    first = runner.invoke(app, ["index", "--dim", "8"])
    assert first.exit_code == 0, first.output
    version = first.output.strip().splitlines()[-1]
    assert current_version(env.data_dir) == version
    index = load_current(env.data_dir)
    assert len(index) == 80 and index.dim <= 8
    # Built from interactions: a user's history retrieves other catalog items.
    assert index.search(["i00001"], n=5)
    second = runner.invoke(app, ["index", "--dim", "8"])
    assert current_version(env.data_dir) == second.output.strip().splitlines()[-1] != version


def test_a_bootstrap_that_cannot_train_fails_clearly_and_leaves_the_index_as_it_was(
    env: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    empty = runner.invoke(app, ["bootstrap", "--preset", "tiny"])
    assert empty.exit_code == 1 and "no training examples" in empty.output
    assert current_version(env.data_dir) is None  # no index of an empty store became current
    runner.invoke(app, ["load", "--format", "synthetic", "--users", "40", "--items", "80"])
    version = runner.invoke(app, ["index", "--dim", "8"]).output.strip().splitlines()[-1]
    policy = tmp_path / "policy.yaml"
    policy.write_text("weights:\n  novelty: lots\n")
    monkeypatch.setenv("REASONREC_POLICY_FILE", str(policy))

    refused = runner.invoke(app, ["bootstrap", "--preset", "tiny"])

    assert refused.exit_code == 1 and f"{policy}:2" in refused.output, refused.output
    assert current_version(env.data_dir) == version


def test_an_index_of_an_empty_store_is_refused_and_the_current_one_kept(env: Settings) -> None:
    """A wrong Redis URL or key prefix published an empty index over a good one."""
    runner = CliRunner()
    runner.invoke(app, ["load", "--format", "synthetic", "--users", "40", "--items", "80"])
    version = runner.invoke(app, ["index", "--dim", "8"]).output.strip().splitlines()[-1]
    elsewhere = {"REASONREC_KEY_PREFIX": f"{env.key_prefix}-elsewhere"}

    result = runner.invoke(app, ["index", "--dim", "8"], env=elsewhere)

    assert result.exit_code == 1 and "holds no items" in result.output
    assert "Traceback" not in result.output
    assert current_version(env.data_dir) == version


def test_a_refresh_rebuilds_the_index_only_when_its_inputs_changed(env: Settings) -> None:
    """Items added through the API reach the candidates with the next refresh (which reads the
    index through `current_index`), without anyone running `reasonrec index`."""
    runner = CliRunner()
    runner.invoke(app, ["load", "--format", "synthetic", "--users", "40", "--items", "80"])
    version = runner.invoke(app, ["index", "--dim", "8"]).output.strip().splitlines()[-1]

    async def current() -> str | None:
        async with open_store(env) as store:
            index = current_index(await read_corpus(store), env)
        return None if index is None else index.version

    assert asyncio.run(current()) == version  # nothing changed: the same index, not rebuilt

    async def add_item_and_click() -> None:
        async with open_store(env) as store:
            await store.upsert_items([ItemUpsert(item_id="new", title="Brand new")])
            await store.redis.xadd(
                store.keys.events, {"user_id": "u1", "item_id": "new", "type": "click"}
            )

    asyncio.run(add_item_and_click())
    rebuilt = asyncio.run(current())
    assert rebuilt != version and current_version(env.data_dir) == rebuilt
    index = load_current(env.data_dir)
    assert "new" in index.item_ids and index.dim <= 8
    assert asyncio.run(current()) == rebuilt


def test_no_index_is_built_by_a_refresh_where_none_was(env: Settings) -> None:
    CliRunner().invoke(app, ["load", "--format", "synthetic", "--users", "40", "--items", "80"])

    async def current() -> object:
        async with open_store(env) as store:
            return current_index(await read_corpus(store), env)

    assert asyncio.run(current()) is None and current_version(env.data_dir) is None
