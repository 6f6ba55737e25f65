"""The trainer's commands of the `reasonrec` command line: index, bootstrap, train, trainer,
models, eval, policy. `cli` mounts them beside the gateway's."""

import asyncio
import os
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.markup import escape

from contract.tasks import Task
from reward_rules.policy import PolicyError
from server.cli import (
    MAX_SEED,
    check_policy_file,
    console,
    errors_end_command,
    os_reason,
    settings_from_env,
)
from server.config import Settings
from server.interrupts import TERMINATED, interruptible
from server.loaders import LoadError
from server.registry import (
    REGISTERED,
    Manifest,
    Registry,
    RegistryError,
    check_contract,
    has_chat_template,
    new_version,
    servable,
)
from server.schemas import EventType
from server.store import BeingRemoved, open_store
from trainer.corpus import INTERACTIONS, NotEnoughData
from trainer.device import DeviceError
from trainer.evaluation.split import EvalFormat, Split, read_eval_data
from trainer.presets import PRESETS, Recipe
from trainer.prune import PruneBusy, prune

if TYPE_CHECKING:
    from trainer.bootstrap import BootstrapResult
    from trainer.refresh import RefreshResult

app = typer.Typer(help="Training, the registry and evaluation.", no_args_is_help=True)
models = typer.Typer(help="The model registry.", no_args_is_help=True)
app.add_typer(models, name="models")
policies = typer.Typer(
    help="Business policy files: reward weights and hard constraints.", no_args_is_help=True
)
app.add_typer(policies, name="policy")

PresetOption = Annotated[str, typer.Option(help=f"Training preset: {', '.join(PRESETS)}.")]
EXIT_TERMINATED = 128 + signal.SIGTERM
T = TypeVar("T")


