"""docker-compose.yml passes `docker-compose config`; Kubernetes manifests are well-formed."""

from __future__ import annotations

import subprocess

import yaml
from deploy_helpers import DEPLOY, ROOT, require_tool

from pipeline.kafka.local import KAFKA_VERSION, TESTED_VERSIONS

COMPOSE = ROOT / "docker-compose.yml"


def test_docker_compose_config():
    compose = require_tool("docker-compose")
    proc = subprocess.run(
        [compose, "-f", str(COMPOSE), "config", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_wiring():
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    assert {"kafka", "worker1", "worker2", "prometheus", "alertmanager", "grafana"} <= set(services)
    for worker in ("worker1", "worker2"):
        svc = services[worker]
        assert svc["build"]["dockerfile"] == "deploy/docker/Dockerfile"
        assert svc["environment"]["PIPELINE_BROKER"] == "kafka:9092"
        assert "healthcheck" in svc
        assert svc["depends_on"]["kafka"]["condition"] == "service_healthy"
    # the image is the Apache Kafka version the suite runs against; topics come from the workers
    assert services["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}"
    assert services["kafka"]["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    for name in ("kafka", "prometheus", "alertmanager", "grafana"):
        assert "healthcheck" in services[name], name
    # every mounted path exists in the repository
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), (name, source)
    assert (ROOT / "deploy" / "docker" / "Dockerfile").exists()


def test_kubernetes_manifests():
    docs = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] != "Kustomization"]
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Service", "ConfigMap", "PodMonitor"} <= kinds
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"]
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    assert config["metadata"]["annotations"]["funnel-pipeline/kafka-versions-tested"].split() == list(
        TESTED_VERSIONS
    )
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"][0]["containerPort"] == 8080
    assert sts["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


def test_kustomize_renders_if_available():
    """`kubectl kustomize` renders the manifests offline (no cluster is contacted)."""
    import shutil

    import pytest

    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed: offline kustomize rendering not checked")
    proc = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "kubernetes")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(proc.stdout) if d]
    assert sorted(kinds) == ["ConfigMap", "PodMonitor", "Service", "Service", "StatefulSet"]
