"""docker-compose.yml passes `docker-compose config`; Kubernetes manifests are well-formed; the
secured-Kafka variants (compose override, kustomize overlay) give the workers the password only
as a mounted file."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from pathlib import Path

import certifi
import pytest
import yaml
from deploy_helpers import DEPLOY, ROOT, require_tool

from pipeline.kafka.local import KAFKA_VERSION, TESTED_VERSIONS
from pipeline.kafka.security import client_options, describe
from pipeline.settings import Settings

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


# --- secured Kafka: the SASL_SSL compose override and Kubernetes overlay ---------------------

SASL_SSL_OVERRIDE = DEPLOY / "docker" / "compose.sasl-ssl.yml"
K8S_SASL_SSL = DEPLOY / "kubernetes-sasl-ssl"
WORKERS = ("worker1", "worker2")
BOOTSTRAP = "b-1.kafka.example.com:9096,b-2.kafka.example.com:9096"
# in the shell that runs compose: it must reach neither the rendered file nor a worker
SHELL_PASSWORD = "password-from-the-shell-must-not-appear"


def _compose_config(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` of base + SASL_SSL override, with an empty .env and only `env`
    of the PIPELINE_* variables (a developer's own .env or shell cannot change the outcome)."""
    compose = require_tool("docker-compose")
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "COMPOSE_"))}
    return subprocess.run(
        [compose, "--env-file", str(env_file), "-f", str(COMPOSE), "-f", str(SASL_SSL_OVERRIDE), "config"],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _secret_files(tmp_path: Path, mounts: dict[str, list[str]]) -> dict[str, Path]:
    """Stand-ins for mounted secrets: {mount directory: its file names} -> {mount: local dir}.
    A CA gets a real PEM bundle, so that the worker's own TLS context can be built from it."""
    local = {}
    for n, (mount, names) in enumerate(sorted(mounts.items())):
        folder = tmp_path / f"mount{n}"
        folder.mkdir(parents=True)
        for name in names:
            if "ca" in name.split(".")[0].split("_"):  # kafka_ca (compose), ca.crt (Kubernetes)
                (folder / name).write_bytes(Path(certifi.where()).read_bytes())
            else:
                (folder / name).write_text(f"{name}-{'x' * 40}\n")
        local[mount] = folder
    return local


def _settings_with_mounts(env: dict[str, str], local: dict[str, Path]) -> Settings:
    """The worker's own settings check on `env`, its secret paths moved to the stand-ins."""
    moved = {}
    for key, value in env.items():
        for mount, folder in local.items():
            if value.startswith(mount.rstrip("/") + "/"):
                value = str(folder / value[len(mount.rstrip("/")) + 1 :])
        moved[key] = str(value)
    return Settings.from_env(moved)


def _assert_connects_with_file_password(settings: Settings, user: str, password_file: Path) -> None:
    options = client_options(settings)
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_username"] == user
    assert options["sasl_plain_password"] == password_file.read_text().strip()
    context = options["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert options["sasl_plain_password"] not in describe(settings)


def test_compose_sasl_ssl_override(tmp_path):
    """Base + deploy/docker/compose.sasl-ssl.yml passes `docker-compose config`; the workers get
    the SASL_SSL variables with the password only as a mounted secret file, the bundled Kafka
    gets no container, and the worker's own settings check accepts what they get."""
    proc = _compose_config(
        tmp_path,
        {
            "PIPELINE_BROKER": BOOTSTRAP,
            "PIPELINE_KAFKA_SASL_USERNAME": "worker",
            "PIPELINE_KAFKA_SASL_PASSWORD": SHELL_PASSWORD,
        },
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert SHELL_PASSWORD not in proc.stdout
    doc = yaml.safe_load(proc.stdout)
    services = doc["services"]
    # the plaintext node stays defined (depends_on cannot be removed by an override) but runs no container
    assert services["kafka"]["deploy"]["replicas"] == 0
    assert doc["secrets"]["kafka_sasl_password"]["file"] == str(ROOT / "secrets" / "kafka_sasl_password")
    assert doc["secrets"]["kafka_ca"]["file"] == str(ROOT / "secrets" / "kafka_ca.pem")
    for worker in WORKERS:
        svc = services[worker]
        env = svc["environment"]
        assert env["PIPELINE_BROKER"] == BOOTSTRAP
        assert "--broker" not in svc["command"]  # the command line would win over PIPELINE_BROKER
        assert env["PIPELINE_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
        assert env["PIPELINE_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
        assert env["PIPELINE_KAFKA_SASL_USERNAME"] == "worker"
        assert "PIPELINE_KAFKA_SASL_PASSWORD" not in env
        assert env["PIPELINE_KAFKA_SASL_PASSWORD_FILE"] == "/run/secrets/kafka_sasl_password"
        assert env["PIPELINE_KAFKA_SSL_CAFILE"] == "/run/secrets/kafka_ca"
        mounted = {s.get("target", s["source"]) for s in svc["secrets"]}
        assert {"kafka_sasl_password", "kafka_ca", "pipeline_ingest_token", "pipeline_id_salt"} <= mounted
        # every file a variable names is a mounted secret
        for key, value in env.items():
            if str(value).startswith("/run/secrets/"):
                assert value.removeprefix("/run/secrets/") in mounted, (worker, key, value)
        local = _secret_files(tmp_path / worker, {"/run/secrets": sorted(mounted)})
        settings = _settings_with_mounts(env, local)
        _assert_connects_with_file_password(settings, "worker", local["/run/secrets"] / "kafka_sasl_password")
        assert settings.broker == BOOTSTRAP


def test_compose_sasl_ssl_override_needs_broker_and_user(tmp_path):
    """Without PIPELINE_BROKER or the user name compose refuses, naming the variable, instead of
    starting workers against a placeholder."""
    for missing in ("PIPELINE_BROKER", "PIPELINE_KAFKA_SASL_USERNAME"):
        env = {"PIPELINE_BROKER": BOOTSTRAP, "PIPELINE_KAFKA_SASL_USERNAME": "worker"}
        del env[missing]
        proc = _compose_config(tmp_path, env)
        assert proc.returncode != 0, missing
        assert f"set {missing}" in proc.stderr, proc.stderr


def _k8s_docs(folder: Path) -> list[dict]:
    docs = []
    for path in sorted(folder.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _find(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def _overlay_applied() -> tuple[dict, dict, dict[str, dict]]:
    """The overlay's patches applied to the base as kustomize's strategic merge does for these
    fields (ConfigMap data by key, containers by name, mounts by path, volumes by name), without
    a kustomize binary; and every example Secret by name."""
    kustomization = yaml.safe_load((K8S_SASL_SSL / "kustomization.yaml").read_text())
    # a sibling of the base: kustomize refuses an overlay inside its base's directory
    assert kustomization["resources"] == ["../kubernetes"]
    patch_files = [p["path"] for p in kustomization["patches"]]
    assert "kafka-secret.example.yaml" not in [*kustomization["resources"], *patch_files]
    base = [d for d in _k8s_docs(DEPLOY / "kubernetes") if d["kind"] != "Kustomization"]
    examples = {d["metadata"]["name"]: d for d in base if d["kind"] == "Secret"}
    overlay_secret = yaml.safe_load((K8S_SASL_SSL / "kafka-secret.example.yaml").read_text())
    examples[overlay_secret["metadata"]["name"]] = overlay_secret
    config = _find(base, "ConfigMap", "funnel-pipeline")
    sts = _find(base, "StatefulSet", "funnel-pipeline")
    config, sts = yaml.safe_load(yaml.safe_dump(config)), yaml.safe_load(yaml.safe_dump(sts))
    for path in patch_files:
        patch = yaml.safe_load((K8S_SASL_SSL / path).read_text())
        target = _find(base, patch["kind"], patch["metadata"]["name"])  # patches what the base has
        if patch["kind"] == "ConfigMap":
            config["data"].update(patch["data"])
        else:
            assert target["kind"] == "StatefulSet"
            spec, patch_spec = sts["spec"]["template"]["spec"], patch["spec"]["template"]["spec"]
            for patch_container in patch_spec.get("containers", []):
                container = next(c for c in spec["containers"] if c["name"] == patch_container["name"])
                paths = {m["mountPath"] for m in container["volumeMounts"]}
                for mount in patch_container.get("volumeMounts", []):
                    assert mount["mountPath"] not in paths
                    container["volumeMounts"].append(mount)
            names = {v["name"] for v in spec["volumes"]}
            for volume in patch_spec.get("volumes", []):
                assert volume["name"] not in names
                spec["volumes"].append(volume)
    return config, sts, examples


def test_kubernetes_sasl_ssl_overlay(tmp_path):
    """deploy/kubernetes-sasl-ssl: the ConfigMap gets the SASL_SSL variables with the password
    only as a file, that file and the CA are keys of the example Secret mounted by the
    StatefulSet patch, and the worker's own settings check accepts the result."""
    config, sts, examples = _overlay_applied()
    data = config["data"]
    assert data["PIPELINE_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert data["PIPELINE_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert data["PIPELINE_KAFKA_SASL_USERNAME"]
    assert "PIPELINE_KAFKA_SASL_PASSWORD" not in data
    spec = sts["spec"]["template"]["spec"]
    container = next(c for c in spec["containers"] if c["name"] == "worker")
    assert {"configMapRef": {"name": config["metadata"]["name"]}} in container["envFrom"]
    assert not any(e["name"].startswith("PIPELINE_KAFKA_SASL_PASSWORD") for e in container.get("env", []))
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {}  # mount path -> the example Secret mounted there
    for mount in container["volumeMounts"]:
        secret = volumes.get(mount["name"], {}).get("secret")  # "data": a volume claim
        if secret:
            assert mount.get("readOnly") is True
            mounts[mount["mountPath"]] = examples[secret["secretName"]]
    paths = sorted(mounts)
    assert not any(b.startswith(a.rstrip("/") + "/") for a in paths for b in paths if a != b)
    for key in ("PIPELINE_KAFKA_SASL_PASSWORD_FILE", "PIPELINE_KAFKA_SSL_CAFILE"):
        folder, _, name = data[key].rpartition("/")
        assert folder in mounts, (key, data[key])
        assert name in mounts[folder]["stringData"], (key, name)
    kafka_secret = mounts[data["PIPELINE_KAFKA_SASL_PASSWORD_FILE"].rpartition("/")[0]]
    assert kafka_secret["metadata"]["name"] == "funnel-pipeline-kafka"
    assert set(kafka_secret["stringData"]) == {"sasl-password", "ca.crt"}
    for secret in examples.values():  # examples hold no value
        assert all(value == "" for value in secret["stringData"].values()), secret["metadata"]["name"]
    local = _secret_files(tmp_path, {path: sorted(s["stringData"]) for path, s in mounts.items()})
    settings = _settings_with_mounts(data, local)
    folder, _, name = data["PIPELINE_KAFKA_SASL_PASSWORD_FILE"].rpartition("/")
    _assert_connects_with_file_password(settings, data["PIPELINE_KAFKA_SASL_USERNAME"], local[folder] / name)


def test_kustomize_renders_sasl_ssl_overlay_if_available():
    """`kubectl kustomize` renders the overlay offline to what the test above computes."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed: offline kustomize rendering not checked")
    proc = subprocess.run(
        [kubectl, "kustomize", str(K8S_SASL_SSL)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "PodMonitor", "Service", "Service", "StatefulSet"]
    config, sts, _ = _overlay_applied()
    rendered_config = _find(docs, "ConfigMap", "funnel-pipeline")
    assert rendered_config["data"] == config["data"]
    rendered = _find(docs, "StatefulSet", "funnel-pipeline")["spec"]["template"]["spec"]
    expected = sts["spec"]["template"]["spec"]

    def by_key(items: list[dict], key: str) -> dict:
        return {item[key]: item for item in items}

    assert by_key(rendered["volumes"], "name") == by_key(expected["volumes"], "name")
    assert by_key(rendered["containers"][0]["volumeMounts"], "mountPath") == by_key(
        expected["containers"][0]["volumeMounts"], "mountPath"
    )