def run_stoppable(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, where SIGTERM (`docker stop`, a pod deleted) stops as Ctrl-C does: the main
    task is cancelled, so a refresh stops its training at the next step and gives the lock back.
    Left to its default, SIGTERM kills the process at once (or, as a container's PID 1, is ignored
    until the SIGKILL after the grace period), mid-refresh, with the lock held."""

    terminated = False

    async def guarded() -> T:
        loop, task = asyncio.get_running_loop(), asyncio.current_task()

        def stop() -> None:
            nonlocal terminated
            terminated = True
            # A second SIGTERM kills at once, as a second Ctrl-C does.
            loop.remove_signal_handler(signal.SIGTERM)
            if task is not None:
                task.cancel()

        loop.add_signal_handler(signal.SIGTERM, stop)
        return await main

    try:
        result = asyncio.run(guarded())
    except asyncio.CancelledError:
        if not terminated:
            raise
    else:
        if not terminated:
            return result
    console.print("[yellow]stopped (SIGTERM)[/yellow]")
    raise typer.Exit(EXIT_TERMINATED)


def _unwritable(path: Path) -> str | None:
    """Why no file can be written at `path`, if none can (checked before hours of work, not
    after). Opened for real: the folder's permission bits pass for root and say nothing of the
    file itself (read-only, a /proc entry); a file the probe creates is removed again."""
    if path.exists() and not path.is_file() and not path.is_dir():
        # A FIFO or a device: opened for writing, a FIFO would block until a reader came.
        return None if os.access(path, os.W_OK) else "not writable"
    existed = os.path.lexists(path)  # a dangling link: its target is created, not removed
    try:
        with path.open("a"):
            pass
    except OSError as exc:
        return os_reason(exc)
    if not existed:
        path.unlink(missing_ok=True)
    return None


def check_preset(preset: str, base: str | None = None, takes_base: bool = True) -> None:
    """`base`: the pretrained model it trains on, if any; `takes_base`: whether the command has
    a --base option to name one."""
    if preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if PRESETS[preset].base_only and base is None:
        instead = "give --base (e.g. --base smollm2), or" if takes_base else "choose"
        raise typer.BadParameter(
            f"preset {preset!r} trains adapters on a pretrained model: {instead} an embedded "
            "model's preset",
            param_hint="--preset",
        )


def rate_recipe(recipe: Recipe | None, tasks: frozenset[Task]) -> Recipe:
    """The rating recipe; one given without the rating task would be ignored."""
    if recipe is not None and Task.rate not in tasks:
        raise typer.BadParameter(
            "it chooses how rating is learnt: give it with --task rate", param_hint="--recipe"
        )
    return recipe or Recipe.one


TaskOption = Annotated[
    list[Task] | None,
    typer.Option(
        "--task",
        help="What the model learns: rank (POST /v1/recommend), rate (POST /v1/rate), search "
        "(POST /v1/search, against REASONREC_SEARCH_RETRIEVER); repeat the option for several. "
        "Default: rank.",
    ),
]
RecipeOption = Annotated[
    Recipe | None,
    typer.Option(
        help="How it learns to rate (with --task rate): zero (RecZero, GRPO only) or one (RecOne, "
        "SFT then GRPO). Default: one.",
        show_default=False,
    ),
]


async def run_bootstrap(
    settings: Settings,
    preset: str,
    seed: int,
    force: bool = False,
    tasks: frozenset[Task] = frozenset({Task.rank}),
    recipe: Recipe = Recipe.one,
    base: str | None = None,
) -> "BootstrapResult":
    from trainer.bootstrap import bootstrap  # torch, TRL: loaded only by commands that train

    async with open_store(settings) as store:
        return await bootstrap(
            settings, store, preset, seed=seed, force=force, tasks=tasks, recipe=recipe, base=base
        )


async def _rebuild_index(settings: Settings, dim: int) -> str:
    # Ctrl-C at once, from the imports on: under asyncio.run alone it was lost in the store's
    # read, and the index the operator meant to stop was made current.
    with interruptible():
        from trainer.bootstrap import index_corpus
        from trainer.corpus import read_corpus

        async with open_store(settings) as store:
            corpus = await read_corpus(store)
        if not corpus.items:  # a wrong Redis URL or prefix would replace a good index
            raise NotEnoughData(
                "the store holds no items: nothing indexed (is REASONREC_REDIS_URL "
                "or REASONREC_KEY_PREFIX the deployment's?)"
            )
        return index_corpus(corpus, settings, dim).version


@app.command("index")
def index_command(dim: Annotated[int, typer.Option(min=2, help="Item vector size.")] = 64) -> None:
    """Rebuild the candidate index from the store's catalog and interactions (new items, new
    feedback) and make it current; gateways load it within 30 s, without a restart."""
    settings = settings_from_env()
    try:
        with errors_end_command(NotEnoughData):
            typer.echo(asyncio.run(_rebuild_index(settings, dim)))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted:[/yellow] an index is made current only once built")
        raise typer.Exit(130) from None


BaseOption = Annotated[
    str | None,
    typer.Option(
        help="A pretrained version of the registry (e.g. from `models import-gguf`), or "
        "`smollm2` (the packaged SmolLM2, imported on first use), to train LoRA adapters on "
        "instead of the embedded model: rich prompts in its chat template, ranking only; "
        "published as a LoRA version of it. Use --preset pretrained.",
    ),
]


def _base_version(settings: Settings, base: str, tasks: frozenset[Task]) -> str:
    """The registry version `--base` names, a packaged model's imported when needed."""
    from trainer.base import ONLY_RANKING, base_manifest  # heavy; the command trains next
    from trainer.gguf_import import PACKAGED, packaged_version

    registry = Registry(settings.registry_path)
    if tasks != {Task.rank}:  # before importing: minutes of work for nothing
        raise typer.BadParameter(ONLY_RANKING, param_hint="--base")
    try:
        if base in PACKAGED and not registry.has(base):
            with console.status(f"importing {base}"):
                base = packaged_version(registry, base, settings.prompt_history)
        check_contract(base_manifest(registry, base, tasks))
    except RegistryError as exc:
        raise typer.BadParameter(str(exc), param_hint="--base") from exc
    return base


@app.command("bootstrap")
def bootstrap_command(
    preset: PresetOption = "default",
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED)] = 0,
    force: Annotated[
        bool,
        typer.Option(help="Activate even a model that does worse than its fallback."),
    ] = False,
    task: TaskOption = None,
    recipe: RecipeOption = None,
    base: BaseOption = None,
):
    """Train the embedded model (index, tokenizer, pretraining, then each task's SFT and GRPO) on
    the store's data, or LoRA adapters on a pretrained base (--base), publish it, and activate it
    if none is active and it beats its fallback on every task (the retrieval order for ranking,
    the lean baseline for rating, the last item's title as the query for search)."""
    check_preset(preset, base)
    settings = settings_from_env()
    tasks = frozenset(task or [Task.rank])
    recipe = rate_recipe(recipe, tasks)
    if base:
        base = _base_version(settings, base, tasks)
    # Nothing published, serving unchanged.
    # Disk full and a missing GPU are the operator's to fix: one line, not a traceback.
    with errors_end_command(NotEnoughData, PolicyError, RegistryError, DeviceError, OSError):
        result = asyncio.run(run_bootstrap(settings, preset, seed, force, tasks, recipe, base))
    console.print(f"[bold]{result.gate}[/bold]", highlight=False)
    typer.echo(result.model_dump_json(indent=2))


