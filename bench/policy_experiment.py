"""Does a refresh under a promotion policy raise the promoted share while NDCG@10 holds?

On MovieLens 100K with EVAL.md's split, in a fresh store of its own:

1. Load the training split as clicks, bootstrap the model (`--preset`), add the validation
   interactions, and mark `--promoted` items (a seeded sample of items with 20+ training
   interactions) `promoted: true`.
2. Users are split in two halves. *Measured* users never click; their test items score the lists
   (no leakage into what the refresh trains on). The other half is split again, one group of
   *clickers* per policy: they are served lists and click the served items that are their
   held-out future (their test item), quoting the request id. (A click becomes history, so a user
   who clicked under one policy could not click the same item under the next.)
3. For each policy (`policies/default.yaml`, `policies/promote.yaml`), starting from the same
   bootstrapped version: measure, simulate the clicks, run one refresh (`refresh_once`, the gate
   included) under that policy, measure again with whichever version is then active. Each
   refresh trains on every logged list so far (the trainer's log is cumulative).

    .venv/bin/python bench/policy_experiment.py --data ../shared/data/ml-100k [--users 400]

Progress and training logs go to stderr. Prints JSON on stdout: per policy, NDCG@10, HR@10,
ILD@10, novelty@10 and promoted share of the measured users' lists before and after, and the
refresh's outcome and gate.
"""

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

from _load import positive  # bench/ is the script's folder

from reward_rules.metrics import hit_at_k, intra_list_distance, mean_self_information, ndcg_at_k
from server.active_model import open_engine
from server.config import Settings, environment_settings
from server.engine import Engine
from server.index_files import load_current
from server.interrupts import sigterm_as_ctrl_c
from server.item_index import ItemIndex
from server.loaders import Dataset
from server.recommend import Recommender
from server.redis_client import connect
from server.schemas import EventType, FeedbackEvent, ItemUpsert, RecommendRequest
from server.store import Store, build_store
from trainer.bootstrap import bootstrap
from trainer.evaluation.run import EVERY_RATING, events_only, phase_events, write_dataset
from trainer.evaluation.split import Split, read_eval_data, sample_users
from trainer.presets import PRESETS
from trainer.refresh import refresh_once

ROOT = Path(__file__).resolve().parents[1]
POLICIES = {"default": ROOT / "policies/default.yaml", "promote": ROOT / "policies/promote.yaml"}
K = 10
CONCURRENCY = 16


