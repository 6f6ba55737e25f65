"""`reasonrec eval --model VERSION`: a registered version is evaluated as it is, and only one that
cannot have seen the test interactions (the command is checked here with the heavy run faked;
tests/integration/test_pretrained.py runs it for real)."""

import os
import signal
import sys
import threading
import time
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from contract.tasks import Task
from server.config import Settings
from server.interrupts import TERMINATED, interruptible
from server.registry import Manifest, Registry
from server.store import Store
from tests.server.helpers import publish_version
from tests.trainer.evaluation.test_formats import plain, write_ml_latest
from trainer.evaluation.harness import Report
from trainer.evaluation.run import scratch_store
from trainer.evaluation.split import EvalFormat, read_eval_data
from trainer.feedback_log import ConsumeResult
from trainer.gate import Gate
from trainer.refresh import RefreshResult, child_manifest

SPLIT = "ml-latest:ml:eval-train-split:"  # format, folder, protocol, then the data's digest


@pytest.mark.parametrize(
    ("trained_on", "method", "fine"),
    [
        ("this split", "pretrain+sft+grpo", True),  # bootstrapped by eval on this split
        (SPLIT, "pretrain+sft+grpo", False),  # before splits had a digest: data unknown
        (None, "imported", True),  # a GGUF: trained on none of it
        (None, "registered", True),
        (None, "pretrain+sft+grpo", False),  # `reasonrec bootstrap` on all the data
        ("ml-100k:ml-100k:eval-train-split", "pretrain+sft+grpo", False),  # another dataset's split
        (None, "refresh", False),  # trained on feedback the run cannot see
        ("this split", "grpo-refresh", False),  # a refresh published before child_manifest
    ],
)
def test_only_a_model_that_saw_none_of_the_tests_is_evaluated(
    tmp_path: Path, trained_on: str | None, method: str, fine: bool
) -> None:
    split = read_eval_data(write_ml_latest(tmp_path / "ml"), EvalFormat.ml_latest).split
    assert split.trained_on.startswith(SPLIT) and len(split.trained_on) == len(SPLIT) + 12
    trained_on = split.trained_on if trained_on == "this split" else trained_on
    manifest = Manifest(version="v1", trained_on=trained_on, training={"method": method})
    if fine:
        split.check_unseen(manifest)
    else:
        with pytest.raises(ValueError, match="could count the very items it was trained on"):
            split.check_unseen(manifest)


def test_a_refresh_of_a_model_trained_on_the_split_is_not_evaluated(tmp_path: Path) -> None:
    split = read_eval_data(write_ml_latest(tmp_path / "ml"), EvalFormat.ml_latest).split
    parent = Manifest(
        version="v1", trained_on=split.trained_on, training={"method": "pretrain+sft+grpo"}
    )
    split.check_unseen(parent)
    gate = Gate(
        active={},
        candidate={},
        ndcg_tolerance=0,
        invalid_tolerance=0,
        beats_retrieval=True,
        passed=True,
    )
    result = RefreshResult(
        outcome="published", reason="", parent="v1", consumed=ConsumeResult(), gate=gate
    )
    child = child_manifest(parent, True, {"weights": {}}, result)  # trained on live feedback
    with pytest.raises(ValueError, match="could count the very items it was trained on"):
        split.check_unseen(child)


