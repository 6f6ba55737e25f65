"""`reasonrec eval`: the protocol of EVAL.md end to end, on a fresh store of its own.

1. Read the data once (ml-100k, ml-latest or jsonl) and split it per user by time: train /
   validation / test (`trainer.evaluation.split`).
2. Load the catalog, users and training interactions into a fresh store (its own key prefix on
   the configured Redis, or an embedded Redis in a temporary folder). Interactions load as they
   are, ratings with their values (the rating task's truth), but the store counts every one in
   history and popularity whatever its rating: the ranking protocol is implicit feedback.
3. Bootstrap the model and the candidate index there, on training data only, for the tasks asked
   (`--task rank --task rate` trains one model for both, as `reasonrec demo` does).
4. Add the validation interactions (they precede the test item; item-kNN scores from them too).
5. Rank for each user with the systems (the model, the retrieval order it reranks, popularity,
   item-kNN, search's retrievers queried with the last item's title, and for a search model its
   queries after SFT and as published (after GRPO, unless GRPO validated lower)) and score
   against the test item; predict each user's test rating (`trainer.evaluation.rating`).
"""

import asyncio
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from contract.search import RetrieverKind
from contract.tasks import Task
from server.active_model import open_engine
from server.config import Settings
from server.index_files import load_current
from server.loaders import Dataset
from server.loaders.writer import progress_bar, write
from server.rate import Rater
from server.recommend import Recommender
from server.redis_client import connect
from server.registry import Registry, base_version
from server.schemas import FeedbackEvent
from server.search import Searcher
from server.search_index import Encoder, SearchIndexes, build_search_index
from server.store import Store, build_store
from trainer.bootstrap import BootstrapResult, bootstrap, index_corpus
from trainer.corpus import read_corpus
from trainer.evaluation.harness import Report, evaluate
from trainer.evaluation.pipeline import PipelineSystem, recommending, searching
from trainer.evaluation.rating import rate_report, rating_tests
from trainer.evaluation.split import EvalData, Split, sample_users
from trainer.evaluation.systems import ItemKNN, Popularity, TitleQuery
from trainer.presets import PRESETS, Recipe

log = logging.getLogger(__name__)
EVAL_TIMEOUT_MS = 600_000


EVERY_RATING = 0.0
"""The eval store's positive-rating threshold: EVAL.md counts every rating as an interaction."""


def phase_events(split: Split, timelines: dict[str, list[FeedbackEvent]], phase: str) -> list:
    """Every user's events of one phase ('train' or 'validation'), checked against the split."""
    chosen = []
    for user, events in timelines.items():
        if user not in split.test:
            continue  # fewer than 3 interactions: not part of the protocol
        part = events[:-2] if phase == "train" else [events[-2]]
        expected = split.train[user] if phase == "train" else (split.validation[user],)
        if tuple(e.item_id for e in part) != tuple(expected):
            raise RuntimeError(f"user {user}: the store's {phase} events differ from the split")
        chosen += part
    chosen.sort(key=lambda event: event.timestamp)
    return chosen


async def write_dataset(store: Store, dataset: Dataset) -> None:
    with progress_bar() as progress:
        await write(store, dataset, progress)


def events_only(events: list[FeedbackEvent]) -> Dataset:
    return Dataset(items=[], users=[], events=events, event_count=len(events))


def _link(source: Registry, target: Registry, versions: Sequence[str]) -> None:
    """Hard links (copies across file systems), not a link to the folder: a prune of the
    configured registry during the eval removed the folder under it."""
    target.root.mkdir(parents=True, exist_ok=True)
    for version in versions:
        needed = {version, base_version(source.manifest(version))}
        for name in needed - {path.name for path in target.root.iterdir()}:
            shutil.copytree(source.path(name), target.root / name, copy_function=_hard_link)


def _hard_link(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, target)


async def registered(
    settings: Settings, store: Store, version: str, index_dim: int, seed: int
) -> BootstrapResult:
    """A version from the registry, evaluated as it is: only the candidate index is built."""
    started = time.perf_counter()
    index = index_corpus(await read_corpus(store), settings, index_dim, seed)
    return BootstrapResult(
        version=version,
        path=Registry(settings.registry_path).path(version),
        index_version=index.version,
        activated=False,
        gate="evaluated as registered: not trained by this run",
        metrics={},
        seconds=time.perf_counter() - started,
    )


@contextmanager
def scratch_store(
    settings: Settings, linked: Sequence[str] = ()
) -> Iterator[tuple[Settings, Store, asyncio.Runner]]:
    """A fresh store (its own key prefix, its own data folder and registry) and an event loop to
    drive it; everything in it is dropped on the way out. The `linked` versions of the
    configured registry (and the bases of LoRA ones) are linked into the scratch registry, read
    in place."""
    source = Registry(settings.registry_path)
    with tempfile.TemporaryDirectory(prefix="reasonrec-eval-") as scratch, asyncio.Runner() as run:
        settings = settings.model_copy(
            update={
                "data_dir": Path(scratch),
                "registry_dir": None,
                "key_prefix": f"eval-{uuid.uuid4().hex[:8]}",
                # Offline: every answer must come from the model, however slow the machine;
                # latency is reported separately (p50_ms), not enforced.
                "llm_timeout_ms": EVAL_TIMEOUT_MS,
                # The versions it trains live in the scratch registry, which a remote vLLM (a
                # deployment's REASONREC_ENGINE_URL) cannot serve: every answer would fall back.
                "engine_url": None,
                # A deployment's policy (category cap, boosts, availability) would shape the
                # pipeline's lists and not the baselines': the built-in default it is.
                "policy_file": None,
                # The protocol trains on every training interaction: none may be trimmed.
                "events_maxlen": 0,
            }
        )
        _link(source, Registry(settings.registry_path), linked)
        handle = connect(settings)
        store = build_store(settings, handle.client, positive_rating=EVERY_RATING)
        try:
            yield settings, store, run
        finally:
            run.run(store.drop_everything())
            run.run(handle.close())


