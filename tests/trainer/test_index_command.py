"""`reasonrec index`: rebuild the candidate index on demand from the store."""

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from server.config import Settings
from server.index_files import current_version, load_current
from server.schemas import ItemUpsert
from server.store import Store, open_store
from trainer import bootstrap as bootstrap_module
from trainer.bootstrap import current_index
from trainer.corpus import Corpus, read_corpus
from trainer.refresh import RefreshResult, refresh_once


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
    """Items added through the API, and new interactions, reach the candidates with the next
    refresh (which reads the index through `current_index`), without `reasonrec index`."""
    runner = CliRunner()
    runner.invoke(app, ["load", "--format", "synthetic", "--users", "40", "--items", "80"])
    version = runner.invoke(app, ["index", "--dim", "8"]).output.strip().splitlines()[-1]
    built = load_current(env.data_dir)

    assert current(env) == version  # nothing changed: the same index, not rebuilt
    store_call(env, click("u00001", "i00002"))
    after_click = current(env)
    assert after_click != version and current_version(env.data_dir) == after_click
    store_call(env, lambda store: store.upsert_items([ItemUpsert(item_id="new", title="New")]))
    rebuilt = current(env)
    assert rebuilt != after_click and current_version(env.data_dir) == rebuilt
    index = load_current(env.data_dir)
    assert "new" in index.item_ids and index.dim == built.dim
    assert index.manifest["params"]["seed"] == built.manifest["params"]["seed"]
    assert current(env) == rebuilt


def test_an_index_published_meanwhile_is_not_replaced(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    runner.invoke(app, ["load", "--format", "synthetic", "--users", "40", "--items", "80"])
    runner.invoke(app, ["index", "--dim", "8"])
    store_call(env, click("u00001", "i00002"))
    theirs: list[str] = []
    build = bootstrap_module.build_index

    def while_building(*args: object, **kwargs: object) -> object:
        monkeypatch.setattr(bootstrap_module, "build_index", build)  # theirs builds as usual
        theirs.append(runner.invoke(app, ["index", "--dim", "4"]).output.strip().splitlines()[-1])
        return build(*args, **kwargs)

    monkeypatch.setattr(bootstrap_module, "build_index", while_building)
    assert current(env) == theirs[0] == current_version(env.data_dir)


def test_a_refresh_skipped_for_want_of_a_model_still_rebuilds_the_index(env: Settings) -> None:
    runner = CliRunner()
    runner.invoke(app, ["load", "--format", "synthetic", "--users", "40", "--items", "80"])
    version = runner.invoke(app, ["index", "--dim", "8"]).output.strip().splitlines()[-1]
    store_call(env, lambda store: store.upsert_items([ItemUpsert(item_id="new", title="New")]))

    async def refresh() -> RefreshResult:
        async with open_store(env) as store:
            return await refresh_once(env, store, progress=False)

    result = asyncio.run(refresh())
    assert (result.outcome, result.reason) == ("skipped", "no active model")
    assert current_version(env.data_dir) != version
    assert "new" in load_current(env.data_dir).item_ids


def test_no_index_is_built_by_a_refresh_where_none_was(env: Settings) -> None:
    CliRunner().invoke(app, ["load", "--format", "synthetic", "--users", "40", "--items", "80"])
    assert current(env) is None and current_version(env.data_dir) is None


def current(env: Settings) -> str | None:
    """The version `current_index` returns for the store's corpus."""

    async def read() -> Corpus:
        async with open_store(env) as store:
            return await read_corpus(store)

    index = current_index(asyncio.run(read()), env)  # off the event loop, as a refresh runs it
    return None if index is None else index.version


def store_call(env: Settings, call: Callable[[Store], Awaitable[object]]) -> None:
    async def run() -> None:
        async with open_store(env) as store:
            await call(store)

    asyncio.run(run())


def click(user: str, item: str) -> Callable[[Store], Awaitable[object]]:
    def add(store: Store) -> Awaitable[object]:
        fields = {"user_id": user, "item_id": item, "type": "click", "ts": "1900000000"}
        return store.redis.xadd(store.keys.events, fields)

    return add
