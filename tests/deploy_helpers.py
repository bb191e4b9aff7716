"""Helpers for the deploy tests, and for the end-to-end tests that run the monitoring of
deploy/ for real: Debian's Prometheus and Alertmanager on copies of the project's own
configuration, pointed at the test's workers and at a webhook receiver of the test's."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from pipeline.kafka.tansu import free_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
GRAFANA = DEPLOY / "grafana"
DASHBOARDS = GRAFANA / "dashboards"
ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
FUNNEL_ALERTS = ("FunnelCTRDrop", "FunnelCTORDrop")

# Shorter timings for a test that waits for an alert to reach a receiver. In production the
# funnel alerts fire at the earliest 2 minutes after the first bad window is exported (15s
# scrape and evaluation, `for: 2m`) and Alertmanager waits 30s more (group_wait): about 2.5
# minutes of waiting in a test whose budget is 3-4 minutes. With `quick`, the test's copies of
# the configuration take the values below; rule expressions, templates, routes, receivers and
# inhibitions stay the production ones.
QUICK_PROMETHEUS = {"scrape_interval": "2s", "scrape_timeout": "2s", "evaluation_interval": "2s"}
QUICK_FOR = "10s"  # of the funnel alerts only: the health alerts keep theirs
QUICK_ROUTE = {"group_wait": "1s", "group_interval": "10s"}

# Template variables and the value each takes when a query is run outside Grafana.
TEMPLATE_VALUES = {
    "channel": ".*",
    "campaign": ".*",
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
}


def substitute(expr: str) -> str:
    """Replace Grafana template variables ($var, ${var}, ${var:fmt}) by TEMPLATE_VALUES."""

    def repl(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in TEMPLATE_VALUES:
            raise KeyError(f"unknown template variable ${name} in {expr!r}")
        return TEMPLATE_VALUES[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", repl, expr)


def panels(model: dict):
    """Every panel of a dashboard, those inside (collapsed) rows included."""
    for panel in model.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, raw expr) for every query of every checked-in dashboard."""
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        model = json.loads(path.read_text())
        for panel in panels(model):
            for target in panel.get("targets", []):
                if "expr" in target:
                    out.append((path.name, panel.get("title", ""), target["expr"]))
    return out


def dashboard_queries() -> list[str]:
    """Every panel's PromQL with its template variables substituted, in dashboard order."""
    return [substitute(expr) for _, _, expr in dashboard_targets()]


def variable_queries() -> list[str]:
    """The label_values() queries of the template variables (Grafana syntax, not PromQL)."""
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for var in json.loads(path.read_text()).get("templating", {}).get("list", []):
            if var.get("type") == "query":
                out.append(var["query"])
    return out


