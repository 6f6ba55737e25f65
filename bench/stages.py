"""What each training stage adds, measured with `reasonrec eval`'s own pipeline.

Runs the EVAL.md protocol (`trainer.evaluation.run.run_eval`: fresh store, bootstrap on the
training split, then every system through the serving path) and reports:

- stages, on the bootstrap's own validation users (each user's last training interaction, the
  users whose next item is among the 50 candidates): NDCG@10 of the retrieval order, of the
  pretrained model ranking the candidates by its first-pick scores, after SFT and after GRPO
  (both decoded greedily under the serving grammar);
- the full serving pipeline on the test items (`reasonrec` through vLLM vs `retrieval`, the list
  it reranks), with their ratio, repairs and p50 latency.

    .venv/bin/python bench/stages.py --data ../shared/data/ml-100k [--format ml-100k]
        [--preset default] [--users N]

Progress and training logs go to stderr; stdout is the JSON alone. Exits 0 with a message on
stderr when the data folder is absent.
"""

import argparse
import json
import sys
from pathlib import Path

from _load import positive  # bench/ is the script's folder

from server.config import environment_settings
from server.interrupts import sigterm_as_ctrl_c
from server.loaders import LoadError
from trainer.evaluation.run import run_eval
from trainer.evaluation.split import EvalFormat, read_eval_data
from trainer.presets import PRESETS

ML100K = Path(__file__).resolve().parents[2] / "shared/data/ml-100k"  # beside the repository
STAGES = ("retrieval_ndcg@10", "pretrain_ndcg@10", "sft_ndcg@10", "ndcg@10")
PIPELINE = ("ndcg@10", "hr@10", "ild@10", "novelty@10", "invalid_rate", "p50_ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ML100K, help="default: beside the repository")
    parser.add_argument("--format", default="ml-100k", choices=[f.value for f in EvalFormat])
    parser.add_argument("--preset", default="default", choices=list(PRESETS))
    parser.add_argument(
        "--users", type=positive, default=None, help="Sampled users (default: all)."
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = environment_settings()  # a misspelled REASONREC_* variable: said, not ignored
    # SIGTERM (a CI job cancelled) as Ctrl-C: the run's store and folders are removed.
    sigterm_as_ctrl_c()
    if not args.data.exists():
        print(f"skipped: no data at {args.data} (pass --data)", file=sys.stderr)
        return
    try:
        data = read_eval_data(args.data, EvalFormat(args.format))
    except LoadError as exc:  # a file, or a folder of another format
        raise SystemExit(f"error: {exc}") from exc
    report = run_eval(data, settings, args.users, args.seed, args.preset)
    ours, retrieval = report.systems["reasonrec"], report.systems["retrieval"]
    result = {
        "dataset": report.dataset,
        "users": report.users,
        "preset": args.preset,
        "stages": {key: report.model.get(key) for key in STAGES},
        "validation_users": report.model.get("validation_users"),
        "bootstrap_seconds": report.model.get("bootstrap_seconds"),
        "pipeline": {
            "reasonrec": {key: ours[key] for key in PIPELINE},
            "retrieval": {key: retrieval[key] for key in PIPELINE},
        },
        "ndcg_ratio": ours["ndcg@10"] / retrieval["ndcg@10"] if retrieval["ndcg@10"] else None,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
