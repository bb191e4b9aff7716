"""A real Prometheus (Debian's binary) scrapes a running pipeline with the project's own
configuration and rules; `pipeline simulate --scenario ctr-drop` makes FunnelCTRDrop fire.
Every dashboard panel's query then runs against that Prometheus without error."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import WorkerProcess
from deploy_helpers import DEPLOY, dashboard_queries, require_tool

from pipeline.broker import free_port


def start_prometheus(tmp_path: Path, targets: list[str]) -> tuple[subprocess.Popen, str]:
    binary = require_tool("prometheus")
    config_dir = tmp_path / "prometheus"
    shutil.copytree(DEPLOY / "prometheus", config_dir)
    # the production rules and scrape settings, pointed at this test's worker
    (config_dir / "targets" / "workers.json").write_text(json.dumps([{"targets": targets, "labels": {}}]))
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config_dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=open(tmp_path / "prometheus.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    return process, f"http://127.0.0.1:{port}"


def test_ctr_drop_alert_fires_through_real_prometheus(broker, tmp_path, workers):
    # laid out as deployed: ingest on the public port, Prometheus scrapes the admin listener
    worker = WorkerProcess(broker.address, tmp_path, admin_port=free_port()).start()
    workers.append(worker)
    prometheus, prom_url = start_prometheus(tmp_path, [f"127.0.0.1:{worker.admin_port}"])
    try:
        sim = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline",
                "simulate",
                "--url",
                worker.url,
                "--scenario",
                "ctr-drop",
                "--subscribers",
                "24000",
                "--seed",
                "5",
                "--batch",
                "1000",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert sim.returncode == 0, sim.stderr
        deadline = time.monotonic() + 420
        firing = []
        while time.monotonic() < deadline:
            try:
                alerts = httpx.get(f"{prom_url}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
            except httpx.HTTPError:
                alerts = []
            firing = [
                a for a in alerts if a["labels"]["alertname"] == "FunnelCTRDrop" and a["state"] == "firing"
            ]
            if any(a["labels"]["channel"] == "email" for a in firing):
                break
            time.sleep(5)
        email = [a for a in firing if a["labels"]["channel"] == "email"]
        assert email, f"FunnelCTRDrop not firing; alerts: {alerts}"
        alert = email[0]
        assert alert["labels"]["campaign"] == "newsletter-5-0"
        assert "CTR dropped on email campaign newsletter-5-0" in alert["annotations"]["summary"]
        assert "bottleneck" in alert["annotations"]["summary"]

        # every dashboard query is valid PromQL against this Prometheus, and the funnel ones have data
        for query in dashboard_queries():
            resp = httpx.get(f"{prom_url}/api/v1/query", params={"query": query}, timeout=10).json()
            assert resp["status"] == "success", (query, resp)
        rate = httpx.get(
            f"{prom_url}/api/v1/query", params={"query": "channel_campaign:funnel_ctr:ratio"}
        ).json()
        assert rate["data"]["result"], "recording rules produced nothing"
    finally:
        prometheus.terminate()
        prometheus.wait(10)