EXIT_REJECTED, EXIT_SKIPPED, EXIT_BUSY = 3, 4, 5


async def _refresh(settings: Settings, force: bool) -> "RefreshResult":
    from trainer.refresh import refresh_once  # torch, TRL: loaded only by commands that train

    async with open_store(settings) as store:
        return await refresh_once(settings, store, force=force)


@app.command("train")
def train_command(
    once: Annotated[
        bool, typer.Option("--once", help="One refresh, then exit (required).")
    ] = False,
    force: Annotated[
        bool,
        typer.Option(help="Publish a candidate even if it ranks worse than the retrieval order."),
    ] = False,
) -> None:
    """The offline retrain job: logged feedback -> GRPO from the active model -> gate -> publish.

    Prints a JSON summary. Exit status: 0 published, 3 rejected by the gate, 4 skipped (no active
    model, too little logged feedback, no reward signal to learn from, the refresh lock lost
    before publishing, or the base of its adapter pruned while it trained), 5 another refresh is
    running, 143 stopped by SIGTERM, 1 on error.
    """
    if not once:
        raise typer.BadParameter("use --once (the scheduled loop is `reasonrec trainer`)")
    from trainer.refresh import RefreshBusy

    settings = settings_from_env()
    check_policy_file(settings)
    try:
        # exit status 1, as documented for an error: the active version gone from the registry,
        # a missing GPU or policy file, a full disk
        with errors_end_command(RegistryError, DeviceError, PolicyError, OSError):
            result = run_stoppable(_refresh(settings, force))
    except RefreshBusy as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(EXIT_BUSY) from exc
    typer.echo(result.model_dump_json(indent=2))
    codes = {"published": 0, "rejected": EXIT_REJECTED, "skipped": EXIT_SKIPPED}
    raise typer.Exit(codes[result.outcome])


@app.command("trainer")
def trainer_command() -> None:
    """The trainer sidecar: refresh every REASONREC_REFRESH_SECONDS, or sooner once
    REASONREC_REFRESH_MIN_EVENTS new events arrived; metrics on REASONREC_TRAINER_METRICS_PORT."""
    from trainer.sidecar import run_sidecar

    settings = settings_from_env()
    check_policy_file(settings)
    run_stoppable(run_sidecar(settings))


async def _activate(settings: Settings, version: str) -> None:
    async with open_store(settings) as store:
        with errors_end_command(BeingRemoved):
            await store.set_active_model(version)


@models.command("list")
def list_models() -> None:
    """Versions in the registry, oldest first, and which one is active."""
    settings = settings_from_env()

    async def active() -> str | None:
        async with open_store(settings) as store:
            return await store.active_model()

    current = asyncio.run(active())
    registry = Registry(settings.registry_path)
    for manifest in registry.versions():
        mark = "*" if manifest.version == current else " "
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in manifest.metrics.items())
        typer.echo(f"{mark} {manifest.version}  {manifest.kind}  {metrics}")
    if current is not None and not registry.has(current):
        # Gateways then serve the retrieval order, and refreshes fail: say why.
        where = escape(f"{current} is not in the registry {registry.root}")
        console.print(
            f"[yellow]warning:[/yellow] the active version {where}: activate one that is "
            "(`reasonrec models activate VERSION`)"
        )


@models.command("register")
def register_model(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="A Hugging Face causal LM folder.")],
    activate: Annotated[bool, typer.Option(help="Serve it from now on.")] = False,
) -> None:
    """Copy any Hugging Face causal LM folder into the registry as a new version (its prompts
    show REASONREC_PROMPT_HISTORY recent items)."""
    settings = settings_from_env()
    manifest = Manifest(
        version=new_version(),
        chat_template=has_chat_template(path),
        prompt_history=settings.prompt_history,
        training={"method": REGISTERED, "source": str(path)},
    )
    _ping_if(activate, settings)
    with errors_end_command(RegistryError):
        Registry(settings.registry_path).register(path, manifest)
    _added(settings, manifest.version, activate)


