"""k8s/: each overlay renders (kubectl's kustomize, what `kubectl apply -k` runs), every resource
validates offline against the schemas of the Kubernetes version docs/deploy.md states, and the
references between resources hold: selectors, ConfigMap/Secret/PVC names, ports, settings,
commands. The Prometheus Operator's kinds have no schema there; their contents are checked."""

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.helpers import (
    DOCKER,
    K8S,
    KUBERNETES_VERSION,
    ROOT,
    cli_accepts,
    kustomize,
    load_script,
    run,
    settings_problems,
    tool,
)

OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
WORKLOADS = {"Deployment", "StatefulSet", "CronJob"}
OURS = {"gateway", "vllm", "trainer", "retrain"}  # workloads running the reasonrec image
STOP_SECONDS = load_script(DOCKER / "serve_vllm.py").STOP_SECONDS

Resources = list[dict[str, Any]]


@pytest.fixture(scope="module", params=["dev", "gpu"])
def overlay(request: pytest.FixtureRequest) -> tuple[str, Resources]:
    return request.param, kustomize(K8S / "overlays" / request.param)


def named(resources: Resources, kind: str) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]


def workloads(resources: Resources) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] in WORKLOADS}


def requested_memory_gib(resources: Resources) -> float:
    """The memory every workload's pods request at once (one of each, times its replicas)."""
    units = {"Mi": 1 / 1024, "Gi": 1}
    total = 0.0
    for workload in workloads(resources).values():
        for container in pod_spec(workload)["spec"]["containers"]:
            memory = container.get("resources", {}).get("requests", {}).get("memory", "0Gi")
            total += float(memory[:-2]) * units[memory[-2:]] * workload["spec"].get("replicas", 1)
    return total


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def config(resources: Resources) -> dict[str, str]:
    """The environment every reasonrec pod gets: the ConfigMap, then the Secret (which wins)."""
    [configmap] = [
        c for n, c in named(resources, "ConfigMap").items() if n.startswith("reasonrec-config")
    ]
    [secret] = named(resources, "Secret").values()
    decoded = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    return configmap["data"] | decoded


def test_every_resource_validates(overlay: tuple[str, Resources]) -> None:
    validator = pytest.importorskip(
        "kubernetes_validate", reason="make install (kubernetes-validate, in the dev extra)"
    )
    _, resources = overlay
    for resource in resources:
        if resource["kind"] not in OPERATOR_KINDS:
            validator.validate(resource, KUBERNETES_VERSION, strict=True)


def test_the_validator_rejects_a_misspelt_field() -> None:
    validator = pytest.importorskip(
        "kubernetes_validate", reason="make install (kubernetes-validate, in the dev extra)"
    )
    pvc = yaml.safe_load((K8S / "base/data-pvc.yaml").read_text())
    pvc["spec"]["accessMode"] = pvc["spec"].pop("accessModes")
    with pytest.raises(validator.ValidationError):
        validator.validate(pvc, KUBERNETES_VERSION, strict=True)


def test_the_overlay_has_every_part(overlay: tuple[str, Resources]) -> None:
    _, resources = overlay
    kinds = {(r["kind"], r["metadata"]["name"].rsplit("-", 1)[0]) for r in resources}
    assert {
        ("Namespace", "reasonrec"),
        ("StatefulSet", "redis"),
        ("Deployment", "vllm"),
        ("Deployment", "gateway"),
        ("Deployment", "trainer"),
        ("CronJob", "retrain"),
        ("HorizontalPodAutoscaler", "gateway"),
        ("PodDisruptionBudget", "gateway"),
        ("ServiceMonitor", "reasonrec"),
        ("PrometheusRule", "reasonrec"),
    } <= kinds
    namespaced = [r for r in resources if r["kind"] != "Namespace"]
    assert {r["metadata"]["namespace"] for r in namespaced} == {"reasonrec"}
    assert list(named(resources, "PersistentVolumeClaim")) == ["reasonrec-data"]
    redis = named(resources, "StatefulSet")["redis"]
    assert redis["spec"]["volumeClaimTemplates"]
    assert "--appendonly" in redis["spec"]["template"]["spec"]["containers"][0]["args"]


