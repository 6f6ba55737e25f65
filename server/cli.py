"""The `reasonrec` command line: serve the API, load data, run the demo."""

import asyncio
import time
from pathlib import Path
from typing import Annotated

import typer
import uvicorn
from rich.console import Console

from server import logs
from server.app import build_store, create_app
from server.config import Settings
from server.loaders import Dataset, Format, LoadError
from server.loaders.jsonl import read_jsonl
from server.loaders.movielens import read_ml100k, read_ml_latest
from server.loaders.synthetic import generate
from server.loaders.writer import LoadSummary, progress_bar, write
from server.redis_client import connect

app = typer.Typer(
    help="reasonrec: recommendations ranked by a reasoning LLM.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)

HostOption = Annotated[str | None, typer.Option(help="Bind address [REASONREC_HOST].")]
PortOption = Annotated[int | None, typer.Option(help="Port [REASONREC_PORT].")]
UsersOption = Annotated[int, typer.Option(min=1, help="synthetic: number of users.")]
ItemsOption = Annotated[int, typer.Option(min=10, help="synthetic: number of items.")]
EventsOption = Annotated[int, typer.Option(min=1, help="synthetic: mean events per user.")]
SeedOption = Annotated[int, typer.Option(help="synthetic: random seed.")]


def _settings(host: str | None = None, port: int | None = None) -> Settings:
    settings = Settings()
    updates = {key: value for key, value in (("host", host), ("port", port)) if value is not None}
    settings = settings.model_copy(update=updates)
    logs.configure(settings.log_level)
    return settings


def _read(
    fmt: Format, path: Path | None, users: int, items: int, events: int, seed: int
) -> Dataset:
    if fmt is Format.synthetic:
        return generate(users=users, items=items, events_per_user=events, seed=seed)
    if path is None:
        raise LoadError(f"--format {fmt} needs a PATH")
    readers = {
        Format.ml_100k: read_ml100k,
        Format.ml_latest: read_ml_latest,
        Format.jsonl: read_jsonl,
    }
    return readers[fmt](path)


async def _load(
    settings: Settings, dataset: Dataset, only_if_empty: bool = False
) -> LoadSummary | None:
    handle = connect(settings)
    try:
        store = build_store(settings, handle.client)
        if only_if_empty and await store.count_items():
            return None
        with progress_bar(console) as progress:
            return await write(store, dataset, progress)
    finally:
        await handle.close()


@app.command()
def serve(
    host: HostOption = None,
    port: PortOption = None,
    workers: Annotated[int | None, typer.Option(min=1, help="[REASONREC_WORKERS]")] = None,
) -> None:
    """Serve the HTTP API (OpenAPI docs at /docs)."""
    settings = _settings(host, port)
    workers = workers or settings.workers
    if workers == 1:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None)
    else:
        # Several processes need an import string; each worker reads the environment itself.
        uvicorn.run(
            "server.asgi:app",
            host=settings.host,
            port=settings.port,
            workers=workers,
            log_config=None,
        )


@app.command()
def load(
    path: Annotated[Path | None, typer.Argument(help="File or folder to load.")] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="Input format.")] = Format.jsonl,
    users: UsersOption = 300,
    items: ItemsOption = 600,
    events_per_user: EventsOption = 40,
    seed: SeedOption = 7,
) -> None:
    """Load a catalog, users and interactions. Loading the same data twice changes nothing."""
    settings = _settings()
    started = time.perf_counter()
    try:
        dataset = _read(fmt, path, users, items, events_per_user, seed)
        summary = asyncio.run(_load(settings, dataset))
    except (LoadError, OSError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(
        f"loaded {summary.items} items, {summary.users} users, {summary.events} new events "
        f"({summary.duplicates} already there) in {time.perf_counter() - started:.1f}s"
    )


@app.command()
def demo(host: HostOption = None, port: PortOption = None, seed: SeedOption = 7) -> None:
    """Load the synthetic data set if the store is empty, then serve."""
    settings = _settings(host, port)
    summary = asyncio.run(_load(settings, generate(seed=seed), only_if_empty=True))
    if summary:
        console.print(f"loaded the synthetic set: {summary.items} items, {summary.users} users")
    # Plain stdout, no wrapping: the curl lines must paste as they are.
    typer.echo(_demo_instructions(settings))
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None)


def _demo_instructions(settings: Settings) -> str:
    base = f"http://{settings.host}:{settings.port}"
    auth = f" -H 'X-API-Key: {settings.api_keys[0]}'" if settings.api_keys else ""
    event = '{"events": [{"user_id": "u00001", "item_id": "i00042", "type": "click"}]}'
    return (
        f"\nreasonrec is starting on {base} (API docs: {base}/docs). Try:\n\n"
        f"  curl -s{auth} {base}/v1/users/u00001\n"
        f"  curl -s{auth} -X POST {base}/v1/feedback -H 'Content-Type: application/json' "
        f"-d '{event}'\n"
    )