@models.command("import-gguf")
def import_gguf_command(
    source: Annotated[
        str,
        typer.Argument(
            metavar="GGUF",
            help="A .gguf file (llama.cpp's format), or `smollm2`: the SmolLM2-135M-Instruct "
            "that the `smollm2` extra installs.",
        ),
    ],
    activate: Annotated[bool, typer.Option(help="Serve it from now on.")] = False,
) -> None:
    """Convert a GGUF causal LM (weights dequantised to float32, its tokenizer and chat
    template) into the registry as a new version; prints the version. Its prompts show
    REASONREC_PROMPT_HISTORY recent items."""
    from trainer.gguf_import import import_gguf, resolve_gguf  # transformers: heavy

    settings = settings_from_env()
    _ping_if(activate, settings)
    with errors_end_command(RegistryError):
        path = resolve_gguf(source)
        with console.status(f"converting {path.name}"):
            registry = Registry(settings.registry_path)
            manifest = import_gguf(registry, path, settings.prompt_history)
    _added(settings, manifest.version, activate)


def _ping_if(activate: bool, settings: Settings) -> None:
    """Before a copy that can take minutes: a Redis that does not answer would leave the
    version registered and not activated."""
    if activate:

        async def ping() -> None:
            async with open_store(settings) as store:
                await store.ping()

        asyncio.run(ping())


def _added(settings: Settings, version: str, activate: bool) -> None:
    """A version is in the registry: serve it if asked, and print it."""
    typer.echo(version)  # first: if activating fails, the operator still has its name
    if activate:
        asyncio.run(_activate(settings, version))


@models.command("activate")
def activate_model(version: Annotated[str, typer.Argument(metavar="VERSION")]) -> None:
    """Make VERSION the active model; running gateways swap to it without a restart."""
    settings = settings_from_env()
    with errors_end_command(RegistryError):
        servable(Registry(settings.registry_path), version)
    asyncio.run(_activate(settings, version))


@models.command("prune")
def prune_models(
    keep: Annotated[
        int | None,
        typer.Option(min=1, help="Trained versions to keep. Default: REASONREC_KEEP_VERSIONS."),
    ] = None,
) -> None:
    """Remove all but the newest trained versions (a refresh does this after each publish); the
    active and the previous version, the bases of kept adapters and versions brought in
    (register, import-gguf) stay. Prints each removed version."""
    settings = settings_from_env()
    keep = settings.keep_versions if keep is None else keep

    async def pruned() -> None:
        async with open_store(settings) as store:
            await prune(Registry(settings.registry_path), store, keep, on_removed=typer.echo)

    try:
        # SIGTERM as Ctrl-C: the version being removed is finished, the lock given back.
        with errors_end_command(OSError, RegistryError):
            run_stoppable(pruned())
    except PruneBusy as exc:
        console.print(f"[red]error:[/red] {exc}; run it again once that one ends")
        raise typer.Exit(EXIT_BUSY) from exc


def _eval_format_help() -> str:
    counted = ", ".join(kind for kind in EventType if kind in INTERACTIONS)
    ignored = ", ".join(kind for kind in EventType if kind not in INTERACTIONS)
    return (
        "ml-100k: a MovieLens 100K folder (u.data, u.item, u.user, u.genre); ml-latest: a "
        "MovieLens folder (ratings.csv, movies.csv, optional tags.csv); jsonl: a `reasonrec load` "
        f"file. Interactions are {counted} events (a rating of any value); {ignored} are ignored."
    )


