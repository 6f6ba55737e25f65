"""`reasonrec eval`: what ends it early is one line, not a traceback, and a report it could not
write is refused before the run (nothing here trains a model)."""

import json
import os
import shutil
import signal
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli import app
from server.config import Settings
from trainer import bootstrap as bootstrap_module
from trainer.cli import _unwritable
from trainer.evaluation.harness import Report
from trainer.evaluation.split import EvalData


def _three_each(path: Path, users: int = 4) -> Path:
    """Every user exactly 3 interactions: enough for the split, none left to train on (the
    first is all the training data holds)."""
    items = [{"kind": "item", "item_id": str(i), "title": f"Item {i}"} for i in range(1, 7)]
    events = [
        {
            "kind": "event",
            "user_id": f"u{user}",
            "item_id": str((user + step) % 6 + 1),
            "type": "click",
            "timestamp": f"2024-01-01T00:00:{10 * user + step:02d}Z",
        }
        for user in range(users)
        for step in range(3)
    ]
    path.write_text("".join(json.dumps(record) + "\n" for record in [*items, *events]))
    return path


def _fake_run_eval(
    monkeypatch: pytest.MonkeyPatch, before: Callable[[], None] = lambda: None
) -> None:
    """The command's run_eval (the real one trains a model): `before`, then an empty report."""

    def run_eval(data: EvalData, *args: Any) -> Report:
        before()
        return Report(dataset=data.split.dataset, protocol="test", users=0, systems={})

    fake = types.ModuleType("trainer.evaluation.run")
    fake.run_eval = run_eval  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "trainer.evaluation.run", fake)


def _no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def train_model(*_: Any, **__: Any) -> None:
        raise AssertionError("the test reached training")

    monkeypatch.setattr(bootstrap_module, "train_model", train_model)


def test_data_too_small_to_train_on_is_one_line(
    env: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_training(monkeypatch)
    data = _three_each(tmp_path / "events.jsonl")

    result = CliRunner().invoke(app, ["eval", "--format", "jsonl", str(data), "--preset", "tiny"])

    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not a traceback
    assert "no training examples" in result.output


def test_a_report_file_that_cannot_be_opened_is_refused_before_the_run(
    env: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/proc/version: its folder's permission bits let root write, the file itself refuses."""
    runs: list[bool] = []
    _fake_run_eval(monkeypatch, lambda: runs.append(True))
    data = _three_each(tmp_path / "events.jsonl")

    args = ["eval", "--format", "jsonl", str(data), "--json", "/proc/version"]
    result = CliRunner().invoke(app, args)

    assert result.exit_code == 2, result.output
    assert "cannot be written" in " ".join(result.output.split())
    assert not runs


@pytest.mark.timeout(30)
def test_a_report_to_a_pipe_is_not_opened_by_the_probe(tmp_path: Path) -> None:
    """Opened for writing, a FIFO blocks until a reader comes: the probe would hang the command."""
    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    assert _unwritable(fifo) is None
    assert _unwritable(tmp_path) == "Is a directory"


def test_the_report_probe_leaves_no_file_behind(
    env: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = tmp_path / "report.json"
    seen: list[bool] = []
    _fake_run_eval(monkeypatch, lambda: seen.append(report.exists()))
    data = _three_each(tmp_path / "events.jsonl")

    result = CliRunner().invoke(
        app, ["eval", "--format", "jsonl", str(data), "--json", str(report)]
    )

    assert result.exit_code == 0, result.output
    assert seen == [False]  # not created by the probe: an empty file would pass for a report
    assert json.loads(report.read_text())["protocol"] == "test"


def test_a_report_that_cannot_be_written_after_the_run_is_one_line(
    env: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    _fake_run_eval(monkeypatch, lambda: shutil.rmtree(folder))  # gone during the run
    data = _three_each(tmp_path / "events.jsonl")

    args = ["eval", "--format", "jsonl", str(data), "--json", str(folder / "report.json")]
    result = CliRunner().invoke(app, args)

    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    output = " ".join(result.output.split())
    assert "No such file or directory" in output and "0 users" in output  # the table first


def test_sigterm_stops_a_run_as_ctrl_c_does(
    env: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed outright, a run left its store's keys (100,000 for ML-100K) and its folder."""
    unwound: list[bool] = []

    def stopped() -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # `docker stop`, a CI job cancelled
            time.sleep(5)
        finally:
            unwound.append(True)  # where the run drops its store and folder

    _fake_run_eval(monkeypatch, stopped)
    data = _three_each(tmp_path / "events.jsonl")

    result = CliRunner().invoke(app, ["eval", "--format", "jsonl", str(data)])

    assert result.exit_code == 143 and "stopped (SIGTERM)" in result.output, result.output
    assert unwound == [True]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # given back
