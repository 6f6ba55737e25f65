"""Prometheus metrics exported at /metrics. Names follow `reasonrec_<what>_<unit>`."""

import asyncio
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram

HTTP_REQUESTS = Counter(
    "reasonrec_http_requests_total",
    "HTTP requests by route template, method and status code.",
    ["route", "method", "status"],
)
HTTP_DURATION = Histogram(
    "reasonrec_http_request_duration_seconds",
    "HTTP request duration by route template.",
    ["route"],
    # 3: the default LLM budget, which the latency alert compares the p99 with.
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10),
)
FEEDBACK_EVENTS = Counter(
    "reasonrec_feedback_events_total", "Feedback events stored, by type.", ["type"]
)
REDIS_ERRORS = Counter(
    "reasonrec_redis_errors_total", "Requests that failed because Redis was unreachable."
)
UNREADABLE_RECORDS = Counter(
    "reasonrec_unreadable_records_total",
    "Stored records skipped because they could not be decoded (written by hand, or before a "
    "validation rule existed), by kind.",
    ["kind"],
)
ENGINE_SECONDS = Histogram(
    "reasonrec_engine_seconds",
    "Time spent in the LLM engine per answer (a ranking, one rated item, a search query), by task.",
    ["task"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10),
)
ENGINE_TOKENS = Counter(
    "reasonrec_engine_tokens_total", "Tokens processed by the engine.", ["kind"]
)
PARSE_FAILURES = Counter(
    "reasonrec_parse_failures_total",
    "LLM answers that were malformed or needed repair, by task (rank, rate, search).",
    ["task"],
)
FALLBACKS = Counter(
    "reasonrec_fallbacks_total", "Responses served from the retrieval order.", ["reason"]
)
CANDIDATES_SECONDS = Histogram(
    "reasonrec_candidates_seconds",
    "Time to load the user's context and retrieve candidates.",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
RECOMMENDATIONS = Counter(
    "reasonrec_recommendations_total",
    "Recommendation responses by source and model version.",
    ["source", "model_version"],
)
POSITIVES = Counter(
    "reasonrec_positives_total",
    "Positive feedback quoting the request id of a served list, by the model version that served "
    "it (with reasonrec_recommendations_total: the online positive rate by version).",
    ["model_version"],
)
MODEL_INFO = Gauge(
    "reasonrec_model_info", "The model version this gateway serves (value 1).", ["version"]
)


def set_model_info(version: str | None) -> None:
    MODEL_INFO.clear()
    if version:
        MODEL_INFO.labels(version).set(1)


RATINGS = Counter(
    "reasonrec_ratings_total",
    "Ratings predicted by POST /v1/rate, by source (llm or fallback) and model version.",
    ["source", "model_version"],
)
RATE_FALLBACKS = Counter(
    "reasonrec_rate_fallbacks_total",
    "Ratings predicted by the lean baseline instead of the model, by reason.",
    ["reason"],
)
SEARCHES = Counter(
    "reasonrec_searches_total",
    "Search responses of POST /v1/search, by source and model version.",
    ["source", "model_version"],
)
SEARCH_FALLBACKS = Counter(
    "reasonrec_search_fallbacks_total",
    "Searches that sent the user's query to the retriever as written, by reason.",
    ["reason"],
)
SEARCH_INDEX_ITEMS = Gauge("reasonrec_search_index_items", "Items in the current search index.")
SEARCH_INDEX_FAILURES = Counter(
    "reasonrec_search_index_failures_total",
    "Search index builds that failed (search answers from the last one built, or finds nothing).",
)
SEARCH_INDEX_BUILD_SECONDS = Histogram(
    "reasonrec_search_index_build_seconds",
    "Time to build the search index from the catalog.",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300),
)

# Every label value at 0 from the start: a series that does not exist yet is not 0 to PromQL (a
# ratio over it is empty, so an alert on it never evaluates, and panels say "No data").
for _reason in ("engine_error", "timeout", "no_model", "task_unsupported", "malformed"):
    FALLBACKS.labels(_reason)
    SEARCH_FALLBACKS.labels(_reason)
    if _reason != "task_unsupported":  # /v1/rate answers 409 instead
        RATE_FALLBACKS.labels(_reason)
FALLBACKS.labels("no_candidates")
for _task in ("rank", "rate", "search"):
    PARSE_FAILURES.labels(_task)
    ENGINE_SECONDS.labels(_task)

BY_VERSION = (RECOMMENDATIONS, POSITIVES, RATINGS, SEARCHES)


def forget_versions(kept: Collection[str]) -> None:
    """Remove the series of model versions not in `kept` (no model's "" aside): a gateway adds a
    set for every version it serves, and refreshes publish one an hour."""
    for counter in BY_VERSION:
        series = {
            tuple(sample.labels.values()): sample.labels["model_version"]
            for metric in counter.collect()
            for sample in metric.samples
        }
        for labels, version in series.items():
            if version and version not in kept:
                counter.remove(*labels)


@contextmanager
def engine_timer(task: str) -> Iterator[None]:
    """ENGINE_SECONDS of one engine call, left out when it is cancelled (its client left): the
    call cut short says nothing of the engine's speed. A timeout is observed: the budget."""
    started, cancelled = time.perf_counter(), False
    try:
        yield
    except asyncio.CancelledError:
        cancelled = True
        raise
    finally:
        if not cancelled:
            ENGINE_SECONDS.labels(task).observe(time.perf_counter() - started)