def _unseen(settings: Settings, version: str, split: Split, option: str) -> Manifest:
    """The version's manifest, if this gateway speaks its contract and it saw none of the
    split's tests (a bad `option` otherwise)."""
    try:
        manifest = Registry(settings.registry_path).manifest(version)
        check_contract(manifest)
        split.check_unseen(manifest)
    except (RegistryError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from exc
    return manifest


def _check_evaluated(settings: Settings, version: str, split: Split, tasks: frozenset) -> None:
    manifest = _unseen(settings, version, split, "--model")
    if Task.search in tasks:
        raise typer.BadParameter(
            "--task search compares a bootstrap's stages; it cannot evaluate a given version",
            param_hint="--model",
        )
    if missing := sorted(tasks - set(manifest.tasks)):
        raise typer.BadParameter(
            f"model {version} was not trained for {', '.join(missing)} (its tasks: "
            f"{', '.join(manifest.tasks)})",
            param_hint="--model",
        )


@app.command("eval")
def eval_command(
    path: Annotated[
        Path,
        typer.Argument(
            metavar="PATH", help="The data: a folder (ml-100k, ml-latest) or a .jsonl file."
        ),
    ],
    fmt: Annotated[
        EvalFormat, typer.Option("--format", help=_eval_format_help())
    ] = EvalFormat.ml_100k,
    users: Annotated[int | None, typer.Option(min=1, help="Evaluate N sampled users.")] = None,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Sampling and training seed.")] = 0,
    preset: PresetOption = "default",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
    task: Annotated[
        list[Task] | None,
        typer.Option(
            "--task",
            help="rank: NDCG/HR/ILD/novelty of lists; rate: MAE/RMSE of ratings; search: the same "
            "list metrics for the model's queries (after SFT and as published) sent to "
            "REASONREC_SEARCH_RETRIEVER; repeat the option to train one model for several (as the "
            "demo does) and report each. Default: rank.",
        ),
    ] = None,
    recipe: RecipeOption = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Evaluate this version of the registry as it is instead of bootstrapping one: "
            "a version trained on this data's eval split, or one brought in untrained on it "
            "(`models register`, `models import-gguf`), e.g. a pretrained LM zero-shot.",
        ),
    ] = None,
    base: BaseOption = None,
    stages: Annotated[
        bool,
        typer.Option(
            help="With --base: also serve the base untrained (zero-shot) and the adapters after "
            "SFT, before GRPO (three passes through vLLM instead of one).",
        ),
    ] = True,
) -> None:
    """Offline evaluation (EVAL.md protocol). rank: reasonrec vs retrieval, popularity, item-kNN,
    the last item's title as a search query; search: the model's queries vs that raw query; rate:
    reasonrec (RecZero or RecOne) vs mean, bias and matrix-factorisation baselines."""
    check_preset(preset, base or model)  # a given model's preset is unused
    if json_out is not None and (reason := _unwritable(json_out)):
        # checked now: the report would be lost after hours of evaluation
        raise typer.BadParameter(f"{json_out} cannot be written: {reason}", param_hint="--json")
    try:
        data = read_eval_data(path, fmt)  # before the heavy imports: bad data fails fast
    except LoadError as exc:
        raise typer.BadParameter(str(exc), param_hint="PATH") from exc
    tasks = frozenset(task or [Task.rank])
    recipe = rate_recipe(recipe, tasks)
    if Task.rate in tasks and (unrated := data.unrated_tests(data.split.users)):
        raise typer.BadParameter(
            f"--task rate needs ratings: the last interaction of {len(unrated)} users "
            f"(e.g. {', '.join(unrated[:3])}) has no rating value",
            param_hint="PATH",
        )
    settings = settings_from_env()
    if model and base:
        raise typer.BadParameter("give --model (evaluate it) or --base (train on it), not both")
    if model:
        _check_evaluated(settings, model, data.split, tasks)
    if base:
        base = _base_version(settings, base, tasks)
        # Served zero-shot and trained on: a base that saw the tests must not be scored either.
        _unseen(settings, base, data.split, "--base")
    from trainer.evaluation.run import run_eval  # trains a model: heavy imports

    # As `reasonrec bootstrap`: too little to train on, a missing GPU, a full disk.
    try:
        with (
            errors_end_command(NotEnoughData, PolicyError, RegistryError, DeviceError, OSError),
            interruptible(sigterm=True),  # SIGTERM left its store's keys and folder behind
        ):
            report = run_eval(
                data, settings, users, seed, preset, tasks, recipe, model, base, stages
            )
    except KeyboardInterrupt:
        if not TERMINATED.is_set():
            raise  # Ctrl-C: as before
        console.print("[yellow]stopped (SIGTERM)[/yellow]: the run's store and folder are removed")
        raise typer.Exit(EXIT_TERMINATED) from None
    typer.echo(report.table())  # first: printed even if the file cannot be written now
    if json_out:
        with errors_end_command(OSError):
            json_out.write_text(report.model_dump_json(indent=2))


@policies.command("check")
def check_policy(
    path: Annotated[
        Path,
        typer.Argument(metavar="FILE", help="A policy file (YAML)."),
    ],
) -> None:
    """Validate a policy file: prints a one-line summary, or each problem as FILE:LINE: message
    (exit status 1)."""
    from reward_rules.policy import PolicyError, load_policy

    try:
        policy = load_policy(path)
    except PolicyError as exc:
        for line in exc.lines():
            typer.echo(line, err=True)  # plain, unwrapped: editors jump to FILE:LINE
        raise typer.Exit(1) from exc
    typer.echo(f"{path}: ok: {policy.summary()}")