def test_workloads_reference_what_exists(overlay: tuple[str, Resources]) -> None:
    _, resources = overlay
    configmaps, secrets = named(resources, "ConfigMap"), named(resources, "Secret")
    claims = named(resources, "PersistentVolumeClaim")
    for name, workload in workloads(resources).items():
        template = pod_spec(workload)
        if workload["kind"] != "CronJob":
            assert selects(
                workload["spec"]["selector"]["matchLabels"], template["metadata"]["labels"]
            )
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        for container in template["spec"]["containers"]:
            assert ":" in container["image"], f"{name}: image without a tag"
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps
                else:
                    assert source["secretRef"]["name"] in secrets
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in {
                    t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])
                }


def test_our_pods_run_commands_that_exist_with_real_settings(
    overlay: tuple[str, Resources],
) -> None:
    _, resources = overlay
    copied = (DOCKER / "Dockerfile").read_text()
    for name in OURS:
        template = pod_spec(workloads(resources)[name])
        [container] = template["spec"]["containers"]
        command = container["command"]
        if command[0] == "reasonrec":
            assert cli_accepts(command[1:]), command
        else:
            assert command == ["python", "/app/serve_vllm.py"] and "docker/serve_vllm.py" in copied
        # ConfigMap first, Secret second: a value in the Secret (a Redis password) wins.
        assert [next(iter(s)) for s in container["envFrom"]] == ["configMapRef", "secretRef"]
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
        # Service links would give vLLM a VLLM_PORT=tcp://... it refuses at engine start.
        assert template["spec"]["enableServiceLinks"] is False
        mount = next(m for m in container["volumeMounts"] if m["name"] == "data")
        assert mount["mountPath"] == config(resources)["REASONREC_DATA_DIR"]
        assert mount.get("readOnly", False) == (name in {"gateway", "vllm"})
    assert settings_problems(config(resources)) == []


def _container_ports(resources: Resources, selector: dict[str, str]) -> set[str]:
    pods = [pod_spec(w) for w in workloads(resources).values()]
    matched = [p for p in pods if selects(selector, p["metadata"].get("labels", {}))]
    assert matched, f"no pod has labels {selector}"
    return {port["name"] for p in matched for c in p["spec"]["containers"] for port in c["ports"]}


def test_pods_are_given_the_time_their_stop_takes(overlay: tuple[str, Resources]) -> None:
    """The kubelet kills at the end of the grace period (default 30 s): vLLM's launcher waits 30 s
    for vLLM, a refresh for its GRPO step; a gateway keeps listening while endpoints update."""
    _, resources = overlay
    grace = {
        name: pod_spec(workload)["spec"].get("terminationGracePeriodSeconds", 30)
        for name, workload in workloads(resources).items()
        if name in OURS
    }
    assert grace["vllm"] > STOP_SECONDS
    assert grace["trainer"] >= 300 and grace["retrain"] >= 300
    [gateway] = pod_spec(workloads(resources)["gateway"])["spec"]["containers"]
    pause = gateway["lifecycle"]["preStop"]["exec"]["command"]
    budget = int(config(resources)["REASONREC_LLM_TIMEOUT_MS"]) / 1000
    assert pause[0] == "sleep" and 0 < int(pause[1]) < grace["gateway"] - budget


def test_services_reach_pods_and_settings_reach_services(overlay: tuple[str, Resources]) -> None:
    _, resources = overlay
    services = named(resources, "Service")
    for service in services.values():
        ports = _container_ports(resources, service["spec"]["selector"])
        for port in service["spec"]["ports"]:
            assert port.get("targetPort", port["name"]) in ports
    settings = config(resources)
    for url in (settings["REASONREC_ENGINE_URL"], settings["REASONREC_REDIS_URL"]):
        host, port = url.split("://")[1].split("/")[0].split(":")
        assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}, url


def test_the_gateway_scales_apart_and_drains_one_pod_at_a_time(
    overlay: tuple[str, Resources],
) -> None:
    _, resources = overlay
    gateway = named(resources, "Deployment")["gateway"]
    hpa = named(resources, "HorizontalPodAutoscaler")["gateway"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "gateway",
    }
    assert "replicas" not in gateway["spec"]  # the HPA owns it
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pdb = named(resources, "PodDisruptionBudget")["gateway"]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_spec(gateway)["metadata"]["labels"])
    vllm = pod_spec(named(resources, "Deployment")["vllm"])["spec"]["containers"][0]
    assert vllm["readinessProbe"]["httpGet"]["path"] == "/health"
    # the port opens only after start-up: liveness alone would restart a slow start for ever
    [container] = pod_spec(gateway)["spec"]["containers"]
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/healthz"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    # a refresh's training slows /metrics past the default 1 s: three such probes killed it
    [trainer] = pod_spec(named(resources, "Deployment")["trainer"])["spec"]["containers"]
    assert trainer["livenessProbe"].get("timeoutSeconds", 1) >= 5


