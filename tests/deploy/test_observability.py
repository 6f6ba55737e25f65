"""The Grafana dashboard and the alert rules: every metric they read is exported by a running
gateway or trainer or defined by vLLM; the rules pass promtool and fire when they should; a real
Prometheus, configured as compose configures it, scrapes a running gateway and trainer and
answers every dashboard and alert query."""

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import dies_with_pytest, free_port, wait_http
from tests.deploy.conftest import START_SECONDS, Gateway
from tests.deploy.helpers import (
    DOCKER,
    exported,
    grafana_to_promql,
    load_script,
    metric_names,
    run,
    tool,
    vllm_metrics,
)

DASHBOARD = DOCKER / "grafana/dashboards/reasonrec.json"
ALERTS = DOCKER / "prometheus/alerts.yml"
ROWS = ["Traffic", "Latency", "Quality", "Rating", "Search", "Feedback", "Training", "vLLM"]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target on the dashboard."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]


def alert_queries() -> list[tuple[str, str]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [(rule["alert"], rule["expr"]) for group in groups for rule in group["rules"]]


def test_derived_files_are_current() -> None:
    # The dashboard JSON and the PrometheusRule are written by docker/render.py, never by hand.
    assert load_script(DOCKER / "render.py").main(["--check"]) == 0


def test_the_dashboard_shows_the_ratios_the_alerts_fire_on() -> None:
    render = load_script(DOCKER / "render.py")
    rules = {
        rule["alert"]: rule["expr"]
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
    }
    assert rules["ReasonrecFallbackRateHigh"] == render.fallback_share("5m") + "\n> 0.05"
    assert rules["ReasonrecParseFailureRateHigh"] == render.parse_failure_share("15m") + "\n> 0.25"
    shown = {expr for _, expr in dashboard_queries()}
    assert {render.fallback_share(render.RATE), render.parse_failure_share(render.RATE)} <= shown


def test_the_dashboard_has_each_row_and_every_panel_queries() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert [p["title"] for p in panels if p["type"] == "row"] == ROWS
    for shown in panels:
        if shown["type"] != "row":
            assert shown["targets"] and all(metric_names(t["expr"]) for t in shown["targets"])
    assert len({p["id"] for p in panels}) == len(panels)


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        # label names in matchers, groupings and strings are not metrics
        ('sum by (route, status) (rate(a_total{route="/x"}[5m]))', {"a_total"}),
        # functions are not metrics; a colon belongs to the name
        ("histogram_quantile(0.99, sum by (le) (rate(vllm:ttft_bucket[$__rate_interval])))",
         {"vllm:ttft_bucket"}),
        # both sides of a binary operator; `time()` is a function
        ("time() - max(max_over_time(b[7d]) > 0) > 86400", {"b"}),
        ("sum(rate(a[1m])) / sum(rate(c{source=\"llm\"}[1m])) and on (x) d", {"a", "c", "d"}),
    ],
)  # fmt: skip
def test_metric_names_reads_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


@pytest.fixture(scope="module")
def scraped(gateway: Gateway, trainer: str) -> dict[str, set[str]]:
    """Series names each running process declares on /metrics."""
    return {
        "gateway": exported(httpx.get(f"{gateway.url}/metrics").text),
        "trainer": exported(httpx.get(trainer).text),
    }


def test_every_dashboard_and_alert_metric_is_exported(scraped: dict[str, set[str]]) -> None:
    known = scraped["gateway"] | scraped["trainer"] | vllm_metrics()
    queries = dashboard_queries() + alert_queries()
    missing = sorted(
        f"{where}: {name}" for where, expr in queries for name in metric_names(expr) - known
    )
    assert not missing, "metrics nothing exports:\n" + "\n".join(missing)


def test_each_process_exports_its_own_metrics(scraped: dict[str, set[str]]) -> None:
    # What the dashboard reads from each job is there (the metrics table in docs/configuration.md).
    gateway = {
        "reasonrec_http_requests_total",
        "reasonrec_engine_seconds_bucket",
        "reasonrec_positives_total",
    }
    assert gateway <= scraped["gateway"]
    assert "reasonrec_trainer_runs_total" in scraped["trainer"]
    # The trainer does not repeat the gateway's metrics (empty) beside its own, except the
    # records its reads skip, which it counts itself.
    reasonrec = {name for name in scraped["trainer"] if name.startswith("reasonrec_")}
    theirs = {name for name in reasonrec if not name.startswith("reasonrec_trainer_")}
    assert theirs == {"reasonrec_unreadable_records_total", "reasonrec_unreadable_records_created"}


