"""`reasonrec eval --task rate`: the command, the stored events and the baselines, on the small
MovieLens-latest files of test_formats (the run itself trains a model: measured, not tested)."""

import statistics
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from contract.rating import ITEM_SHRINK
from contract.tasks import Task
from server.config import Settings
from server.loaders import Dataset
from server.schemas import EventType, FeedbackEvent
from tests.trainer.evaluation.test_formats import (
    T,
    event,
    item,
    plain,
    write_jsonl,
    write_ml_latest,
)
from trainer.evaluation.harness import Report
from trainer.evaluation.rating import _bias, _means, _score, _surprise
from trainer.evaluation.run import phase_events, scratch_store, write_dataset
from trainer.evaluation.split import EvalData, EvalFormat, read_eval_data
from trainer.presets import Recipe


@pytest.fixture
def data(tmp_path: Path) -> EvalData:
    return read_eval_data(write_ml_latest(tmp_path / "ml"), EvalFormat.ml_latest)


def test_the_store_gets_ratings_with_their_values(data: EvalData) -> None:
    train = phase_events(data.split, data.timelines, "train")
    # user 1's first two ratings (4.0 at 100, 3.5 at 200), user 10's first (4.0 at 20)
    assert sorted((e.user_id, e.item_id, e.value) for e in train) == [
        ("1", "1", 4.0),
        ("1", "2", 3.5),
        ("10", "1", 4.0),
    ]
    assert {e.type for e in train} == {EventType.rating}


def test_the_eval_store_counts_every_rating_as_an_interaction(
    data: EvalData, settings: Settings
) -> None:
    train = phase_events(data.split, data.timelines, "train")
    dataset = Dataset(items=data.items, users=data.users, events=train)
    with scratch_store(settings) as (_, store, run):
        run.run(write_dataset(store, dataset))
        _, history, seen = run.run(store.user_context("1", 10))
        context = run.run(store.rating_context("1", ["2"], 10))
    # 3.5 is below the serving threshold (4), but the ranking protocol counts it
    assert [item for item, _ in history] == ["1", "2"] and seen == {"1", "2"}
    assert context.ratings == {"1": 4.0, "2": 3.5}


def test_the_eval_serves_its_models_in_process(settings: Settings) -> None:
    """A deployment's REASONREC_ENGINE_URL names a vLLM that cannot see the eval's scratch
    registry: sent there, every answer would fall back and the model would score as retrieval."""
    deployed = settings.model_copy(update={"engine_url": "http://vllm:8000"})
    with scratch_store(deployed) as (scratch, _, _):
        assert scratch.engine_url is None


def test_mean_baselines(data: EvalData) -> None:
    known = [e for e in data.timelines["1"][:2] + data.timelines["10"][:2]]  # 4, 3.5, 4, 0.5
    predict = _means(known)
    assert predict["global mean"]("1", "3") == statistics.fmean([4.0, 3.5, 4.0, 0.5])
    assert predict["user mean"]("10", "2") == statistics.fmean([4.0, 0.5])
    assert predict["item mean"]("x", "1") == 4.0
    assert predict["user mean"]("nobody", "1") == predict["global mean"]("nobody", "1")
    tests = [data.timelines["1"][-1]]  # user 1 rated movie 4 a 1.0
    # movie 4 is unseen: its item mean is the global mean, 3.0, two above the truth
    assert _score(predict["item mean"], tests) == {"mae": 2.0, "rmse": 2.0}


def test_the_bias_baseline_weighs_every_rating_alike() -> None:
    def rated(user: str, item: str, value: float, second: int) -> FeedbackEvent:
        return FeedbackEvent(
            user_id=user, item_id=item, type="rating", value=value, timestamp=T(second)
        )

    # "up" and "down" gave the same ratings to the same items, in opposite orders
    known = [
        *(rated("up", i, v, n) for n, (i, v) in enumerate([("a", 1.0), ("b", 5.0)])),
        *(rated("down", i, v, n) for n, (i, v) in enumerate([("b", 5.0), ("a", 1.0)])),
    ]
    predict = _bias(known)["user + item bias"]

    # unlike the lean baseline (the fallback, tests/server/test_rate_logic.py), order is ignored
    assert predict("up", "c") == predict("down", "c") == 3.0  # global mean 3, c unrated
    assert predict("up", "b") == predict("down", "b") > 3.0 > predict("up", "a")
    assert predict("nobody", "b") == pytest.approx(3.0 + 2 * 2 / (2 + ITEM_SHRINK))


def test_library_baselines_predict_on_the_rating_scale(data: EvalData) -> None:
    known = [e for events in data.timelines.values() for e in events[:-1]]
    for name, predict in _surprise(known, seed=0).items():
        assert name in {"bias (ALS)", "SVD"}
        assert 1.0 <= predict("1", "3") <= 5.0
        assert 1.0 <= predict("unknown", "unknown") <= 5.0


def test_library_baselines_predict_below_one_on_a_half_star_scale() -> None:
    # ml-latest's ratings go down to 0.5: where nearly every rating is 0.5, so are predictions
    # (on a scale of 1 to 5 every one was raised to 1).
    rows = [(f"u{n}", i, 0.5) for n in range(20) for i in "abcde"] + [("u1", "f", 5.0)]
    known = [
        FeedbackEvent(user_id=u, item_id=i, type="rating", value=v, timestamp=T(0))
        for u, i, v in rows
    ]
    for predict in _surprise(known, seed=0).values():
        assert 0.5 <= predict("u0", "a") < 0.6


def test_the_eval_scores_every_system_without_the_deployment_policy(settings: Settings) -> None:
    """A deployment's REASONREC_POLICY_FILE would shape only the pipeline's lists (the gateway
    applies it), not the baselines': the systems would not be compared on the same terms."""
    deployed = settings.model_copy(update={"policy_file": Path("/etc/reasonrec/policy.yaml")})
    with scratch_store(deployed) as (scratch, _, _):
        assert scratch.policy_file is None


def test_the_command_runs_the_rating_eval_with_its_recipe(
    data: EvalData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = []

    def run_eval(
        data: EvalData, settings, users, seed, preset, tasks, recipe, *_: object
    ) -> Report:
        runs.append((data.split.dataset, users, tasks, recipe))
        return Report(
            dataset=data.split.dataset,
            protocol="test",
            users=2,
            systems={"reasonrec": {"mae": 0.5, "rmse": 0.7}},
        )

    fake = types.ModuleType("trainer.evaluation.run")
    fake.run_eval = run_eval  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "trainer.evaluation.run", fake)
    folder = tmp_path / "ml"
    args = ["eval", "--format", "ml-latest", str(folder), "--task", "rate", "--recipe", "zero"]
    result = CliRunner().invoke(app, [*args, "--users", "2"])
    assert result.exit_code == 0, result.output
    assert runs == [(data.split.dataset, 2, frozenset({Task.rate}), Recipe.zero)]
    assert "reasonrec    0.5000    0.7000" in result.output


def test_rating_needs_rated_test_interactions(tmp_path: Path) -> None:
    clicks = [item("1"), item("2"), item("3")] + [
        event("b", str(n), "click", T(n)) for n in (1, 2, 3)
    ]
    path = write_jsonl(tmp_path / "clicks.jsonl", clicks)
    args = ["eval", "--format", "jsonl", str(path), "--task", "rank", "--task", "rate"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "--task rate needs ratings" in plain(result.output)
    assert "Traceback" not in result.output