def test_the_service_monitor_scrapes_gateway_trainer_and_vllm(
    overlay: tuple[str, Resources],
) -> None:
    _, resources = overlay
    [monitor] = named(resources, "ServiceMonitor").values()
    ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    scraped = {
        name
        for name, service in named(resources, "Service").items()
        if selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        and ports & {p["name"] for p in service["spec"]["ports"]}
    }
    # The job names of compose's Prometheus, so the dashboard reads the same series.
    compose_jobs = yaml.safe_load((DOCKER / "prometheus/prometheus.yml").read_text())
    assert scraped == {job["job_name"] for job in compose_jobs["scrape_configs"]}


def test_the_prometheus_rule_holds_the_alerts_and_promtool_accepts_them(
    overlay: tuple[str, Resources], tmp_path: Path
) -> None:
    _, resources = overlay
    [rule] = named(resources, "PrometheusRule").values()
    assert rule["spec"] == yaml.safe_load((DOCKER / "prometheus/alerts.yml").read_text())
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(rule["spec"]))
    run(tool("promtool"), "check", "rules", str(rules))


def test_the_dashboard_configmap_is_the_compose_dashboard(overlay: tuple[str, Resources]) -> None:
    _, resources = overlay
    dashboard = named(resources, "ConfigMap")["reasonrec-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    expected = (DOCKER / "grafana/dashboards/reasonrec.json").read_text()
    assert json.loads(dashboard["data"]["reasonrec.json"]) == json.loads(expected)


def test_gpu_and_dev_overlays_differ_where_they_should() -> None:
    gpu, dev = kustomize(K8S / "overlays/gpu"), kustomize(K8S / "overlays/dev")
    for resources, variant, dtype in ((gpu, "gpu", "auto"), (dev, "cpu", "float32")):
        ours = [pod_spec(workloads(resources)[name]) for name in OURS]
        assert {c["image"] for p in ours for c in p["spec"]["containers"]} == {
            f"reasonrec:{variant}"
        }
        assert config(resources)["REASONREC_ENGINE_DTYPE"] == dtype
    gpu_vllm, dev_vllm = (named(r, "Deployment")["vllm"] for r in (gpu, dev))
    assert pod_spec(gpu_vllm)["spec"]["containers"][0]["resources"]["limits"] == {
        "nvidia.com/gpu": 1
    }
    assert gpu_vllm["spec"]["replicas"] == 2
    assert "nvidia.com/gpu" not in json.dumps(dev)
    assert "--enforce-eager" in pod_spec(dev_vllm)["spec"]["containers"][0]["args"]
    # kind's and k3d's local-path provisioner refuses ReadWriteMany: the claim would never bind
    claims = (named(r, "PersistentVolumeClaim")["reasonrec-data"]["spec"] for r in (gpu, dev))
    assert [claim["accessModes"] for claim in claims] == [["ReadWriteMany"], ["ReadWriteOnce"]]
    assert requested_memory_gib(dev) <= 10 < requested_memory_gib(gpu)


def test_the_managed_redis_component_removes_the_in_cluster_redis(tmp_path: Path) -> None:
    url = "rediss://:secret@redis.example.net:6380/0"
    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays/dev", tmp_path)],
        "components": [os.path.relpath(K8S / "components/managed-redis", tmp_path)],
        "secretGenerator": [
            {
                "name": "reasonrec-keys",
                "behavior": "merge",
                "literals": [f"REASONREC_REDIS_URL={url}"],
            }
        ],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    resources = kustomize(tmp_path)
    assert "redis" not in named(resources, "StatefulSet") | named(resources, "Service")
    assert config(resources)["REASONREC_REDIS_URL"] == url  # the Secret's value wins


def test_deploy_docs_state_the_validated_kubernetes_version() -> None:
    major_minor = KUBERNETES_VERSION.rsplit(".", 1)[0]
    page = (ROOT / "docs" / "deploy.md").read_text()
    kubernetes = page.partition("\n### Kubernetes\n")[2].partition("\n### ")[0]
    assert f"Kubernetes {major_minor}" in kubernetes
