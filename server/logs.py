"""Structured logs: one JSON object per line, tagged with the request id of the request at hand."""

import json
import logging
import os
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from server.schemas import in_words

VLLM_LOGGING = Path(__file__).with_name("vllm_logging.json")

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
client_request_id_var: ContextVar[str | None] = ContextVar("client_request_id", default=None)
refresh_id_var: ContextVar[str | None] = ContextVar("refresh_id", default=None)
"""The trainer's refresh at hand: its lines, from the lock to the "refresh finished" one."""

# Attributes every LogRecord has; anything else was passed through `extra=` and is logged.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_STANDARD.add("color_message")  # uvicorn's ANSI-coloured copy of the message
# vLLM's record factory tags every record of a process that runs it with that process's name.
_STANDARD.add("vllm_process_name")
# The loggers of libraries whose INFO lines come once per call: per engine call, per request.
_CHATTY = ("httpx", "httpcore")


def describe(exc: BaseException) -> str:
    """An exception for a log line: its type and message. Not `repr`: redis-py's errors repr as
    `network:ConnectionError` alone, with no host, no "Connection refused", no WRONGTYPE. A
    pydantic error without the input it quotes: a stored user's attributes may be personal
    data."""
    message = problems(exc) if isinstance(exc, ValidationError) else str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def problems(exc: ValidationError, whole: str = "value") -> str:
    """pydantic's errors on one line, without the input they quote (`whole` names an error of
    the whole object), and the rules of ids in words, not their patterns (`schemas.in_words`)."""
    return "; ".join(
        f"{'.'.join(map(str, p['loc'])) or whole}: {in_words(p)}"
        for p in exc.errors(include_input=False, include_url=False)
    )


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.name.startswith("vllm"):
            # Not about a request of ours: vLLM's output task keeps the context of the request
            # that started it, and would tag all its lines with that request's id.
            entry["process"] = getattr(record, "vllm_process_name", record.processName)
        else:
            entry.update(_request_ids())
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _request_ids() -> dict[str, str]:
    ids = {
        "request_id": request_id_var.get(),
        "client_request_id": client_request_id_var.get(),
        "refresh_id": refresh_id_var.get(),
    }
    return {name: value for name, value in ids.items() if value}


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the call (it may be replaced)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def vllm_handler() -> logging.Handler:
    """vLLM's handler (vllm_logging.json), at our level in the engine processes vLLM starts too:
    with a file of ours, vLLM reads no level of its own."""
    handler = StderrHandler()
    handler.setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper())
    return handler


def _dropped(record: logging.LogRecord) -> bool:
    return False


def configure(level: str = "info") -> None:
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter())
    # At the handler too: a library may set its own logger lower when imported (bm25s: DEBUG).
    handler.setLevel(level.upper())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own access log duplicates ours (which carries the request id and route). A
    # filter, not `disabled`: a logging file loaded later (vLLM's, when an engine first starts in
    # this process) enables every logger it does not name.
    logging.getLogger("uvicorn.access").addFilter(_dropped)
    # `uvicorn server.asgi:app` gives uvicorn's loggers plain-text handlers of their own.
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    for name in _CHATTY:
        logging.getLogger(name).setLevel(max(root.level, logging.WARNING))


def configure_vllm() -> None:
    """Before an in-process vLLM starts: it logs in plain text to stdout unless told otherwise,
    in this process and in the engine processes it starts; our file gives both our JSON lines on
    stderr, at our level. Not where vLLM's logging is the operator's: their own file, or
    VLLM_CONFIGURE_LOGGING=0 (with which vLLM refuses any file)."""
    if os.environ.get("VLLM_CONFIGURE_LOGGING", "1") == "0":
        return
    os.environ.setdefault("VLLM_LOGGING_CONFIG_PATH", str(VLLM_LOGGING))
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    os.environ.setdefault("VLLM_LOGGING_LEVEL", level)
