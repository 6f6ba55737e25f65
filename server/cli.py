"""The gateway's commands of the `reasonrec` command line: serve the API, load data. `cli`
mounts them beside the trainer's."""

import asyncio
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
import uvicorn
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from reward_rules.policy import PolicyError
from server import logs
from server.config import Settings, unknown_lines
from server.interrupts import TERMINATED, interruptible
from server.loaders import Dataset, Format, LoadError, read_checked
from server.loaders.jsonl import read_jsonl
from server.loaders.movielens import read_ml100k, read_ml_latest
from server.loaders.synthetic import EVENTS_PER_USER, ITEMS, USERS, fewest_events, generate
from server.loaders.writer import LoadSummary, Written, progress_bar, write
from server.policy import read_policy
from server.store import open_store

app = typer.Typer(help="The gateway: serve the API, load data.", no_args_is_help=True)
# Errors are one line in a log too (80 columns when stderr is no terminal wrapped them).
console = Console(stderr=True, soft_wrap=True)

HostOption = Annotated[str | None, typer.Option(help="Bind address [REASONREC_HOST].")]
# Bounded here too: the settings' own bounds are not checked on an option's value (model_copy),
# and getaddrinfo wraps 70000 round to 4464, so the address check would pass.
PortOption = Annotated[int | None, typer.Option(min=1, max=65535, help="Port [REASONREC_PORT].")]
MAX_SEED = 2**32 - 1  # what numpy's and torch's generators take
SeedOption = Annotated[int, typer.Option(min=0, max=MAX_SEED, help="synthetic: random seed.")]
# `load`'s generator options: None when not given, so that one given to another format is
# refused rather than ignored (defaults: those of `generate`).
UsersOption = Annotated[
    int | None, typer.Option(min=1, help=f"synthetic: number of users (default {USERS}).")
]
ItemsOption = Annotated[
    int | None, typer.Option(min=10, help=f"synthetic: number of items (default {ITEMS}).")
]
# At most 500: a user's events come about a day apart from 2024, and none may lie in the future.
EventsOption = Annotated[
    int | None,
    typer.Option(
        min=1, max=500, help=f"synthetic: mean events per user (default {EVENTS_PER_USER})."
    ),
]
LoadSeedOption = Annotated[
    int | None, typer.Option(min=0, max=MAX_SEED, help="synthetic: random seed (default 7).")
]


def settings_from_env(host: str | None = None, port: int | None = None) -> Settings:
    """The settings, or the command ends (exit 2) naming each REASONREC_* variable that is wrong,
    or that no setting reads."""
    if unknown := unknown_lines():
        for line in unknown:
            console.print(f"[red]error:[/red] {line}", highlight=False)
        raise typer.Exit(2)
    try:
        settings = Settings()
    except ValidationError as exc:
        # One line per variable: a field of two types gets an error for each type it is not.
        wrong = {str(error["loc"][0]): error["msg"] for error in reversed(exc.errors())}
        for field, message in sorted(wrong.items()):
            line = f"[red]error:[/red] REASONREC_{field.upper()}: {message}"
            console.print(line, highlight=False)
        raise typer.Exit(2) from exc
    updates = {key: value for key, value in (("host", host), ("port", port)) if value is not None}
    settings = settings.model_copy(update=updates)
    logs.configure(settings.log_level)
    return settings


@contextmanager
def errors_end_command(*kinds: type[Exception]) -> Iterator[None]:
    """These errors end the command with their message and exit status 1, not a traceback."""
    try:
        yield
    except kinds as exc:
        # escaped: a message such as "pip install 'reasonrec[smollm2]'" is not markup
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from exc


def os_reason(exc: OSError) -> str:
    """An OSError as a person reads it: "Permission denied", without Python's "[Errno 13]"."""
    return exc.strerror or str(exc)


def check_address(settings: Settings) -> None:
    """End the command now, not after loading, training and starting vLLM, when the address it
    would serve on is taken (the server binds only once it has started everything). Every
    address the host resolves to, as the server binds them all (localhost: ::1 and 127.0.0.1)."""
    try:
        for family, kind, _, _, address in socket.getaddrinfo(
            settings.host, settings.port, type=socket.SOCK_STREAM
        ):
            with socket.socket(family, kind) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
                probe.bind(address)
    except OSError as exc:
        reason = os_reason(exc)
        # An address is neither markup nor emoji codes (":-1:" was printed as one).
        address = escape(f"{settings.host}:{settings.port}: {reason}")
        console.print(f"[red]error:[/red] cannot serve on {address}", emoji=False)
        raise typer.Exit(1) from exc


def check_policy_file(settings: Settings) -> None:
    """End the command now on a policy file that is missing or invalid: read when the server
    starts or a refresh trains, its problems were a traceback in the startup log or came after
    a refresh had been skipped for other reasons."""
    with errors_end_command(PolicyError, OSError):
        read_policy(settings.policy_file)


def _check_inputs(fmt: Format, path: Path | None, synthetic: dict[str, int]) -> None:
    """Refuse what the format would ignore: a load of other data than the operator named would
    otherwise pass unnoticed. `synthetic`: the generator's options given."""
    if fmt is not Format.synthetic and path is None:
        raise typer.BadParameter(f"--format {fmt} needs a PATH", param_hint="PATH")
    if fmt is Format.synthetic and path is not None:
        raise typer.BadParameter(
            "--format synthetic generates its data and reads no PATH", param_hint="PATH"
        )
    if synthetic and fmt is not Format.synthetic:
        given = ", ".join("--" + name.replace("_", "-") for name in synthetic)
        raise typer.BadParameter(
            f"{given} only apply to --format synthetic, not {fmt}", param_hint="--format"
        )


