"""Item index benchmark: build time, search latency and retrieval quality, printed as JSON.

On the split of ../shared/docs/EVAL.md (per user, in time order: last interaction = test item,
the one before = validation, the rest = training; every rating counts), the index is built from
the training interactions and each user's last 50 training items are the history. Reported:
HR@10 and HR@50 of the test item for the index and for popularity (both ranking the catalog minus
the user's training and validation items), build seconds, and single-query search latency.

    .venv/bin/python bench/item_index.py [--data ../shared/data/ml-100k | --synthetic]
        [--dim 64] [--window 5] [--history 50]
"""

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
from _load import positive  # bench/ is the script's folder

from server.loaders import Dataset
from server.loaders.movielens import read_ml100k
from server.loaders.synthetic import generate
from trainer.evaluation.split import Interaction, split_interactions
from trainer.index_build import build_index

ML100K = Path(__file__).resolve().parents[2] / "shared/data/ml-100k"


def split(dataset: Dataset) -> tuple[dict, dict, dict]:
    interactions = [
        Interaction(e.user_id, e.item_id, int(e.timestamp.timestamp())) for e in dataset.events
    ]
    return split_interactions(interactions)


def evaluate(dataset: Dataset, dim: int, window: int, history: int) -> dict[str, object]:
    train, validation, test = split(dataset)
    started = time.perf_counter()
    index = build_index(dataset.items, list(train.values()), dim=dim, window=window)
    build_seconds = time.perf_counter() - started
    popular = [item for item, _ in Counter(i for s in train.values() for i in s).most_common()]
    hits = {"index@10": 0, "index@50": 0, "popularity@10": 0, "popularity@50": 0}
    latencies = []
    for user, items in train.items():
        exclude = {*items, validation[user]}
        started = time.perf_counter()
        retrieved = [item for item, _ in index.search(list(items)[-history:], 50, exclude=exclude)]
        latencies.append(time.perf_counter() - started)
        ranked = [item for item in popular if item not in exclude][:50]
        for k in (10, 50):
            hits[f"index@{k}"] += test[user] in retrieved[:k]
            hits[f"popularity@{k}"] += test[user] in ranked[:k]
    millis = np.array(latencies) * 1000
    return {
        "items": len(index),
        "users": len(train),
        "train_interactions": sum(len(items) for items in train.values()),
        "warm_items": index.manifest["warm_items"],
        "text_mapped_items": index.manifest["text_mapped_items"],
        "build_seconds": round(build_seconds, 2),
        "search_ms_p50": round(float(np.percentile(millis, 50)), 3),
        "search_ms_p99": round(float(np.percentile(millis, 99)), 3),
        "hr": {name: round(count / len(train), 4) for name, count in hits.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ML100K, help="MovieLens 100K folder")
    parser.add_argument("--synthetic", action="store_true", help="use the synthetic data set")
    parser.add_argument("--dim", type=positive, default=64)
    parser.add_argument("--window", type=positive, default=5)
    parser.add_argument("--history", type=positive, default=50)
    args = parser.parse_args()
    dataset = generate() if args.synthetic else read_ml100k(args.data)
    result = evaluate(dataset, args.dim, args.window, args.history)
    source = "synthetic" if args.synthetic else str(args.data)
    print(json.dumps({"data": source, "dim": args.dim, "window": args.window} | result, indent=2))


if __name__ == "__main__":
    main()
