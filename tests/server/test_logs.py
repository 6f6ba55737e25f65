"""Logs are JSON lines on stderr, whoever writes them: our code, uvicorn, httpx, vLLM and the
engine processes vLLM starts."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from server import logs, store


def run_logging(folder: Path, script: str, plain: str = "^$", **env: str) -> tuple[str, list[dict]]:
    """Run `script` in a fresh interpreter (with `env`): its stdout, and its stderr as JSON
    lines; any other line fails the test unless it matches `plain`. A file, not `-c`: a spawned
    process imports its functions from it."""
    path = folder / "script.py"
    path.write_text(textwrap.dedent(script))
    # Not what an engine opened earlier in this process left for its own (its level, how it
    # starts its processes).
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    done = subprocess.run(
        [sys.executable, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=inherited | env,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return done.stdout, [json.loads(line) for line in lines if not re.search(plain, line)]


# How vLLM starts its engine processes: fork, or spawn (as it does on this CPU build in the
# gateway). A spawned process imports vLLM before its logging is set up: the warnings of that
# import stay plain text (docs/api.md says so).
@pytest.mark.parametrize(
    ("method", "plain"), [("fork", "^$"), ("spawn", "^Triton is installed, but doesn't include")]
)
def test_vllm_logs_json_to_stderr_without_a_request_id_in_its_engine_processes_too(
    tmp_path: Path, method: str, plain: str
) -> None:
    stdout, lines = run_logging(
        tmp_path,
        """
        import logging

        from vllm.utils.system_utils import get_mp_context

        from server import logs
        from server.logs import request_id_var


        def engine_process():
            # What vLLM's engine process does first: configure its logging from the environment.
            from vllm.config.logging import LoggingConfig
            from vllm.logger import configure_logging_if_needed, init_logger

            configure_logging_if_needed(LoggingConfig())
            init_logger("vllm.engine").info("engine process line")
            init_logger("vllm.engine").debug("below the level")


        if __name__ == "__main__":
            logs.configure("info")
            logs.configure_vllm()  # as the in-process engine does before it starts vLLM
            from vllm.config.logging import LoggingConfig
            from vllm.logger import configure_logging_if_needed, init_logger

            configure_logging_if_needed(LoggingConfig())  # as AsyncLLM does
            request_id_var.set("r-1")  # vLLM's output task keeps the request that started it
            init_logger("vllm.async").warning("gateway process line")
            logging.getLogger("server.recommend").info("our line")
            child = get_mp_context().Process(target=engine_process)  # as vLLM starts its own
            child.start()
            child.join()
            assert child.exitcode == 0
        """,
        plain,
        VLLM_WORKER_MULTIPROC_METHOD=method,
    )

    assert stdout == ""
    by_msg = {line["msg"]: line for line in lines}
    assert "below the level" not in by_msg
    engine, gateway = by_msg["engine process line"], by_msg["gateway process line"]
    assert engine["logger"] == "vllm.engine" and engine["level"] == "info"
    assert "request_id" not in engine and "request_id" not in gateway
    assert engine["process"] != gateway["process"]
    assert by_msg["our line"]["request_id"] == "r-1"
    assert "vllm_process_name" not in by_msg["our line"]


@pytest.mark.parametrize(
    ("operator", "ours"),
    [
        ({}, True),
        ({"VLLM_LOGGING_CONFIG_PATH": "/etc/vllm-logging.json"}, False),  # their file stays
        ({"VLLM_CONFIGURE_LOGGING": "0"}, False),  # with it, vLLM refuses any file and fails
    ],
)
def test_vllm_gets_our_logging_file_unless_the_operator_chose_theirs(
    operator: dict[str, str], ours: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("VLLM_LOGGING_CONFIG_PATH", "VLLM_CONFIGURE_LOGGING", "VLLM_LOGGING_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in operator.items():
        monkeypatch.setenv(name, value)

    logs.configure_vllm()

    given = os.environ.get("VLLM_LOGGING_CONFIG_PATH")
    assert (given == str(logs.VLLM_LOGGING)) is ours
    assert given == operator.get("VLLM_LOGGING_CONFIG_PATH", given if ours else None)


def test_uvicorn_started_from_its_command_line_logs_json_once(tmp_path: Path) -> None:
    stdout, lines = run_logging(
        tmp_path,
        """
        import logging
        import logging.config

        from uvicorn.config import LOGGING_CONFIG

        from server import logs

        # `uvicorn server.asgi:app`: uvicorn configures its loggers, then imports our app.
        logging.config.dictConfig(LOGGING_CONFIG)
        logs.configure("info")
        logging.getLogger("uvicorn.error").info("Started server process")
        logging.getLogger("httpx").info("HTTP Request: POST http://vllm:8000/v1/completions")
        """,
    )

    assert stdout == ""
    assert [line["msg"] for line in lines] == ["Started server process"]


def test_loggers_enabled_or_lowered_after_the_setup_still_log_once_at_our_level(
    tmp_path: Path,
) -> None:
    """vLLM's logging file, loaded when the first in-process engine starts, enabled every logger
    it does not name, uvicorn's access log among them: two access lines per request; bm25s sets
    its logger to DEBUG when imported, after the setup."""
    stdout, lines = run_logging(
        tmp_path,
        f"""
        import json
        import logging
        import logging.config

        from uvicorn.config import LOGGING_CONFIG

        from server import logs

        logging.config.dictConfig(LOGGING_CONFIG)
        logs.configure("info")
        logging.config.dictConfig(json.loads(open({str(logs.VLLM_LOGGING)!r}).read()))
        logging.getLogger("uvicorn.access").info('127.0.0.1 - "GET /v1/items/a HTTP/1.1" 200')
        logging.getLogger("bm25s").setLevel(logging.DEBUG)
        logging.getLogger("bm25s").debug("Building index from tokens")
        logging.getLogger("reasonrec.access").info("request")
        """,
    )

    assert stdout == ""
    assert [line["msg"] for line in lines] == ["request"]


def test_a_validation_error_is_described_without_the_input_it_quotes() -> None:
    class Profile(BaseModel):
        age: int

    with pytest.raises(ValidationError) as caught:
        Profile.model_validate({"age": "bob@example.com"})
    described = logs.describe(caught.value)
    assert described.startswith("ValidationError: age: Input should be a valid integer")
    assert "example.com" not in described and "example.com" in str(caught.value)


def test_an_unreadable_record_met_again_is_counted_but_logged_once_a_minute(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def skipped() -> list[str]:
        return [r.id for r in caplog.records if r.getMessage() == "unreadable record skipped"]

    counted = store.metrics.UNREADABLE_RECORDS.labels("user")
    before = counted._value.get()
    for _ in range(3):  # one user's requests, each reading their record
        assert store.attributes_of("u-again", "[]") == {}
    assert store.attributes_of("u-other", "[]") == {}
    assert skipped() == ["u-again", "u-other"] and counted._value.get() == before + 4
    monkeypatch.setattr(store, "UNREADABLE_LOG_SECONDS", 0.0)
    assert store.attributes_of("u-again", "[]") == {}
    assert skipped() == ["u-again", "u-other", "u-again"]


def test_an_unreadable_record_is_logged_without_what_it_holds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    raw = json.dumps(["bob@example.com", "+1 555 0100"])  # not an object: written by hand

    assert store.attributes_of("u1", raw) == {}

    [record] = [r for r in caplog.records if r.getMessage() == "unreadable record skipped"]
    assert record.id == "u1" and "dict" in record.reason
    assert "example.com" not in record.reason and "555" not in record.reason