async def serve(
    recommender: Recommender, engine: Engine, index: ItemIndex | None, users: Sequence[str]
) -> dict[str, tuple[str, list[str]]]:
    """Each user's (request id, served ids), as the API would answer them."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(user: str) -> tuple[str, tuple[str, list[str]]]:
        async with gate:
            request_id = uuid.uuid4().hex
            response = await recommender.recommend(
                RecommendRequest(user_id=user, k=K, explain=False),
                request_id,
                engine,
                index,
            )
        return user, (request_id, [item.item_id for item in response.items])

    return dict(await asyncio.gather(*(one(user) for user in users)))


def scores(split: Split, lists: dict[str, list[str]], promoted: set[str]) -> dict[str, float]:
    n = len(lists)
    total = {"ndcg@10": 0.0, "hr@10": 0.0, "ild@10": 0.0, "novelty@10": 0.0, "promoted_share": 0.0}
    for user, items in lists.items():
        relevant = {split.test[user]}
        total["ndcg@10"] += ndcg_at_k(items, relevant, K)
        total["hr@10"] += hit_at_k(items, relevant, K)
        total["ild@10"] += intra_list_distance([split.categories[i] for i in items])
        total["novelty@10"] += mean_self_information(
            items, split.popularity, split.training_interactions
        )
        total["promoted_share"] += sum(i in promoted for i in items) / max(len(items), 1)
    return {key: round(value / n, 4) for key, value in total.items()}


async def clicks(store: Store, split: Split, served: dict[str, tuple[str, list[str]]]) -> int:
    """Clickers click what they really watched next (their test item) when it was served."""
    events = [
        FeedbackEvent(
            user_id=user, item_id=split.test[user], type=EventType.click, request_id=request_id
        )
        for user, (request_id, items) in served.items()
        if split.test[user] in items
    ]
    if events:
        await store.add_feedback(events)
    return len(events)


async def run_policy(
    name: str,
    settings: Settings,
    store: Store,
    split: Split,
    measured: list[str],
    clickers: list[str],
    base: str,
    promoted: set[str],
    index: ItemIndex | None,
) -> dict:
    """`index`: every list of the run is served from it; a refresh rebuilds the current one (with
    the clicks), which changed the lists measured after it, and the next policy's, with no model
    or policy behind the change."""
    settings = settings.model_copy(update={"policy_file": POLICIES[name]})
    await store.set_active_model(base)
    recommender = Recommender(store, settings)
    engine = open_engine(settings, base)
    try:
        before = await serve(recommender, engine, index, measured)
        served = await serve(recommender, engine, index, clickers)
        clicked = await clicks(store, split, served)
    finally:
        await engine.close()
    refresh = await refresh_once(settings, store, progress=True)
    active = await store.active_model()
    engine = open_engine(settings, active)
    try:
        after = await serve(recommender, engine, index, measured)
    finally:
        await engine.close()
    return {
        "clicks": clicked,
        "before": scores(split, {u: items for u, (_, items) in before.items()}, promoted),
        "after": scores(split, {u: items for u, (_, items) in after.items()}, promoted),
        "refresh": refresh.model_dump(
            include={"outcome", "reason", "version", "train_examples", "reward_mean", "gate"}
        ),
    }


async def promote(store: Store, split: Split, count: int, seed: int) -> set[str]:
    eligible = sorted(i for i, n in split.popularity.items() if n >= 20)
    chosen = set(random.Random(seed).sample(eligible, min(count, len(eligible))))
    items = await store.get_items(sorted(chosen))
    marked = [
        ItemUpsert(**(item.model_dump(exclude={"hidden"}) | {"promoted": True}))
        for item in items.values()
    ]
    await store.upsert_items(marked)
    return chosen


async def experiment(
    path: Path, settings: Settings, preset: str, count: int, users: int | None, seed: int
) -> dict:
    data = read_eval_data(path)
    split, timelines = data.split, data.timelines
    chosen = sample_users(split, users, seed) if users else list(split.users)
    handle = connect(settings)
    store = build_store(settings, handle.client, positive_rating=EVERY_RATING)
    try:
        train = phase_events(split, timelines, "train")
        await write_dataset(store, Dataset(items=data.items, users=data.users, events=train))
        base = (await bootstrap(settings, store, preset, seed=seed)).version
        await write_dataset(store, events_only(phase_events(split, timelines, "validation")))
        promoted = await promote(store, split, count, seed)
        results = {
            "preset": preset,
            "users": len(chosen),
            "promoted_items": len(promoted),
            "base": base,
        }
        measured, others = chosen[1::2], chosen[0::2]
        index = load_current(settings.data_dir)
        for n, name in enumerate(POLICIES):
            clickers = others[n :: len(POLICIES)]
            results[name] = await run_policy(
                name, settings, store, split, measured, clickers, base, promoted, index
            )
        return results
    finally:
        await store.drop_everything()
        await handle.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/ml-100k")
    parser.add_argument(
        "--preset",
        default="default",
        choices=list(PRESETS),
        help="Bootstrap preset of the base model.",
    )
    parser.add_argument(
        "--sft-steps", type=positive, help="Override the preset's SFT steps (faster)."
    )
    parser.add_argument("--promoted", type=positive, default=100, help="How many items to promote.")
    parser.add_argument(
        "--users",
        type=positive,
        help="Sample N users (half measured, half clicking, split by policy).",
    )
    parser.add_argument(
        "--refresh-steps", type=positive, default=20, help="GRPO steps per refresh."
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.users is not None and args.users < 1 + len(POLICIES):
        parser.error(f"--users: at least {1 + len(POLICIES)} (one measured, a clicker per policy)")
    # SIGTERM (a CI job cancelled) as Ctrl-C: the run's store and folders are removed.
    sigterm_as_ctrl_c()
    if not (args.data / "u.data").is_file():
        raise SystemExit(f"MovieLens 100K not found at {args.data} (pass --data)")
    preset = args.preset
    if args.sft_steps:  # a variant of the preset, registered for this run only
        base = PRESETS[preset]
        preset = f"{preset}-sft{args.sft_steps}"
        sft = base.sft.model_copy(update={"max_steps": args.sft_steps})
        PRESETS[preset] = base.model_copy(update={"sft": sft})
    with tempfile.TemporaryDirectory(prefix="reasonrec-policy-") as scratch:
        settings = environment_settings().model_copy(
            update={
                "data_dir": Path(scratch),
                "registry_dir": None,
                "key_prefix": f"policy-{uuid.uuid4().hex[:8]}",
                "llm_timeout_ms": 600_000,
                "refresh_grpo_steps": args.refresh_steps,
                # As `reasonrec eval`: its versions live in the scratch registry, which a remote
                # vLLM cannot serve, and its training reads every event.
                "engine_url": None,
                "events_maxlen": 0,
                # A few hundred clickers log a dozen or two lists: each refresh trains on them
                # (the gate's verdict on so few is reported, not trusted).
                "refresh_min_lists": 2,
            }
        )
        # Trainers and vLLM log on stdout: keep it for the JSON.
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        with contextlib.redirect_stdout(sys.stderr):
            result = asyncio.run(
                experiment(args.data, settings, preset, args.promoted, args.users, args.seed)
            )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
