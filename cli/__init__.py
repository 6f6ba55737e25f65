"""The `reasonrec` command line: the gateway's commands (`server.cli`), the trainer's
(`trainer.cli`) and the demo, which uses both. The top of the import graph: nothing imports it."""

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from redis.exceptions import AuthenticationError, InvalidResponse, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rich.markup import escape

from contract.tasks import Task
from reward_rules.policy import PolicyError
from server import cli as gateway
from server.cli import (
    HostOption,
    PortOption,
    SeedOption,
    check_address,
    check_policy_file,
    console,
    errors_end_command,
    load_dataset,
    os_reason,
    serve_with,
    settings_from_env,
)
from server.config import Settings
from server.loaders import Format, LoadError, read_checked
from server.loaders.movielens import read_ml100k
from server.loaders.synthetic import generate
from server.registry import Registry, RegistryError
from server.store import open_store
from trainer import cli as training
from trainer.cli import PresetOption, check_preset, run_bootstrap
from trainer.corpus import NotEnoughData
from trainer.device import DeviceError

if TYPE_CHECKING:
    from trainer.bootstrap import BootstrapResult

app = typer.Typer(
    help="reasonrec: recommendations ranked by a reasoning LLM.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
# Commands copied rather than mounted with add_typer: a mounted app becomes a named group, and
# `reasonrec serve` would turn into `reasonrec gateway serve`.
for part in (gateway.app, training.app):
    app.registered_commands += part.registered_commands
    app.registered_groups += part.registered_groups

DEMO_LLM_TIMEOUT_MS = 15_000
DEMO_TASKS = frozenset({Task.rank, Task.rate})  # one model answers /v1/recommend and /v1/rate


async def _ensure_model(settings: Settings, preset: str) -> "BootstrapResult | None":
    """Bootstrap unless a version is active or one was trained before (a version the gate kept
    from activation is not retrained at every start: `reasonrec models activate` serves it)."""
    registry = Registry(settings.registry_path)
    async with open_store(settings) as store:
        version = await store.active_model()
    if version and registry.has(version):
        return None
    if version:  # a registry emptied (`make clean`) under a Redis that outlived it
        console.print(f"the active version {version} is not in the registry {registry.root}")
    if registry.versions():
        console.print("no active model: serving the retrieval order (see `reasonrec models list`)")
        return None
    # The demo is there to show the model path, so its model serves even when the gate finds it
    # worse than the retrieval order on its few validation users (the verdict is printed).
    # `reasonrec bootstrap` activates only what passes.
    return await run_bootstrap(settings, preset, seed=0, force=True, tasks=DEMO_TASKS)


@app.command()
def demo(
    host: HostOption = None,
    port: PortOption = None,
    seed: SeedOption = 7,
    data: Annotated[
        Path | None, typer.Option(help="Load MovieLens 100K from this folder, not synthetic data.")
    ] = None,
    preset: PresetOption = "tiny",
) -> None:
    """Load data if the store is empty, bootstrap a model if the registry holds none, then serve.

    The demo trains the tiny preset to rank and to rate (about 2 minutes on the synthetic set, 2
    cores); `--preset default` trains the larger model.
    """
    check_preset(preset, takes_base=False)
    settings = settings_from_env(host, port)
    check_address(settings)
    check_policy_file(settings)
    if "REASONREC_LLM_TIMEOUT_MS" not in os.environ:
        # Interactive: a first request that compiles its answer grammar on a busy laptop CPU
        # should wait for the model rather than fall back (measured over 3 s in a test run).
        settings = settings.model_copy(update={"llm_timeout_ms": DEMO_LLM_TIMEOUT_MS})
    with errors_end_command(LoadError):
        dataset = read_checked(read_ml100k, data, Format.ml_100k) if data else generate(seed=seed)
        summary = asyncio.run(load_dataset(settings, dataset, only_if_empty=True))
    if summary:
        console.print(
            f"loaded {summary.items} items, {summary.users} users, {summary.events} events"
        )
    elif data:
        console.print(f"the store already holds a catalog: {data} was not loaded")
    # As `reasonrec bootstrap`: a missing GPU or policy file is the operator's to fix.
    with errors_end_command(NotEnoughData, PolicyError, RegistryError, DeviceError, OSError):
        trained = asyncio.run(_ensure_model(settings, preset))
    if trained:
        console.print(f"bootstrapped model {trained.version} in {trained.seconds:.0f}s")
        console.print(trained.gate, highlight=False)
    user, item = asyncio.run(_sample_ids(settings))
    # Plain stdout, no wrapping: the curl lines must paste as they are.
    typer.echo(_demo_instructions(settings, user, item))
    serve_with(settings)


async def _sample_ids(settings: Settings) -> tuple[str, str]:
    """A user and an item of the store, for the sample requests (the store may hold data loaded
    before, not the dataset of this run)."""
    async with open_store(settings) as store:
        users, items = await store.user_ids(), await store.item_ids()
    return (users[0] if users else "u1"), (items[0] if items else "i1")


def _demo_instructions(settings: Settings, user: str, item: str) -> str:
    base = f"http://{settings.host}:{settings.port}"
    auth = f" -H 'X-API-Key: {settings.api_keys[0]}'" if settings.api_keys else ""
    json = " -H 'Content-Type: application/json'"
    return (
        f"\nreasonrec is starting on {base} (API docs: {base}/docs). Try:\n\n"
        f'  curl -s{auth}{json} -X POST {base}/v1/recommend -d \'{{"user_id": "{user}"}}\'\n'
        f"  curl -s{auth}{json} -X POST {base}/v1/rate"
        f' -d \'{{"user_id": "{user}", "item_ids": ["{item}"], "explain": true}}\'\n'
        f"  curl -s{auth} {base}/v1/users/{user}\n"
    )


def _describe(exc: OSError) -> str:
    """A line such as `/srv/var/indexes: Permission denied`."""
    if exc.strerror and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return os_reason(exc)


def main() -> None:
    """The `reasonrec` command: a Redis that does not answer, or a file or folder that cannot be
    written (a data directory that is a file, a read-only disk), is one line, not a traceback.
    Commands that expect an OSError end with their own message before it gets here."""
    try:
        app()
    except AuthenticationError as exc:  # a ConnectionError to redis-py, though Redis answered
        console.print(
            f"[red]error:[/red] Redis refused the credentials: {escape(str(exc))} (the password "
            "goes in REASONREC_REDIS_URL: redis://:PASSWORD@host:port/db)",
            highlight=False,
        )
        raise SystemExit(1) from exc
    except (RedisConnectionError, RedisTimeoutError) as exc:
        console.print(f"[red]error:[/red] Redis did not answer: {exc}", highlight=False)
        raise SystemExit(1) from exc
    except (ResponseError, InvalidResponse) as exc:  # no such database; a port that is no Redis
        console.print(f"[red]error:[/red] Redis refused: {escape(str(exc))}", highlight=False)
        raise SystemExit(1) from exc
    except OSError as exc:
        console.print(f"[red]error:[/red] {escape(_describe(exc))}", highlight=False)
        raise SystemExit(1) from exc