def _read(fmt: Format, path: Path | None, synthetic: dict[str, int], maxlen: int) -> Dataset:
    if fmt is Format.synthetic:
        # Before it is made: a size the stream cannot keep took minutes and GBs to refuse.
        sizes = {
            name: synthetic[name] for name in ("users", "events_per_user") if name in synthetic
        }
        _check_fits(fewest_events(**sizes), maxlen, about="at least ")
        return generate(**synthetic)
    assert path is not None  # refused by _check_inputs
    readers = {
        Format.ml_100k: read_ml100k,
        Format.ml_latest: read_ml_latest,
        Format.jsonl: read_jsonl,
    }
    return read_checked(readers[fmt], path, fmt)


def _check_fits(events: int, maxlen: int, about: str = "") -> None:
    """Refuse a data set the events stream would trim: training would read only its newest
    events, and a later load could not add the others (loaded event ids are remembered)."""
    if maxlen and events > maxlen:
        raise LoadError(
            f"the data set holds {about}{events} events, more than the events stream keeps "
            f"(REASONREC_EVENTS_MAXLEN={maxlen}): set it to 0 (keep all) or higher, for the "
            "gateways too (each event they add trims it); nothing was written"
        )


async def load_dataset(
    settings: Settings,
    dataset: Dataset,
    only_if_empty: bool = False,
    written: Written | None = None,
) -> LoadSummary | None:
    """Write `dataset`, `written` following how far it got; with `only_if_empty`, None (nothing
    written) when the store already holds a catalog, unless a load was cut short there (it is
    written again)."""
    _check_fits(dataset.event_count, settings.events_maxlen)
    async with open_store(settings) as store:
        if only_if_empty and await store.count_items() and not await store.load_unfinished():
            return None
        # Inside the loop: `asyncio.run` puts its own Ctrl-C handler in place as it starts.
        with progress_bar(console) as progress, interruptible(sigterm=True):
            return await write(store, dataset, progress, written)


def serve_with(settings: Settings) -> None:
    """Serve the API in this process with these settings, until interrupted."""
    from server.app import create_app  # the web app: only for the commands that serve it

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None)


@app.command()
def serve(
    host: HostOption = None,
    port: PortOption = None,
    workers: Annotated[int | None, typer.Option(min=1, max=64, help="[REASONREC_WORKERS]")] = None,
) -> None:
    """Serve the HTTP API (OpenAPI docs at /docs)."""
    settings = settings_from_env(host, port)
    workers = workers or settings.workers
    if workers > 1 and not settings.engine_url:
        console.print(
            f"[red]error:[/red] {workers} workers need a remote engine (REASONREC_ENGINE_URL): "
            "each would start its own in-process vLLM, holding the model that many times"
        )
        raise typer.Exit(2)
    check_address(settings)
    check_policy_file(settings)
    if workers == 1:
        serve_with(settings)
    else:
        # Several processes need an import string; each worker reads the environment itself.
        uvicorn.run(
            "server.asgi:app",
            host=settings.host,
            port=settings.port,
            workers=workers,
            log_config=None,
        )


def interrupted_load(written: Written) -> str:
    """What an interrupted load left: nothing is written before every event is checked."""
    if not written.began:
        return "nothing was written (a load checks every event before it writes)"
    return (
        f"the store holds part of this load ({written.events} event(s) written); run the same "
        "load again to finish it (what was written is not written twice)"
    )


@app.command()
def load(
    path: Annotated[
        Path | None, typer.Argument(metavar="PATH", help="File or folder to load.")
    ] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="Input format.")] = Format.jsonl,
    users: UsersOption = None,
    items: ItemsOption = None,
    events_per_user: EventsOption = None,
    seed: LoadSeedOption = None,
) -> None:
    """Load a catalog, users and interactions. Loading the same data twice changes nothing."""
    options = {"users": users, "items": items, "events_per_user": events_per_user, "seed": seed}
    synthetic = {name: value for name, value in options.items() if value is not None}
    _check_inputs(fmt, path, synthetic)
    settings = settings_from_env()
    started = time.perf_counter()
    written = Written()
    try:
        with errors_end_command(LoadError, OSError):
            dataset = _read(fmt, path, synthetic, settings.events_maxlen)
            summary = asyncio.run(load_dataset(settings, dataset, written=written))
    except KeyboardInterrupt:
        stopped = "terminated (SIGTERM)" if TERMINATED.is_set() else "interrupted"
        console.print(f"[yellow]{stopped}:[/yellow] {interrupted_load(written)}")
        raise typer.Exit(143 if TERMINATED.is_set() else 130) from None
    console.print(
        f"loaded {summary.items} items, {summary.users} users, {summary.events} new events "
        f"({summary.duplicates} already there) in {time.perf_counter() - started:.1f}s"
    )
    if summary.trimmed:  # the size check sees this load's events, not those already there
        console.print(
            f"[yellow]warning:[/yellow] the events stream dropped its {summary.trimmed} oldest "
            f"events to keep about REASONREC_EVENTS_MAXLEN={settings.events_maxlen}: training no "
            "longer reads them, and loading them again adds nothing (raise it, or 0: keep all)"
        )
