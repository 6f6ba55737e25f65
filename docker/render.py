"""Writes the two deployment files that are derived from others, so they are never edited by hand:

- docker/grafana/dashboards/reasonrec.json: the Grafana dashboard, from the rows below;
- k8s/base/prometheus-rule.yaml: docker/prometheus/alerts.yml wrapped in a PrometheusRule.

    python docker/render.py           # rewrite both
    python docker/render.py --check   # exit status 1 and the stale files' names if they differ
"""

import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "docker/grafana/dashboards/reasonrec.json"
ALERTS = ROOT / "docker/prometheus/alerts.yml"
PROMETHEUS_RULE = ROOT / "k8s/base/prometheus-rule.yaml"

RATE = "$__rate_interval"  # Grafana's window for rate(): at least four scrape intervals
QUANTILES = (0.5, 0.95, 0.99)
# A data source variable: compose provisions uid "prometheus"; on a cluster pick yours.
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def fallback_share(window: str) -> str:
    """Recommendations served in the retrieval order for the engine's or the model's want (an
    empty catalog's are not its doing); the fallback alert reads it over 5m."""
    return (
        f'sum(rate(reasonrec_fallbacks_total{{reason!="no_candidates"}}[{window}]))\n'
        f"  / sum(rate(reasonrec_recommendations_total[{window}]))"
    )


def parse_failure_share(window: str) -> str:
    """Ranking answers that needed repair or named no candidate (served as the fallback, reason
    malformed), of every answer the model gave; the parse failure alert reads it over 15m."""
    return (
        f'sum(rate(reasonrec_parse_failures_total{{task="rank"}}[{window}]))\n'
        f'  / (sum(rate(reasonrec_recommendations_total{{source="llm"}}[{window}]))\n'
        f'    + sum(rate(reasonrec_fallbacks_total{{reason="malformed"}}[{window}])))'
    )


def quantiles(bucket: str, selector: str = "", by: str = "") -> list[tuple[str, str]]:
    """p50, p95 and p99 of a histogram over every instance, for each value of the label `by`."""
    return [
        (
            f"histogram_quantile({q}, sum by (le{', ' + by if by else ''}) "
            f"(rate({bucket}{selector}[{RATE}])))",
            f"p{q * 100:g}" + (f" {{{{{by}}}}}" if by else ""),
        )
        for q in QUANTILES
    ]


def panel(
    title: str, targets: list[tuple[str, str]], unit: str = "short", kind: str = "timeseries"
):
    """A panel of (PromQL, legend) targets; its place on the grid is set by `row`."""
    return {
        "type": kind,
        "title": title,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + n), "expr": expr, "legendFormat": legend}
            for n, (expr, legend) in enumerate(targets)
        ],
    }


def stat(title: str, expr: str, legend: str, unit: str = "short") -> dict[str, Any]:
    shown = panel(title, [(expr, legend)], unit, kind="stat")
    shown["options"] = {"textMode": "value_and_name", "reduceOptions": {"calcs": ["lastNotNull"]}}
    return shown


