"""docker-compose.yml passes `docker-compose config`; Kubernetes manifests are well-formed; both
ship secure: secrets for the token, the salt and provider credentials, the admin port unpublished,
and a worker started from their settings passes the exposure check only once the secrets exist."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from deploy_helpers import DEPLOY, ROOT, require_tool

from pipeline.credentials import provider_credentials, provider_users
from pipeline.http.security import check_listeners
from pipeline.settings import Settings, SettingsError

COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
KUBERNETES = DEPLOY / "kubernetes"


def test_docker_compose_config():
    compose = require_tool("docker-compose")
    proc = subprocess.run(
        [compose, "-f", str(COMPOSE), "config", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # and with the example .env filled in as a user would
    proc = subprocess.run(
        [compose, "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
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
    assert services["kafka"]["image"].startswith("apache/kafka")
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
    for path in sorted(KUBERNETES.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] != "Kustomization"]
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Service", "ConfigMap", "PodMonitor"} <= kinds
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"]
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


def settings_with_secret_files(env: dict[str, str], files: dict[str, str], tmp_path: Path) -> Settings:
    """Settings from a deployment's environment, its secret files laid down under tmp_path."""
    env = dict(env)
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name, value in list(env.items()):
        if name.endswith("_FILE") and value in files:
            path = tmp_path / Path(value).name
            path.write_text(files[value])
            env[name] = str(path)
    return Settings.from_env(env)


def test_compose_ships_secure(tmp_path):
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    declared = doc["secrets"]
    for worker in ("worker1", "worker2"):
        svc = services[worker]
        env = svc["environment"]
        admin = int(env["PIPELINE_ADMIN_PORT"])
        # only the public port is published; the admin port stays on the compose network
        assert [str(p).rsplit(":", 1)[1] for p in svc["ports"]] == [env["PIPELINE_PORT"]]
        assert str(admin) in svc["healthcheck"]["test"][-1]
        # token and salt from compose secrets, which the service mounts
        for variable, secret in (
            ("PIPELINE_INGEST_TOKEN_FILE", "pipeline_ingest_token"),
            ("PIPELINE_ID_SALT_FILE", "pipeline_id_salt"),
        ):
            assert env[variable] == f"/run/secrets/{secret}" and secret in svc["secrets"]
            assert declared[secret]["file"].startswith("./secrets/")
        # every provider credential can be given through .env
        for variable in (*provider_users(), *(v for vs in provider_credentials().values() for v in vs)):
            assert env[variable] == f"${{{variable}:-}}", variable
    # the secret files and .env never enter an image (BuildKit's and the classic builder's ignore files)
    ignores = [ROOT / ".dockerignore", DEPLOY / "docker" / "Dockerfile.dockerignore"]
    patterns = [
        {line for line in f.read_text().splitlines() if line and not line.startswith("#")} for f in ignores
    ]
    assert patterns[0] == patterns[1] and {"secrets", ".env"} <= patterns[0]
    # Prometheus scrapes the admin listeners
    targets = json.loads((DEPLOY / "prometheus" / "targets" / "workers.json").read_text())[0]["targets"]
    assert targets == [
        f"{w}:{services[w]['environment']['PIPELINE_ADMIN_PORT']}" for w in ("worker1", "worker2")
    ]
    # .env.example names exactly what the compose file reads from .env
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert set(example) == set(re.findall(r"\$\{(\w+):-", COMPOSE.read_text()))
    # the worker's own check, on the compose environment as the example .env sets it
    env = {
        k: (example.get(k, "") if str(v).startswith("${") else str(v))
        for k, v in services["worker1"]["environment"].items()
    }
    files = {
        "/run/secrets/pipeline_ingest_token": "a" * 64 + "\n",
        "/run/secrets/pipeline_id_salt": "b" * 64 + "\n",
    }
    check_listeners(settings_with_secret_files(env, files, tmp_path / "ok"))
    # without the secrets, or with a provider switched on but no credential: refused
    with pytest.raises(SettingsError, match="PIPELINE_ID_SALT"):
        check_listeners(
            settings_with_secret_files(
                env, {**files, "/run/secrets/pipeline_id_salt": "short"}, tmp_path / "a"
            )
        )
    with pytest.raises(SettingsError, match="POST /webhooks/sendgrid"):
        check_listeners(
            settings_with_secret_files(
                {**env, "PIPELINE_ENDPOINTS": "events,sendgrid"}, files, tmp_path / "b"
            )
        )


def kubernetes_docs() -> dict[str, dict]:
    docs: dict[str, dict] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[f"{doc['kind']}/{doc.get('metadata', {}).get('name', path.name)}"] = doc
    return docs


def test_kubernetes_ships_secure(tmp_path):
    docs = kubernetes_docs()
    config = docs["ConfigMap/funnel-pipeline"]["data"]
    sts = docs["StatefulSet/funnel-pipeline"]
    pod = sts["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": int(config["PIPELINE_PORT"]), "admin": int(config["PIPELINE_ADMIN_PORT"])}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "admin"}
    assert sts["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(ports["admin"])
    assert docs["PodMonitor/funnel-pipeline"]["spec"]["podMetricsEndpoints"][0]["port"] == "admin"
    # the Service senders reach exposes the public port only
    public = docs["Service/funnel-pipeline"]["spec"]["ports"]
    assert [p["targetPort"] for p in public] == ["http"]
    # the secrets: a Secret volume (not optional), the *_FILE variables inside it
    secret = docs["Secret/funnel-pipeline-secrets"]
    volume = next(v for v in pod["volumes"] if v["name"] == "secrets")
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert not volume["secret"].get("optional", False)
    mount = next(m for m in container["volumeMounts"] if m["name"] == "secrets")["mountPath"]
    files = {k: v for k, v in config.items() if k.endswith("_FILE")}
    assert set(files) == {"PIPELINE_INGEST_TOKEN_FILE", "PIPELINE_ID_SALT_FILE"}
    for path in files.values():
        assert path.startswith(mount + "/") and path[len(mount) + 1 :] in secret["stringData"]
    # the example Secret is not applied with the manifests: its values would be everyone's
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert "secret.example.yaml" not in kustomization["resources"]
    # as shipped (empty values) the worker refuses; with random values it starts
    example = {f"{mount}/{k}": v for k, v in secret["stringData"].items()}
    with pytest.raises(SettingsError, match="is empty"):
        settings_with_secret_files(config, example, tmp_path / "empty")
    filled = {path: "c" * 64 for path in example}
    check_listeners(settings_with_secret_files(config, filled, tmp_path / "ok"))
