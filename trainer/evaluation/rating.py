"""`reasonrec eval --task rate`: rating prediction on EVAL.md's split.

Each evaluated user's last interaction is the test; what they rated it is the truth. The model is
bootstrapped as `trainer.evaluation.run` describes (for rating, RecZero or RecOne, or for both
tasks), and every system predicts the test ratings:

- `reasonrec`: the gateway's `POST /v1/rate` path through the vLLM engine, as served (the model's
  rating mixed with the lean baseline's by the version's `rating_weight`);
- `reasonrec (model alone)`: the same with the model's rating alone;
- `lean baseline (fallback)`: the same path with no model, what it falls back to: the global
  mean, the item's bias and the user's lean over their latest ratings (`contract.rating`);
- `global mean`, `user mean`, `item mean`: means of the training and validation ratings;
- `user + item bias`: the one-pass regularised user and item biases (`contract.rating.bias_rating`),
  the issue's bias baseline;
- `bias (ALS)` and `SVD`: scikit-surprise's `BaselineOnly` (regularised user + item biases fitted
  by alternating least squares) and `SVD` (biased matrix factorisation, Funk style), with their
  default settings, on the same ratings.
"""

import asyncio
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence

from tqdm.auto import tqdm

from contract.rating import Stats, bias_rating
from server.engine import Engine
from server.rate import Rater
from server.schemas import FeedbackEvent, RatedItem, RateRequest
from trainer.evaluation.harness import Report
from trainer.evaluation.split import EvalData
from trainer.rating import errors

PROTOCOL = "EVAL.md split; the test interaction's rating"
Predict = Callable[[str, str], float]


def _means(ratings: Sequence[FeedbackEvent]) -> dict[str, Predict]:
    by_user, by_item = defaultdict(list), defaultdict(list)
    for event in ratings:
        by_user[event.user_id].append(event.value)
        by_item[event.item_id].append(event.value)
    everyone = statistics.fmean(event.value for event in ratings)

    def mean_of(groups: dict[str, list[float]], key: str) -> float:
        return statistics.fmean(groups[key]) if groups.get(key) else everyone

    return {
        "global mean": lambda user, item: everyone,
        "user mean": lambda user, item: mean_of(by_user, user),
        "item mean": lambda user, item: mean_of(by_item, item),
    }


def _bias(ratings: Sequence[FeedbackEvent]) -> dict[str, Predict]:
    """The one-pass regularised user + item biases (`contract.rating.bias_rating`), each user's
    latest rating of an item counting, as the gateway stores them."""
    items: dict[str, list[float]] = defaultdict(list)
    for event in ratings:
        items[event.item_id].append(event.value)
    stats = {item: Stats.of(sum(values), len(values)) for item, values in items.items()}
    everyone = Stats.of(sum(e.value for e in ratings), len(ratings))
    latest: dict[str, dict[str, float]] = defaultdict(dict)
    for event in sorted(ratings, key=lambda e: e.timestamp):
        latest[event.user_id][event.item_id] = event.value

    def predict(user: str, item: str) -> float:
        mine = [(value, stats[i]) for i, value in latest.get(user, {}).items()]
        return bias_rating(everyone, stats.get(item, Stats()), mine)

    return {"user + item bias": predict}


def _surprise(ratings: Sequence[FeedbackEvent], seed: int) -> dict[str, Predict]:
    import pandas as pd
    from surprise import SVD, BaselineOnly, Dataset, Reader

    rows = [(e.user_id, e.item_id, e.value) for e in ratings]
    frame = pd.DataFrame(rows, columns=["user", "item", "rating"])
    # Predictions are clipped to the scale: the training ratings' own (ML-100K 1 to 5,
    # ml-latest 0.5 to 5), so that no rating the data holds is out of reach.
    scale = (frame["rating"].min(), frame["rating"].max())
    trainset = Dataset.load_from_df(frame, Reader(rating_scale=scale)).build_full_trainset()
    models = {"bias (ALS)": BaselineOnly(verbose=False), "SVD": SVD(random_state=seed)}
    for model in models.values():
        model.fit(trainset)
    return {
        name: (lambda user, item, model=model: float(model.predict(user, item).est))
        for name, model in models.items()
    }


def _score(predict: Predict, tests: Sequence[FeedbackEvent]) -> dict[str, float]:
    scores = errors([predict(e.user_id, e.item_id) for e in tests], [e.value for e in tests])
    return {"mae": scores["mae"], "rmse": scores["rmse"]}


def _rated(
    rater: Rater, engine: Engine | None, tests: Sequence[FeedbackEvent], run: asyncio.Runner
) -> tuple[list[RatedItem], list[float]]:
    """Each test rating as `POST /v1/rate` predicts it, and each request's latency (ms)."""
    rated, latencies = [], []
    for event in tqdm(
        tests, desc="reasonrec" if engine else "lean baseline (fallback)", unit="rating"
    ):
        request = RateRequest(user_id=event.user_id, item_ids=[event.item_id])
        started = time.perf_counter()
        response = run.run(rater.rate(request, f"eval-{event.user_id}", engine))
        latencies.append((time.perf_counter() - started) * 1000)
        rated.append(response.items[0])
    return rated, latencies


def rating_tests(data: EvalData, users: Sequence[str]) -> list[FeedbackEvent]:
    """The evaluated users' test interactions; raises ValueError unless each is a rating."""
    if unrated := data.unrated_tests(users):
        raise ValueError(f"rating evaluation needs rated test interactions; users {unrated[:5]}")
    return [data.timelines[user][-1] for user in users]


def rate_report(
    data: EvalData,
    tests: Sequence[FeedbackEvent],
    known: Sequence[FeedbackEvent],
    rater: Rater,
    engine: Engine,
    run: asyncio.Runner,
    seed: int,
) -> Report:
    """Every system's MAE and RMSE on `tests`, the baselines fitted on the `known` ratings."""
    served, latencies = _rated(rater, engine, tests, run)
    weight = engine.contract.rating_weight
    engine.contract = engine.contract.model_copy(update={"rating_weight": 1.0})
    alone = _rated(rater, engine, tests, run)[0] if weight < 1 else served
    engine.contract = engine.contract.model_copy(update={"rating_weight": weight})
    fallback = _rated(rater, None, tests, run)[0]
    truth = [e.value for e in tests]
    systems = {
        "reasonrec": errors([item.rating for item in served], truth),
        "reasonrec (model alone)": errors([item.rating for item in alone], truth),
        "lean baseline (fallback)": errors([item.rating for item in fallback], truth),
    }
    rated = [e for e in known if e.value is not None]
    for name, predict in (_means(rated) | _bias(rated) | _surprise(rated, seed)).items():
        systems[name] = _score(predict, tests)
    report = Report(
        dataset=data.split.dataset, protocol=PROTOCOL, users=len(tests), systems=systems
    )
    report.model = {
        "rating_weight": weight,
        "p50_ms": statistics.median(latencies),
        "fallback_rate": sum(item.source == "fallback" for item in served) / len(served),
    }
    return report
