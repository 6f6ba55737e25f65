"""The `reasonrec` command line, run as a user runs it."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from server.cli import app
from server.config import Settings
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
    assert "cannot read it as ml-100k: event 2: ValueError" in broken.output, broken.output
    (folder / "u.data").write_text("1\t1\t5\t100\n1\t2\t4\t200\n")
    fixed = CliRunner().invoke(app, ["load", "--format", "ml-100k", str(folder)])
    assert fixed.exit_code == 0, fixed.output
    assert "2 new events" in fixed.output
