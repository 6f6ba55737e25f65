"""The `reasonrec` command line, run as a user runs it."""

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli as reasonrec
from server import cli as cli_module
from server.cli import app, interrupted_load, load_dataset
from server.config import Settings
from server.loaders.synthetic import generate
from server.loaders.writer import Written
from server.store import open_store
from tests.conftest import REASONREC, free_port
from tests.trainer.evaluation.conftest import write_folder
from trainer import bootstrap as bootstrap_module


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
    # u has no profile record: a user all the same, come with an event (said as 0 users).
    assert "loaded 1 items, 1 users, 1 new events (0 already there)" in result.output
    again = CliRunner().invoke(app, ["load", "--format", "jsonl", str(data)])
    assert "1 new events" not in again.output and "(1 already there)" in again.output


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["load", "--format", "ml-100k"], 2, "needs a PATH"),  # a usage error, as the others
        (["load", "--format", "ml-100k", "/nonexistent"], 1, "/nonexistent does not exist"),
        (["load", "--format", "ml-100k", "/etc/hostname"], 1, "/etc/hostname is not a folder"),
        (["load", "--format", "jsonl", "/nonexistent.jsonl"], 1, "is not a file"),
    ],
)
def test_load_errors_are_clear(env, args: list[str], status: int, message: str) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == status, result.output
    assert message in " ".join(result.output.split())


def test_load_of_a_malformed_rating_names_it_and_loads_again_once_fixed(
    env, tmp_path: Path
) -> None:
    folder = write_folder(tmp_path / "ml-tiny", [("1", "1", 5, 100), ("1", "2", 4, 200)])
    (folder / "u.data").write_text("1\t1\t5\t100\n1\t2\t4\n")

    broken = CliRunner().invoke(app, ["load", "--format", "ml-100k", str(folder)])

    assert broken.exit_code == 1
    # rich wraps the line where the path's length puts it: compared without any spacing
    unwrapped = "".join(broken.output.split())
    assert "u.dataline2:expected4fields" in unwrapped, broken.output
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


def test_serve_takes_no_more_workers_than_the_setting_allows() -> None:
    result = CliRunner().invoke(reasonrec.app, ["serve", "--workers", "500"])
    assert result.exit_code == 2 and "less than or equal to 64" in plain(result.output)


def test_a_demo_on_a_folder_without_movielens_says_so(env, tmp_path: Path) -> None:
    variables = {**os.environ, **env, "REASONREC_PORT": str(free_port())}
    (tmp_path / "empty").mkdir()
    done = subprocess.run(
        [REASONREC, "demo", "--data", str(tmp_path / "empty")],
        env=variables,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1 and "is missing u.data" in output and "Traceback" not in output


def plain(output: str) -> str:
    """CLI output without the error panel's frame and line breaks."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


def _never_served(monkeypatch: pytest.MonkeyPatch) -> None:
    def serve_with(settings: Settings) -> None:
        raise AssertionError(f"served on port {settings.port}")

    monkeypatch.setattr(cli_module, "serve_with", serve_with)


@pytest.mark.parametrize("port", ["0", "-1", "65536", "70000"])
def test_a_port_out_of_range_is_a_usage_error(
    env, monkeypatch: pytest.MonkeyPatch, port: str
) -> None:
    """The settings' bounds do not apply to an option's value, and getaddrinfo takes 70000 for
    4464: the address check passed and the server failed to bind, or bound elsewhere."""
    _never_served(monkeypatch)
    result = CliRunner().invoke(app, ["serve", "--port", port])
    assert result.exit_code == 2, result.output
    assert "--port" in plain(result.output)


def test_an_address_that_cannot_be_served_is_printed_as_it_is(
    env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not read as markup: ":-1:" was printed as an emoji, "[b]" vanished."""
    _never_served(monkeypatch)

    def getaddrinfo(*_: object, **__: object) -> list:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(cli_module.socket, "getaddrinfo", getaddrinfo)
    result = CliRunner().invoke(app, ["serve", "--host", "[b]x:-1:", "--port", "8000"])
    assert result.exit_code == 1, result.output
    assert "cannot serve on [b]x:-1::8000: Name or service not known" in plain(result.output)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["-f", "synthetic", "--users", "2", "--items", "10", "data.jsonl"],
            "Invalid value for PATH: --format synthetic generates its data and reads no PATH",
        ),
        (["data.jsonl", "--users", "5"], "--users only apply to --format synthetic, not jsonl"),
        (
            ["-f", "ml-100k", "ml", "--seed", "1", "--events-per-user", "3"],
            "--events-per-user, --seed only apply to --format synthetic, not ml-100k",
        ),
    ],
)
def test_load_refuses_what_its_format_would_ignore(
    env, settings: Settings, args: list[str], message: str
) -> None:
    result = CliRunner().invoke(app, ["load", *args])
    assert result.exit_code == 2, result.output
    assert message in plain(result.output)

    async def items() -> int:
        async with open_store(settings) as store:
            return await store.count_items()

    assert asyncio.run(items()) == 0