def require_tool(name: str, *other_names: str) -> str:
    """Path of a binary (under its first name found); missing: skip locally, fail under CI=true
    (the CI script installs it)."""
    for candidate in (name, *other_names):
        path = shutil.which(candidate)
        if path:
            return path
    message = (
        f"{name} not found (Debian: apt-get install -y prometheus prometheus-alertmanager docker-compose)"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def dashboard_generator() -> ModuleType:
    """deploy/grafana/generate.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("dashboard_generator", GRAFANA / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wait_ready(process: subprocess.Popen, url: str, log: Path, timeout: float = 60.0) -> None:
    """Until ``url`` answers 200; a process that exits meanwhile fails the test with its log."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        assert time.monotonic() < deadline, f"{url} not ready:\n" + log.read_text(errors="replace")[-3000:]
        time.sleep(0.3)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, and SIGKILL after 10 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_prometheus(
    tmp_path: Path, targets: list[str], alertmanager: str | None = None, quick: bool = False
) -> tuple[subprocess.Popen, str]:
    """Debian's Prometheus on a copy of deploy/prometheus (rules included), scraping ``targets``
    (the workers' /metrics listeners), sending alerts to ``alertmanager`` (host:port) if given;
    ``quick``: the timings of QUICK_PROMETHEUS and QUICK_FOR."""
    binary = require_tool("prometheus")
    config_dir = tmp_path / "prometheus"
    shutil.copytree(DEPLOY / "prometheus", config_dir)
    # the production rules and scrape settings, pointed at this test's workers
    (config_dir / "targets" / "workers.json").write_text(json.dumps([{"targets": targets, "labels": {}}]))
    port = free_port()
    if alertmanager or quick:
        config_path = config_dir / "prometheus.yml"
        config = yaml.safe_load(config_path.read_text())
        if alertmanager:
            for manager in config["alerting"]["alertmanagers"]:
                manager["static_configs"] = [{"targets": [alertmanager]}]
        for job in config["scrape_configs"]:
            if job["job_name"] == "prometheus":  # itself, on this test's port
                job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
        if quick:
            config["global"].update(QUICK_PROMETHEUS)
            rules_path = config_dir / "rules" / "alerts.rules.yml"
            rules = yaml.safe_load(rules_path.read_text())
            found = [
                rule
                for group in rules["groups"]
                for rule in group["rules"]
                if rule.get("alert") in FUNNEL_ALERTS
            ]
            assert len(found) == len(FUNNEL_ALERTS), found
            for rule in found:
                rule["for"] = QUICK_FOR
            rules_path.write_text(yaml.safe_dump(rules, sort_keys=False))
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log = tmp_path / "prometheus.log"
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config_dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )
    return process, f"http://127.0.0.1:{port}"


def query(prom_url: str, expr: str) -> list[dict]:
    resp = httpx.get(f"{prom_url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert resp["status"] == "success", (expr, resp)
    return resp["data"]["result"]


class AlertReceiver:
    """The receiving end of Alertmanager's webhooks: an HTTP server on a loopback port that
    keeps every notification (the path it was posted to, and its JSON body)."""

    def __init__(self) -> None:
        self.notifications: list[tuple[str, dict[str, Any]]] = []
        received = self.notifications
        lock = self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    received.append((self.path, body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:  # the test reads what it needs
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def alerts(self) -> list[tuple[str, dict[str, Any]]]:
        """(path, alert) for every alert of every notification received so far, in order."""
        with self.lock:
            return [(path, alert) for path, body in self.notifications for alert in body["alerts"]]

    def __enter__(self) -> AlertReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def alertmanager_config(receiver_url: str, quick: bool = False) -> dict[str, Any]:
    """deploy/alertmanager/alertmanager.yml with every receiver's webhook URL moved to
    ``receiver_url`` (the path kept, so the test sees which receiver a notification went to)."""
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    for receiver in config["receivers"]:
        # a receiver of another kind (Slack, PagerDuty...) would notify no one the test can see
        assert set(receiver) <= {"name", "webhook_configs"}, receiver
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = receiver_url + urlsplit(hook["url"]).path

    def shorten(route: dict[str, Any]) -> None:
        for key, value in QUICK_ROUTE.items():
            if key in route or route is config["route"]:
                route[key] = value
        for child in route.get("routes", []):
            shorten(child)

    if quick:
        shorten(config["route"])
    return config


@contextlib.contextmanager
def running_alertmanager(tmp_path: Path, receiver_url: str, quick: bool = False) -> Iterator[str]:
    """Debian's Alertmanager (`prometheus-alertmanager`, upstream `alertmanager`) on
    :func:`alertmanager_config`, without clustering; yields its host:port."""
    binary = require_tool("prometheus-alertmanager", "alertmanager")
    config_path = tmp_path / "alertmanager.yml"
    config_path.write_text(yaml.safe_dump(alertmanager_config(receiver_url, quick), sort_keys=False))
    port = free_port()
    log = tmp_path / "alertmanager.log"
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config_path}",
            f"--storage.path={tmp_path / 'alertmanager-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",  # no gossip port: parallel runs would collide on 9094
        ],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_ready(process, f"http://127.0.0.1:{port}/-/ready", log)
        yield f"127.0.0.1:{port}"
    finally:
        stop(process)