def rows() -> dict[str, list[dict[str, Any]]]:
    recommend = '{route="/v1/recommend"}'
    return {
        "Traffic": [
            panel(
                "Requests by route and status",
                [
                    (
                        f"sum by (route, status) (rate(reasonrec_http_requests_total[{RATE}]))",
                        "{{route}} {{status}}",
                    )
                ],
                "reqps",
            ),
            panel(
                "Recommendations by source",
                [
                    (
                        f"sum by (source) (rate(reasonrec_recommendations_total[{RATE}]))",
                        "{{source}}",
                    )
                ],
                "reqps",
            ),
            panel(
                "Engine tokens by kind (gateway side)",
                [(f"sum by (kind) (rate(reasonrec_engine_tokens_total[{RATE}]))", "{{kind}}")],
                "short",
            ),
        ],
        "Latency": [
            panel(
                "Gateway: POST /v1/recommend",
                quantiles("reasonrec_http_request_duration_seconds_bucket", recommend),
                "s",
            ),
            panel(
                "Gateway: p99 by route",
                [
                    (
                        "histogram_quantile(0.99, sum by (le, route) "
                        f"(rate(reasonrec_http_request_duration_seconds_bucket[{RATE}])))",
                        "{{route}}",
                    )
                ],
                "s",
            ),
            panel(
                "Candidates (context + retrieval)",
                quantiles("reasonrec_candidates_seconds_bucket"),
                "s",
            ),
            panel(
                "Engine (LLM call) by task",
                quantiles("reasonrec_engine_seconds_bucket", by="task"),
                "s",
            ),
        ],
        "Quality": [
            panel(
                "Fallbacks by reason",
                [(f"sum by (reason) (rate(reasonrec_fallbacks_total[{RATE}]))", "{{reason}}")],
                "reqps",
            ),
            panel(
                # The alerts' ratios (docker/prometheus/alerts.yml), so a panel and its alert agree.
                "Fallback and parse failure share",
                [
                    (
                        fallback_share(RATE),
                        "fallbacks (not for want of candidates) / recommendations",
                    ),
                    (parse_failure_share(RATE), "parse failures / LLM answers"),
                ],
                "percentunit",
            ),
            panel(
                "Parse failures by task",
                [(f"sum by (task) (rate(reasonrec_parse_failures_total[{RATE}]))", "{{task}}")],
                "reqps",
            ),
            panel(
                # Feedback trails its list by minutes to hours: a 1 h window keeps it steady.
                "Online positive rate by model version (1 h window)",
                [
                    (
                        "sum by (model_version) (increase(reasonrec_positives_total[1h])) "
                        "/ sum by (model_version) (increase(reasonrec_recommendations_total[1h]))",
                        "{{model_version}}",
                    )
                ],
                "percentunit",
            ),
            stat(
                "Active version (gateways serving it)",
                "count by (version) (reasonrec_model_info)",
                "{{version}}",
            ),
        ],
        "Rating": [
            panel(
                "Ratings by source",
                [(f"sum by (source) (rate(reasonrec_ratings_total[{RATE}]))", "{{source}}")],
                "short",
            ),
            panel(
                "Rating fallbacks by reason",
                [
                    (
                        f"sum by (reason) (rate(reasonrec_rate_fallbacks_total[{RATE}]))",
                        "{{reason}}",
                    )
                ],
                "short",
            ),
            panel(
                "Gateway: POST /v1/rate",
                quantiles("reasonrec_http_request_duration_seconds_bucket", '{route="/v1/rate"}'),
                "s",
            ),
        ],
        "Search": [
            panel(
                "Searches by source",
                [(f"sum by (source) (rate(reasonrec_searches_total[{RATE}]))", "{{source}}")],
                "short",
            ),
            panel(
                "Search fallbacks by reason",
                [
                    (
                        f"sum by (reason) (rate(reasonrec_search_fallbacks_total[{RATE}]))",
                        "{{reason}}",
                    )
                ],
                "short",
            ),
            panel(
                "Search index: items, and seconds per rebuild",
                [
                    ("max(reasonrec_search_index_items)", "items"),
                    (
                        f"rate(reasonrec_search_index_build_seconds_sum[{RATE}]) "
                        f"/ rate(reasonrec_search_index_build_seconds_count[{RATE}])",
                        "seconds per rebuild",
                    ),
                ],
                "short",
            ),
            panel(
                "Gateway: POST /v1/search",
                quantiles("reasonrec_http_request_duration_seconds_bucket", '{route="/v1/search"}'),
                "s",
            ),
        ],
        "Feedback": [
            panel(
                "Feedback events by type",
                [(f"sum by (type) (rate(reasonrec_feedback_events_total[{RATE}]))", "{{type}}")],
                "short",
            ),
            panel(
                "Storage: Redis errors, unreadable records by kind",
                [
                    (f"sum(rate(reasonrec_redis_errors_total[{RATE}]))", "redis errors"),
                    (
                        f"sum by (kind) (rate(reasonrec_unreadable_records_total[{RATE}]))",
                        "unreadable {{kind}}",
                    ),
                ],
                "short",
            ),
            panel(
                "Redis memory and its cap (read by the trainer)",
                [
                    ("max(reasonrec_trainer_redis_used_bytes)", "used"),
                    ("max(reasonrec_trainer_redis_max_bytes)", "cap (0: none)"),
                ],
                "bytes",
            ),
        ],
        "Training": [
            panel(
                "Refreshes by outcome (per hour)",
                [("sum by (outcome) (increase(reasonrec_trainer_runs_total[1h]))", "{{outcome}}")],
            ),
            panel(
                "Mean GRPO reward of the last refresh",
                [("reasonrec_trainer_reward_mean", "reward")],
            ),
            panel("Gate: held-out NDCG@10", [("reasonrec_trainer_gate_ndcg", "{{which}}")]),
            stat(
                "Time since the last published refresh",
                # The last week's maximum survives a trainer restart (the gauge restarts at 0).
                "time() - max(max_over_time(reasonrec_trainer_last_success_timestamp[7d]) > 0)",
                "since",
                "s",
            ),
        ],
        "vLLM": [
            panel("Time to first token", quantiles("vllm:time_to_first_token_seconds_bucket"), "s"),
            panel(
                "Tokens per second",
                [
                    (f"sum(rate(vllm:generation_tokens_total[{RATE}]))", "generation"),
                    (f"sum(rate(vllm:prompt_tokens_total[{RATE}]))", "prompt"),
                ],
                "short",
            ),
            panel(
                "Requests queued and running",
                [
                    ("sum(vllm:num_requests_waiting)", "waiting"),
                    ("sum(vllm:num_requests_running)", "running"),
                ],
            ),
            panel("KV cache usage", [("vllm:kv_cache_usage_perc", "{{instance}}")], "percentunit"),
        ],
    }