def _without_redis_url(data_dir: Path) -> dict[str, str]:
    variables = {k: v for k, v in os.environ.items() if not k.startswith("REASONREC_")}
    return variables | {"REASONREC_DATA_DIR": str(data_dir)}


def test_a_data_dir_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    """The embedded Redis keeps its file there: `mkdir` failed with a traceback. (A data dir that
    is a file is refused with the settings: tests/server/test_config.py.)"""
    (tmp_path / "file").write_text("")
    not_a_folder = tmp_path / "file" / "var"
    output = _one_line_error(["models", "list"], _without_redis_url(not_a_folder))
    assert f"the data directory {not_a_folder} (REASONREC_DATA_DIR) cannot be created" in output


def test_an_index_that_cannot_be_written_is_one_line(
    env, settings: Settings, tmp_path: Path
) -> None:
    asyncio.run(load_dataset(settings, generate(users=5, items=10, events_per_user=3, seed=1)))
    (tmp_path / "file").write_text("")
    not_a_folder = tmp_path / "file" / "var"
    variables = {**os.environ, **env, "REASONREC_DATA_DIR": str(not_a_folder)}
    output = _one_line_error(["index", "--dim", "4"], variables)
    assert f"error: {not_a_folder / 'indexes'}: Not a directory" in output


def _one_line_error(args: list[str], variables: dict[str, str]) -> str:
    """The installed command's output, spacing folded, after checking it ended with an error
    (exit status 1) and no traceback."""
    done = subprocess.run(
        [REASONREC, *args], env=variables, capture_output=True, text=True, timeout=120
    )
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1 and "Traceback" not in output, output
    return output


