"""docker/: the Dockerfile lints clean and copies what exists; the compose stack parses (with
Docker Compose v2 itself, no engine needed) and every image, command, setting, port and file it
names exists. Images are not built here: there is no Docker engine on these machines."""

import os
import re
import tomllib
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from tests.deploy.helpers import (
    COMPOSE_CPU,
    COMPOSE_GPU,
    DOCKER,
    ROOT,
    cli_accepts,
    compose_config,
    load_script,
    reasonrec_env,
    run,
    settings_problems,
    tool,
)

DOCKERFILE = DOCKER / "Dockerfile"
OURS = {"gateway", "trainer", "vllm"}  # services that run the reasonrec image
VLLM_PORT = 8000  # vLLM's default; the launcher passes no --port


def test_dockerfile_lints_clean() -> None:
    run(tool("hadolint"), str(DOCKERFILE))


def _copied() -> list[str]:
    """Sources of the Dockerfile's COPY lines that read the build context."""
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += line.split()[1:-1]
    return sources


def test_the_image_copies_files_that_exist_and_the_context_keeps_only_them() -> None:
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    kept = {line.removeprefix("!").rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore  # everything else (.venv, var, .git) stays out of the context
    for source in _copied():
        assert (ROOT / source).exists(), source
        assert source.rstrip("/") in kept, f"{source} is copied but not let into the context"


def test_each_variant_is_an_extra_with_its_stages() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", DOCKERFILE.read_text(), re.MULTILINE))
    for variant in ("cpu", "gpu"):
        assert variant in extras
        assert {f"deps-{variant}", f"runtime-{variant}"} <= stages


@pytest.fixture(scope="module", params=["gpu", "cpu"])
def compose(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """(variant, the project as Docker Compose resolves it): compose.yaml, or with the CPU
    override."""
    files = COMPOSE_GPU if request.param == "gpu" else COMPOSE_CPU
    return request.param, compose_config(files)


def test_the_stack_has_every_service(compose: tuple[str, dict[str, Any]]) -> None:
    _, project = compose
    assert set(project["services"]) == OURS | {"redis", "prometheus", "grafana"}


def test_images_are_built_or_pinned(compose: tuple[str, dict[str, Any]]) -> None:
    variant, project = compose
    for name, service in project["services"].items():
        if name in OURS:
            assert service["image"] == f"reasonrec:{variant}"
            assert service["build"]["args"] == {"VARIANT": variant}
            assert (ROOT / service["build"]["dockerfile"]) == DOCKERFILE
        else:
            tag = service["image"].rpartition(":")[2]
            assert re.fullmatch(r"v?\d+\.\d+\.\d+(-\w+)?", tag), f"{name}: pin a version"


def test_commands_exist(compose: tuple[str, dict[str, Any]]) -> None:
    _, project = compose
    copied = {f"/app/{source.rpartition('/')[2]}" for source in _copied()}
    for name in OURS:
        command = project["services"][name]["command"]
        if command[0] == "reasonrec":
            assert cli_accepts(command[1:]), command
        else:
            assert command[:2] == ["python", "/app/serve_vllm.py"] and command[1] in copied
        healthcheck = project["services"][name].get("healthcheck", {}).get("test", [])
        assert not healthcheck or healthcheck[2] in copied


def test_the_image_health_check_follows_what_the_container_runs(
    compose: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`docker run` of the trainer or vLLM gets no compose health check: the image's must probe
    what that command serves, the URL compose states."""
    healthcheck = load_script(DOCKER / "healthcheck.py")
    _, project = compose
    checked = set()
    for name in OURS:
        service = project["services"][name]
        monkeypatch.setattr(os, "environ", {**os.environ, **service.get("environment", {})})
        command = [*(service.get("entrypoint") or []), *(service.get("command") or [])]
        test = service.get("healthcheck", {}).get("test", [])
        url = test[3] if len(test) > 3 else "http://127.0.0.1:8000/healthz"
        assert healthcheck.default_url(command or ["reasonrec", "serve"]) == url, name
        checked.add(urlparse(url).path)
    assert checked == {"/healthz", "/health", "/metrics"}


def test_settings_exist_with_valid_values(compose: tuple[str, dict[str, Any]]) -> None:
    _, project = compose
    for name in OURS:
        env = reasonrec_env(project["services"][name]["environment"])
        assert settings_problems(env) == [], name


def _listens_on(service: dict[str, Any]) -> int:
    command, env = service["command"], service["environment"]
    if command[:2] == ["reasonrec", "serve"]:
        return int(env["REASONREC_PORT"])
    if command[:2] == ["reasonrec", "trainer"]:
        return int(env["REASONREC_TRAINER_METRICS_PORT"])
    assert "--port" not in command
    return VLLM_PORT


def test_prometheus_and_the_gateway_reach_services_where_they_listen(
    compose: tuple[str, dict[str, Any]],
) -> None:
    _, project = compose
    services = project["services"]
    config = yaml.safe_load((DOCKER / "prometheus/prometheus.yml").read_text())
    targets = [
        t for job in config["scrape_configs"] for s in job["static_configs"] for t in s["targets"]
    ]
    assert {t.partition(":")[0] for t in targets} == OURS
    for target in targets:
        host, _, port = target.partition(":")
        assert int(port) == _listens_on(services[host]), target
    engine = urlparse(services["gateway"]["environment"]["REASONREC_ENGINE_URL"])
    assert (engine.hostname, engine.port) == ("vllm", _listens_on(services["vllm"]))
    redis = urlparse(services["gateway"]["environment"]["REASONREC_REDIS_URL"])
    assert redis.hostname == "redis" and "--appendonly" in services["redis"]["command"]


def test_data_volume_is_shared_and_only_the_trainer_writes(
    compose: tuple[str, dict[str, Any]],
) -> None:
    _, project = compose
    for name in OURS:
        service = project["services"][name]
        [mount] = service["volumes"]
        assert (mount["source"], mount["target"]) == (
            "data",
            service["environment"]["REASONREC_DATA_DIR"],
        )
        assert mount.get("read_only", False) == (name != "trainer")


def test_mounted_files_exist_where_their_configs_point(
    compose: tuple[str, dict[str, Any]],
) -> None:
    _, project = compose
    binds = {
        mount["target"]: mount["source"]
        for service in project["services"].values()
        for mount in service.get("volumes", [])
        if mount["type"] == "bind"
    }
    assert all(ROOT.joinpath(source).exists() for source in binds.values())
    provisioning = DOCKER / "grafana/provisioning"
    [provider] = yaml.safe_load((provisioning / "dashboards/reasonrec.yml").read_text())[
        "providers"
    ]
    assert binds[provider["options"]["path"]] == str(DOCKER / "grafana/dashboards")
    [source] = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    assert urlparse(source["url"]).hostname in project["services"]
    assert binds["/etc/prometheus"] == str(DOCKER / "prometheus")


def test_containers_are_given_the_time_their_stop_takes(
    compose: tuple[str, dict[str, Any]],
) -> None:
    """Compose kills 10 s after SIGTERM unless told otherwise: vLLM's launcher waits 30 s for
    vLLM, a refresh for its GRPO step."""
    _, config = compose
    services = config["services"]
    stop_seconds = load_script(DOCKER / "serve_vllm.py").STOP_SECONDS
    assert _seconds(services["vllm"]["stop_grace_period"]) > stop_seconds
    assert _seconds(services["trainer"]["stop_grace_period"]) >= 300


def _seconds(duration: str) -> float:
    """A compose duration as `docker compose config` writes it (`5m0s`, `45s`)."""
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(h|m|s)", duration))


def test_only_the_gpu_stack_reserves_a_gpu(compose: tuple[str, dict[str, Any]]) -> None:
    variant, project = compose
    devices = project["services"]["vllm"].get("deploy", {}).get("resources", {})
    reserved = devices.get("reservations", {}).get("devices", [])
    assert [d["capabilities"] for d in reserved] == ([["gpu"]] if variant == "gpu" else [])


def test_our_services_rotate_their_logs(compose: tuple[str, dict[str, Any]]) -> None:
    """A JSON line a request: Docker's default driver would keep every one of them."""
    _, project = compose
    for name in OURS:
        logging = project["services"][name]["logging"]
        assert logging["driver"] == "json-file" and logging["options"]["max-size"], name


def test_only_the_gateway_is_published_beyond_the_hosts_loopback(
    compose: tuple[str, dict[str, Any]],
) -> None:
    """Prometheus has no authentication and Grafana starts with a known password."""
    _, project = compose
    published = {
        name: {(port.get("host_ip", ""), port["published"]) for port in service.get("ports", [])}
        for name, service in project["services"].items()
    }
    assert published["gateway"] == {("", "8000")}
    assert published["prometheus"] == {("127.0.0.1", "9090")}
    assert published["grafana"] == {("127.0.0.1", "3000")}
    assert not {name for name, ports in published.items() if ports} - {
        "gateway",
        "prometheus",
        "grafana",
    }