def dashboard() -> dict[str, Any]:
    panels, y = [], 0
    for title, row_panels in rows().items():
        panels.append({"type": "row", "title": title, "collapsed": False, "panels": []})
        panels[-1]["gridPos"] = {"h": 1, "w": 24, "x": 0, "y": y}
        y += 1
        width = 24 // len(row_panels)
        for n, shown in enumerate(row_panels):
            shown["gridPos"] = {"h": 8, "w": width, "x": n * width, "y": y}
            panels.append(shown)
        y += 8
    for n, shown in enumerate(panels, start=1):
        shown["id"] = n
    return {
        "uid": "reasonrec",
        "title": "reasonrec",
        "tags": ["reasonrec"],
        "schemaVersion": 39,
        "version": 1,
        "editable": False,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {"text": "Prometheus", "value": "prometheus"},
                }
            ]
        },
        "panels": panels,
    }


def prometheus_rule() -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "reasonrec"},
        "spec": yaml.safe_load(ALERTS.read_text()),
    }


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (PromQL) as literal blocks, as alerts.yml has them."""


_Dumper.add_representer(
    str,
    lambda dumper, text: dumper.represent_scalar(
        "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None
    ),
)


def rendered() -> dict[Path, str]:
    """Each derived file and the text it should hold."""
    header = (
        f"# Generated by `python docker/render.py` from {ALERTS.relative_to(ROOT)}: edit that.\n"
    )
    return {
        DASHBOARD: json.dumps(dashboard(), indent=2) + "\n",
        PROMETHEUS_RULE: header
        + yaml.dump(prometheus_rule(), Dumper=_Dumper, sort_keys=False, width=100),
    }


def main(argv: list[str]) -> int:
    texts = rendered()
    stale = [path for path, text in texts.items() if not path.is_file() or path.read_text() != text]
    if "--check" in argv:
        for path in stale:
            print(
                f"{path.relative_to(ROOT)} is stale: run python docker/render.py", file=sys.stderr
            )
        return 1 if stale else 0
    for path in stale:
        path.write_text(texts[path])
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