def test_a_demo_whose_bootstrap_cannot_start_says_why(
    env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A policy file that is not there: read before any training, as a missing GPU is."""

    def train_model(*_: object, **__: object) -> None:
        raise AssertionError("the test reached training")

    monkeypatch.setattr(bootstrap_module, "train_model", train_model)
    monkeypatch.setattr(reasonrec, "serve_with", train_model)
    missing = tmp_path / "policy.yaml"
    monkeypatch.setenv("REASONREC_POLICY_FILE", str(missing))
    monkeypatch.setenv("REASONREC_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("REASONREC_PORT", str(free_port()))
    folder = write_folder(tmp_path / "ml", [("1", "1", 5, 100), ("1", "2", 4, 200)])

    result = CliRunner().invoke(reasonrec.app, ["demo", "--preset", "tiny", "--data", str(folder)])

    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not a traceback
    assert f"{missing}:1: cannot be read" in plain(result.output)


def test_a_file_with_bare_cr_line_ends_is_counted_as_it_is_read(
    env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rdb
) -> None:
    """Its events were counted as one line: the size check let through a data set the stream
    then trimmed."""
    monkeypatch.setenv("REASONREC_EVENTS_MAXLEN", "10")
    ratings = [("1", str(item), 4, 100 + item) for item in range(1, 12)]
    folder = write_folder(tmp_path / "ml", ratings, {str(n): ["Drama"] for n in range(1, 12)})
    (folder / "u.data").write_bytes((folder / "u.data").read_bytes().replace(b"\n", b"\r"))

    result = CliRunner().invoke(reasonrec.app, ["load", "-f", "ml-100k", str(folder)])

    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "holds 11 events" in said and "nothing was written" in said
    assert not rdb.keys(f"{env['REASONREC_KEY_PREFIX']}:*")


def test_a_load_that_makes_the_stream_drop_older_events_says_so(
    env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rdb
) -> None:
    """The size check sees the events of the load, not those already there: two loads that
    each fit dropped the first one's events, and said nothing."""
    monkeypatch.setenv("REASONREC_EVENTS_MAXLEN", "100")
    items = {str(n): ["Drama"] for n in range(1, 101)}
    for user in ("1", "2"):
        ratings = [(user, str(item), 4, 100 + item) for item in range(1, 101)]
        folder = str(write_folder(tmp_path / f"ml-{user}", ratings, items))
        result = CliRunner().invoke(reasonrec.app, ["load", "-f", "ml-100k", folder])
        assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    kept = rdb.xlen(f"{env['REASONREC_KEY_PREFIX']}:events")
    assert kept < 200  # Redis trims by whole nodes of entries (MAXLEN ~)
    dropped = f"warning: the events stream dropped its {200 - kept} oldest events"
    assert dropped in said and "REASONREC_EVENTS_MAXLEN=100" in said, said[-400:]


@pytest.mark.parametrize("command", ["load", "demo"])
def test_a_load_larger_than_the_events_stream_keeps_is_refused(
    command: str, env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rdb
) -> None:
    def train_model(*_: object, **__: object) -> None:
        raise AssertionError("the test reached training")

    monkeypatch.setattr(bootstrap_module, "train_model", train_model)
    monkeypatch.setenv("REASONREC_EVENTS_MAXLEN", "10")
    monkeypatch.setenv("REASONREC_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("REASONREC_PORT", str(free_port()))
    ratings = [("1", str(item), 4, 100 + item) for item in range(1, 12)]
    folder = str(write_folder(tmp_path / "ml", ratings, {str(n): ["Drama"] for n in range(1, 12)}))
    args = {"load": ["load", "-f", "ml-100k", folder], "demo": ["demo", "--data", folder]}[command]

    result = CliRunner().invoke(reasonrec.app, args)

    said = " ".join(result.output.split())  # as wrapped to the terminal's width
    assert result.exit_code == 1 and "REASONREC_EVENTS_MAXLEN=10" in said, result.output
    prefix = env["REASONREC_KEY_PREFIX"]
    assert "nothing was written" in said and not rdb.keys(f"{prefix}:*")


def test_a_synthetic_set_the_stream_cannot_keep_is_refused_before_it_is_made(
    env, monkeypatch: pytest.MonkeyPatch, rdb
) -> None:
    """It was generated first: at a million users, minutes and GBs before the refusal."""

    def generated(**_: object) -> None:
        raise AssertionError("the set was generated")

    monkeypatch.setattr(cli_module, "generate", generated)
    monkeypatch.setenv("REASONREC_EVENTS_MAXLEN", "1000")

    result = CliRunner().invoke(app, ["load", "-f", "synthetic", "--users", "100"])

    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "holds at least 3747 events" in said, result.output
    assert "nothing was written" in said and not rdb.keys(f"{env['REASONREC_KEY_PREFIX']}:*")


@pytest.mark.parametrize(
    "args",
    [
        ["load", "-f", "synthetic", "--seed", "-1"],  # numpy refuses it after the catalog is made
        ["load", "-f", "synthetic", "--seed", str(2**64)],
        # A day apart from 2024: events past the present, which no event may be
        ["load", "-f", "synthetic", "--users", "2", "--events-per-user", "1500"],
    ],
)
def test_synthetic_options_out_of_range_are_refused_before_anything_is_made(
    env, args: list[str]
) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Invalid value" in result.output, result.output


@pytest.mark.parametrize("command", [["serve"], ["demo"], ["trainer"], ["train", "--once"]])
def test_a_policy_file_that_cannot_be_read_ends_the_command_before_it_starts(
    env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("weights: [\n")
    monkeypatch.setenv("REASONREC_POLICY_FILE", str(policy))
    monkeypatch.setenv("REASONREC_PORT", str(free_port()))
    monkeypatch.setenv("REASONREC_DATA_DIR", str(tmp_path / "var"))

    result = CliRunner().invoke(reasonrec.app, command)

    said = " ".join(result.output.split())
    assert result.exit_code == 1 and f"{policy}:2: not valid YAML" in said, result.output
    assert len(result.output.strip().splitlines()) == 1  # unwrapped: one line in a log too
    assert not (tmp_path / "var").exists()  # nothing loaded, trained or served


def test_demo_offers_no_base_for_a_preset_that_needs_one(env) -> None:
    result = CliRunner().invoke(reasonrec.app, ["demo", "--preset", "pretrained"])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "choose an embedded model's preset" in said, result.output
    assert "--base" not in said  # demo has no such option


def test_a_load_interrupted_before_it_wrote_says_nothing_was_written(
    rdb, settings: Settings
) -> None:
    """Stopped while it checked the events, a load said the store held part of it; and another
    load's marker (two loads at once) must not make it say so either."""
    rdb.set(f"{settings.key_prefix}:load:unfinished", "1")  # another load, writing
    assert interrupted_load(Written()).startswith("nothing was written")
    said = interrupted_load(Written(began=True, events=3000))
    assert said.startswith("the store holds part of this load (3000 event(s) written)")


@pytest.mark.parametrize(
    ("stop", "code", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")],
)
def test_one_ctrl_c_stops_a_load_and_says_how_to_finish_it(
    env, tmp_path: Path, rdb, settings: Settings, stop: int, code: int, word: str
) -> None:
    """redis-py's timeouts swallowed the cancellation asyncio makes of Ctrl-C: five loads of
    six went on to the end. SIGTERM (`docker stop`) killed it without a word."""
    data = tmp_path / "big.jsonl"
    records = [{"kind": "item", "item_id": "a", "title": "A"}] + [
        {
            "kind": "event",
            "user_id": f"u{n % 5000}",
            "item_id": "a",
            "type": "click",
            "timestamp": 1_700_000_000 + n,
        }
        for n in range(200_000)
    ]
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    events = f"{settings.key_prefix}:events"
    process = subprocess.Popen(
        [REASONREC, "load", str(data)], env=os.environ.copy(), stderr=subprocess.PIPE, text=True
    )
    try:
        while not rdb.xlen(events):  # writing events: mid-load
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            time.sleep(0.05)
        # As another load finishing meanwhile does: this one said "nothing was written".
        rdb.delete(f"{settings.key_prefix}:load:unfinished")
        process.send_signal(stop)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    said = " ".join(err.split())
    assert process.returncode == code, said
    assert f"{word}: the store holds part of this load" in said and "Traceback" not in said
    assert rdb.xlen(events) < 200_000
