"""The `reasonrec` command line, run as a user runs it."""

import asyncio
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from server.cli import app, load_dataset
from server.config import Settings
from server.loaders.synthetic import generate
from server.store import open_store
from tests.conftest import REASONREC, free_port
from tests.trainer.evaluation.conftest import write_folder


@pytest.fixture
def env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {
        "REASONREC_REDIS_URL": settings.redis_url,
        "REASONREC_KEY_PREFIX": settings.key_prefix,
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


def test_load_jsonl_reports_counts(env, tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(
        json.dumps({"kind": "item", "item_id": "a", "title": "A"})
        + "\n"
        + json.dumps({"kind": "event", "user_id": "u", "item_id": "a", "type": "click"})
        + "\n"
    )
    result = CliRunner().invoke(app, ["load", "--format", "jsonl", str(data)])
    assert result.exit_code == 0, result.output
    assert "loaded 1 items, 0 users, 1 new events (0 already there)" in result.output
    again = CliRunner().invoke(app, ["load", "--format", "jsonl", str(data)])
    assert "1 new events" not in again.output and "(1 already there)" in again.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["load", "--format", "ml-100k"], "needs a PATH"),
        (["load", "--format", "ml-100k", "/nonexistent"], "is missing u.data"),
        (["load", "--format", "jsonl", "/nonexistent.jsonl"], "is not a file"),
    ],
)
def test_load_errors_are_clear(env, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert message in result.output


def test_load_of_a_malformed_rating_names_it_and_loads_again_once_fixed(
    env, tmp_path: Path
) -> None:
    folder = write_folder(tmp_path / "ml-tiny", [("1", "1", 5, 100), ("1", "2", 4, 200)])
    (folder / "u.data").write_text("1\t1\t5\t100\n1\t2\t4\n")

    broken = CliRunner().invoke(app, ["load", "--format", "ml-100k", str(folder)])

    assert broken.exit_code == 1
    assert "u.data line 2: expected 4 fields" in broken.output.replace("\n", ""), broken.output
    (folder / "u.data").write_text("1\t1\t5\t100\n1\t2\t4\t200\n")
    fixed = CliRunner().invoke(app, ["load", "--format", "ml-100k", str(folder)])
    assert fixed.exit_code == 0, fixed.output
    assert "2 new events" in fixed.output


def test_a_load_cut_short_is_written_again_by_the_demo_but_a_finished_one_is_not(
    settings: Settings,
) -> None:
    dataset = generate(users=5, items=8, events_per_user=3, seed=1)

    async def loads() -> tuple:
        async with open_store(settings) as store:
            await store.upsert_items(dataset.items[:3])  # a load stopped among the items
            await store.begin_load()
        again = await load_dataset(settings, dataset, only_if_empty=True)
        then = await load_dataset(settings, dataset, only_if_empty=True)
        async with open_store(settings) as store:
            return again, then, await store.count_items(), await store.load_unfinished()

    again, then, items, unfinished = asyncio.run(loads())
    assert again is not None and again.events > 0
    assert then is None  # finished: the demo leaves the store as it is
    assert items == 8 and not unfinished


@pytest.mark.parametrize("command", [["serve"], ["demo", "--preset", "tiny"]])
def test_a_taken_address_ends_the_command_before_any_work(
    env, tmp_path: Path, command: list[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        variables = {**os.environ, **env, "REASONREC_PORT": str(port)}
        variables["REASONREC_DATA_DIR"] = str(tmp_path)
        done = subprocess.run(
            [REASONREC, *command], env=variables, capture_output=True, text=True, timeout=120
        )
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1, output
    assert f"cannot serve on 127.0.0.1:{port}" in output and "Traceback" not in output
    assert not (tmp_path / "models").exists()  # nothing loaded, nothing trained


def test_several_workers_without_a_remote_engine_are_refused(env) -> None:
    """Each worker would start an in-process vLLM of its own: the model held that many times."""
    variables = {**os.environ, **env, "REASONREC_WORKERS": "2"}
    variables.pop("REASONREC_ENGINE_URL", None)
    done = subprocess.run(
        [REASONREC, "serve"], env=variables, capture_output=True, text=True, timeout=120
    )
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2, output
    assert "2 workers need a remote engine (REASONREC_ENGINE_URL)" in output


def test_a_demo_on_a_folder_without_movielens_says_so(env, tmp_path: Path) -> None:
    variables = {**os.environ, **env, "REASONREC_PORT": str(free_port())}
    done = subprocess.run(
        [REASONREC, "demo", "--data", str(tmp_path / "nowhere")],
        env=variables,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1 and "is missing u.data" in output and "Traceback" not in output
