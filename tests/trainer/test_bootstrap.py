"""`reasonrec bootstrap` on the embedded model: what it activates, and how it stops."""

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from server.config import Settings
from server.store import open_store
from tests.trainer.test_bootstrap_base import bootstrap_on
from trainer import bootstrap as bootstrap_module
from trainer.corpus import Corpus


def test_an_active_version_missing_from_the_registry_does_not_block_activation(
    settings: Settings,
) -> None:
    # The registry was emptied (`make clean`) under a Redis that kept its pointer.
    async def stale() -> None:
        async with open_store(settings) as store:
            await store.set_active_model("v20250101-000000-abcdef")

    asyncio.run(stale())
    settings = settings.model_copy(update={"candidates": 8, "prompt_history": 4})
    result = asyncio.run(bootstrap_on(settings, base=None))  # forced past the gate, not this

    assert result.activated, result.gate

    async def active() -> str | None:
        async with open_store(settings) as store:
            return await store.active_model()

    assert asyncio.run(active()) == result.version


INTERRUPTED = """
import asyncio, time
from server.interrupts import interruptible

async def main():
    with interruptible():
        print("training", flush=True)
        time.sleep(20)  # synchronous work: no await where asyncio could cancel it
        print("published", flush=True)

asyncio.run(main())
"""


def test_one_ctrl_c_stops_synchronous_training_at_once() -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTED],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "training"
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert "published" not in out and "KeyboardInterrupt" in err
    assert time.monotonic() - started < 10


def _store_of(env: Settings, tmp_path: Path, events: list[dict]) -> None:
    """Twelve items and `events`, loaded as `reasonrec load --format jsonl` does."""
    items = [{"kind": "item", "item_id": f"i{n}", "title": f"Item {n}"} for n in range(12)]
    lines = [json.dumps(line) for line in [*items, *events]]
    (tmp_path / "store.jsonl").write_text("\n".join(lines))
    loaded = CliRunner().invoke(app, ["load", "--format", "jsonl", str(tmp_path / "store.jsonl")])
    assert loaded.exit_code == 0, loaded.output


def _event(user: int, item: int, kind: str, at: int) -> dict:
    value = {"value": float(1 + (user + item) % 5)} if kind == "rating" else {}
    return {
        "kind": "event",
        "user_id": f"u{user}",
        "item_id": f"i{item}",
        "type": kind,
        "timestamp": 1_700_000_000 + at,
        **value,
    }


class Reached(Exception):
    """As far as a test goes."""


def test_rating_alone_trains_on_users_with_two_ratings(
    env: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ranking's examples need 3+ interactions a user; a bootstrap for rating alone stopped on
    their absence ("no training examples") before it reached rating's."""
    _store_of(env, tmp_path, [_event(u, u + n, "rating", n) for u in range(8) for n in range(2)])
    reached: dict[str, int] = {}

    def train_model(corpus, index, examples, preset, policy, shape, plan, *_: object) -> None:
        reached.update(ranking=len(examples.train), rating=len(plan.rating.train))
        raise Reached

    monkeypatch.setattr(bootstrap_module, "train_model", train_model)
    result = CliRunner().invoke(app, ["bootstrap", "--preset", "tiny", "--task", "rate"])

    assert isinstance(result.exception, Reached), result.output
    assert reached["ranking"] == 0 and reached["rating"] > 0


def test_rating_without_ratings_is_refused_before_the_index_is_built(
    env: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _store_of(env, tmp_path, [_event(u, u + n, "click", n) for u in range(8) for n in range(4)])
    built: list[object] = []
    monkeypatch.setattr(bootstrap_module, "index_corpus", lambda *args, **_: built.append(args))

    result = CliRunner().invoke(app, ["bootstrap", "--preset", "tiny", "--task", "rate"])

    assert result.exit_code == 1 and "no rating examples" in result.output, result.output
    assert built == []


def test_an_index_folder_that_cannot_be_written_is_refused_before_training(
    env: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _store_of(env, tmp_path, [_event(u, u + n, "click", n) for u in range(8) for n in range(4)])
    monkeypatch.setenv("REASONREC_REGISTRY_DIR", str(tmp_path / "registry"))
    env.data_dir.mkdir(parents=True, exist_ok=True)
    (env.data_dir / "indexes").write_text("")  # a file where the index folder should be
    built: list[object] = []
    monkeypatch.setattr(bootstrap_module, "index_corpus", lambda *args, **_: built.append(args))

    result = CliRunner().invoke(app, ["bootstrap", "--preset", "tiny"])

    assert result.exit_code == 1 and "indexes" in result.output, result.output
    assert built == [] and not any((tmp_path / "registry").glob("v*"))


def test_training_reads_an_index_that_never_saw_the_held_out_items(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation holds out each user's last interaction: an index that learnt it retrieved the
    held-out item, flattering the retrieval baseline the gate compares with."""
    built: list[list[list[str]]] = []
    monkeypatch.setattr(bootstrap_module, "build_index", lambda _, seqs, **__: built.append(seqs))
    corpus = Corpus(items={}, profiles={}, sequences={"u": [("a", 1.0), ("b", 2.0), ("z", 3.0)]})

    bootstrap_module.index_corpus(corpus, settings, 4, current=False, held_out=True)
    bootstrap_module.index_corpus(corpus, settings, 4, current=False)

    assert built == [[["a", "b"]], [["a", "b", "z"]]]