def test_other_data_under_the_same_folder_name_is_another_split(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first = read_eval_data(write_ml_latest(tmp_path / "a" / "ml"), EvalFormat.ml_latest).split
    folder = write_ml_latest(tmp_path / "b" / "ml")
    with (folder / "ratings.csv").open("a") as handle:
        handle.write("1,1,4.0,999999999\n")  # one more interaction: another training part
    second = read_eval_data(folder, EvalFormat.ml_latest).split
    again = read_eval_data(tmp_path / "a" / "ml", EvalFormat.ml_latest).split
    assert first.dataset == second.dataset and first.trained_on != second.trained_on
    assert again.trained_on == first.trained_on


@pytest.fixture
def registered(env: Settings) -> Registry:
    registry = Registry(env.registry_path)
    for version, tasks, method in (
        ("zero-shot", [Task.rank], "imported"),
        ("rater", [Task.rate], "imported"),
        ("everything", [Task.rank], "pretrain+sft+grpo"),
    ):
        manifest = Manifest(version=version, tasks=tasks, training={"method": method})
        registry.publish(registry.staging(), manifest)
    return registry


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    calls = []

    def run_eval(data, settings, users, seed, preset, tasks, recipe, model, base, stages):
        calls.append((tasks, model, base, stages))
        return Report(dataset=data.split.dataset, protocol="test", users=users or 0, systems={})

    fake = types.ModuleType("trainer.evaluation.run")
    fake.run_eval = run_eval  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "trainer.evaluation.run", fake)
    return calls


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--model", "nothing"], "model version 'nothing' is not in the registry"),
        (["--model", "everything"], "was trained on data this run cannot tell"),
        (["--model", "rater"], "model rater was not trained for rank"),
        (["--model", "zero-shot", "--task", "search"], "cannot evaluate a given version"),
        (["--model", "zero-shot", "--base", "zero-shot"], "not both"),
        (["--base", "zero-shot", "--task", "rate"], "learns ranking only"),
        (["--base", "nothing"], "model version 'nothing' is not in the registry"),
        (["--base", "everything"], "was trained on data this run cannot tell"),  # saw the tests
        (["--recipe", "zero"], "how rating is learnt: give it with --task rate"),
        (["--preset", "pretrained-items"], "trains adapters on a pretrained model: give --base"),
    ],
)
def test_a_version_eval_cannot_trust_is_refused_before_any_work(
    registered: Registry, runs: list, tmp_path: Path, args: list[str], error: str
) -> None:
    folder = write_ml_latest(tmp_path / "ml")
    result = CliRunner().invoke(app, ["eval", "--format", "ml-latest", str(folder), *args])
    assert result.exit_code == 2, result.output
    assert error in " ".join(plain(result.output).split())
    assert runs == []


def test_a_registered_version_is_evaluated_instead_of_a_bootstrap(
    registered: Registry, runs: list, tmp_path: Path
) -> None:
    folder = write_ml_latest(tmp_path / "ml")
    args = ["eval", "--format", "ml-latest", str(folder), "--model", "zero-shot", "--users", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert runs == [(frozenset({Task.rank}), "zero-shot", None, True)]
    result = CliRunner().invoke(app, [*args[:4], "--base", "zero-shot"])
    assert result.exit_code == 0, result.output
    assert runs[-1] == (frozenset({Task.rank}), None, "zero-shot", True)
    result = CliRunner().invoke(app, [*args[:4], "--base", "zero-shot", "--no-stages"])
    assert result.exit_code == 0, result.output
    assert runs[-1] == (frozenset({Task.rank}), None, "zero-shot", False)


def test_a_version_evaluated_is_read_whole_though_a_prune_removes_it(settings: Settings) -> None:
    """Linked to the folder, a version pruned from the configured registry during the eval was
    gone from under it: the next engine it opened failed."""
    source = Registry(settings.registry_path)
    publish_version(source, "v0")
    publish_version(source, "a1", kind="lora", base_model="v0")
    with scratch_store(settings, ["a1"]) as (scratch, _, _):
        source.remove(["a1", "v0"])
        copy = Registry(scratch.registry_path)
        assert copy.manifest("a1").base_model == "v0"
        assert (copy.path("v0") / "model.safetensors").is_file()


def test_sigterm_during_a_run_leaves_none_of_its_store(settings: Settings, rdb) -> None:
    """Raised where the main thread was (often the event loop, outside the task), the stop let
    the task write on while its store was dropped: a thousand keys and more were left."""
    scratch: list[Settings] = []

    async def writing(store: Store) -> None:  # as loading the split's events does
        for n in range(100_000):
            await store.redis.set(store.keys.item(str(n)), "1")

    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    with (
        pytest.raises(KeyboardInterrupt),
        interruptible(sigterm=True),
        scratch_store(settings) as (settings_of_run, store, run),
    ):
        scratch.append(settings_of_run)
        run.run(writing(store))
    assert TERMINATED.is_set()
    time.sleep(0.5)  # a task left running would write meanwhile
    assert not rdb.keys(f"{scratch[0].key_prefix}:*")
