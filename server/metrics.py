"""Prometheus metrics exported at /metrics. Names follow `reasonrec_<what>_<unit>`."""

from prometheus_client import Counter, Histogram

HTTP_REQUESTS = Counter(
    "reasonrec_http_requests_total",
    "HTTP requests by route template, method and status code.",
    ["route", "method", "status"],
)
HTTP_DURATION = Histogram(
    "reasonrec_http_request_duration_seconds",
    "HTTP request duration by route template.",
    ["route"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
FEEDBACK_EVENTS = Counter(
    "reasonrec_feedback_events_total", "Feedback events stored, by type.", ["type"]
)
REDIS_ERRORS = Counter(
    "reasonrec_redis_errors_total", "Requests that failed because Redis was unreachable."
)