def run_eval(
    data: EvalData,
    settings: Settings,
    users: int | None,
    seed: int,
    preset: str,
    tasks: frozenset[Task] = frozenset({Task.rank}),
    recipe: Recipe = Recipe.one,
    model: str | None = None,
    base: str | None = None,
    stages: bool = True,
) -> Report:
    """The ranking report (the model's lists when it ranks, its queries' when it searches,
    beside the baselines), with the rating report in `rating` when the model rates; a model only
    for rating gets the rating report alone. `model`: evaluate that version of the configured
    registry instead of bootstrapping one (the caller checks it saw none of the tests); `base`:
    bootstrap LoRA adapters on that pretrained version of it, and with `stages` serve the base
    zero-shot and the adapters after SFT too."""
    split, timelines = data.split, data.timelines
    chosen = sample_users(split, users, seed) if users else list(split.users)
    tests = rating_tests(data, chosen) if Task.rate in tasks else []  # fails before training
    train = phase_events(split, timelines, "train")
    validation = phase_events(split, timelines, "validation")
    linked = [version for version in (model, base) if version]
    with scratch_store(settings, linked) as (settings, store, run):
        run.run(write_dataset(store, Dataset(items=data.items, users=data.users, events=train)))
        if model:
            trained = run.run(registered(settings, store, model, PRESETS[preset].index_dim, seed))
        else:
            trained = run.run(
                bootstrap(
                    settings,
                    store,
                    preset,
                    seed=seed,
                    trained_on=split.trained_on,
                    tasks=tasks,
                    recipe=recipe,
                    keep_stages=tasks & {Task.search} | ({Task.rank} if base and stages else set()),
                    base=base,
                )
            )
        run.run(write_dataset(store, events_only(validation)))
        reports = []
        if tasks & {Task.rank, Task.search}:
            compared = base if stages else None
            reports.append(
                _rank_report(data, chosen, store, settings, trained, tasks, run, compared)
            )
        if Task.rate in tasks:
            engine = open_engine(settings, trained.version)
            try:
                rater = Rater(store, settings)
                known = train + validation
                reports.append(rate_report(data, tests, known, rater, engine, run, seed))
            finally:
                run.run(engine.close())
    report = reports[0]
    took = "index_seconds" if model else "bootstrap_seconds"  # a registered version: index only
    report.model = trained.metrics | {took: trained.seconds} | report.model
    if len(reports) == 2:
        report.rating = reports[1]
    return report


def _rank_report(
    data: EvalData,
    users: list[str],
    store: Store,
    settings: Settings,
    trained: BootstrapResult,
    tasks: frozenset[Task],
    run: asyncio.Runner,
    base: str | None = None,
) -> Report:
    """`base`: the pretrained version the model was trained from; it is served too, untrained
    (zero-shot), and so is the model after SFT, before GRPO."""
    index = load_current(settings.data_dir)
    recommender = Recommender(store, settings)
    ranking = {"reasonrec": trained.version}
    if base:
        ranking |= {"reasonrec sft": trained.stages["rank_sft"], "base zero-shot": base}
    systems = [
        recommending(name, recommender, index, run, partial(open_engine, settings, version))
        for name, version in ranking.items()
        if Task.rank in tasks
    ]
    systems.append(recommending("retrieval", recommender, index, run))
    systems += [Popularity(), ItemKNN(), *_title_queries(data)]
    if Task.search in tasks:
        systems += _query_models(store, settings, trained, run)
    return evaluate(data.split, systems, users)


def _query_models(
    store: Store, settings: Settings, trained: BootstrapResult, run: asyncio.Runner
) -> list[PipelineSystem]:
    """The search model's queries for what each user wants next, after SFT and as published
    (after GRPO, unless GRPO validated lower), sent to the retriever it was trained with."""
    indexes = SearchIndexes(settings.search_retriever)
    run.run(indexes.refresh(store))
    searcher = Searcher(store, settings, indexes)
    kind = settings.search_retriever.value
    stages = {f"query model sft ({kind})": trained.stages["search_sft"]}
    stages[f"query model ({kind})"] = trained.version
    return [
        searching(name, searcher, run, partial(open_engine, settings, version))
        for name, version in stages.items()
    ]


def _title_queries(data: EvalData) -> list[TitleQuery]:
    """Search's retrievers, BM25 and dense, each queried with the user's last title."""
    items = [(item.item_id, item) for item in data.items]
    titles = {item.item_id: item.title for item in data.items}
    encoder = Encoder()
    return [TitleQuery(build_search_index(items, kind, encoder), titles) for kind in RetrieverKind]