def test_vllm_metrics_come_from_the_installed_vllm() -> None:
    names = vllm_metrics()
    # Counters gain _total, histograms _bucket: the dashboard must use the exposed names.
    assert {"vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_bucket"} <= names
    assert "vllm:generation_tokens" not in names


def test_promtool_checks_the_config_and_rules() -> None:
    out = run(tool("promtool"), "check", "config", str(DOCKER / "prometheus/prometheus.yml"))
    assert "SUCCESS: 7 rules found" in out


def test_alerts_fire_when_they_should() -> None:
    # Each alert against series that should (or should not) fire it: tests/deploy/alerts_test.yml.
    run(tool("promtool"), "test", "rules", str(Path(__file__).with_name("alerts_test.yml")))


# A real Prometheus ----------------------------------------------------------------------------


def _prometheus_config(gateway: Gateway, trainer: str) -> dict[str, Any]:
    """compose's prometheus.yml with loopback targets and one-second intervals."""
    config = yaml.safe_load((DOCKER / "prometheus/prometheus.yml").read_text())
    targets = {
        "gateway": gateway.url.removeprefix("http://"),
        "trainer": trainer.removeprefix("http://").removesuffix("/metrics"),
        "vllm": f"127.0.0.1:{free_port()}",  # no vLLM here: that target is down
    }
    assert {job["job_name"] for job in config["scrape_configs"]} == set(targets)
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(DOCKER / "prometheus" / name) for name in config["rule_files"]]
    return config


@pytest.fixture(scope="module")
def prometheus(
    gateway: Gateway, trainer: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("prometheus")
    config = folder / "prometheus.yml"
    config.write_text(yaml.safe_dump(_prometheus_config(gateway, trainer)))
    port = free_port()
    command = [
        tool("prometheus"),
        f"--config.file={config}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with (folder / "log").open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log, preexec_fn=dies_with_pytest)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/-/ready", process, START_SECONDS)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def eventually(check, seconds: float = 20) -> Any:
    """The first truthy result of `check()` within `seconds` (scrapes come every second)."""
    deadline = time.monotonic() + seconds
    while not (result := check()):
        assert time.monotonic() < deadline, "Prometheus never had it"
        time.sleep(0.5)
    return result


def test_prometheus_scrapes_the_gateway(prometheus: str, gateway: Gateway) -> None:
    served = f'job="gateway",model_version="{gateway.model_version}"'
    expr = f"sum(reasonrec_recommendations_total{{{served}}})"
    [sample] = eventually(lambda: query(prometheus, expr))
    assert float(sample["value"][1]) == gateway.recommendations

    def jobs_up() -> dict[str, str]:
        up = {r["metric"]["job"]: r["value"][1] for r in query(prometheus, "up")}
        return up if len(up) == 3 else {}

    # Once each job of compose's config was scraped: the gateway and the trainer are up.
    assert eventually(jobs_up) == {"gateway": "1", "trainer": "1", "vllm": "0"}


def test_every_dashboard_and_alert_query_evaluates(prometheus: str) -> None:
    for _, expr in dashboard_queries() + alert_queries():
        query(prometheus, grafana_to_promql(expr))  # fails on invalid PromQL
    # Rates need two scrapes: the traffic panel has data a moment later.
    [(_, traffic)] = [q for q in dashboard_queries() if q[0] == "Requests by route and status"]
    routes = eventually(lambda: query(prometheus, grafana_to_promql(traffic)))
    assert {"/v1/recommend", "/v1/feedback"} <= {r["metric"]["route"] for r in routes}


def test_prometheus_evaluates_every_rule(prometheus: str) -> None:
    def evaluated() -> list[dict[str, Any]]:
        body = httpx.get(f"{prometheus}/api/v1/rules").json()
        rules = [rule for group in body["data"]["groups"] for rule in group["rules"]]
        return rules if all(rule["lastEvaluation"] > "2000" for rule in rules) else []

    rules = eventually(evaluated)
    assert {rule["name"] for rule in rules} == {alert for alert, _ in alert_queries()}
    assert {rule["name"]: rule["health"] for rule in rules} == {r["name"]: "ok" for r in rules}
