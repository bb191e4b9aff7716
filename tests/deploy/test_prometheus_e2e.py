"""A real Prometheus (Debian's binary) scrapes a running pipeline with the project's own
configuration and rules; `pipeline simulate --scenario ctr-drop` makes FunnelCTRDrop fire
(`--scenario ctor-drop` after it feeds the human CTOR test's series).
Every dashboard panel's query then runs against that Prometheus and returns data."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import httpx
from conftest import WorkerProcess
from deploy_helpers import dashboard_queries, query, start_prometheus, substitute, variable_queries

from pipeline.kafka.tansu import free_port

# Besides the simulated traffic, the error paths the health dashboard shows: canonical events
# that fail validation (rejected and dead-lettered) and webhooks without a valid signature.
BAD_EVENTS = [{"event_id": "bad-1", "type": "no-such-type"}, {"campaign_id": "no-event-id"}]
UNSIGNED_WEBHOOKS = 3


def send_bad_traffic(worker: WorkerProcess) -> None:
    resp = httpx.post(f"{worker.url}/events", json=BAD_EVENTS, timeout=30)
    assert resp.status_code == 400, resp.text  # nothing in the batch was valid
    assert resp.json()["accepted"] == 0
    assert len(resp.json()["rejected"]) == len(BAD_EVENTS)
    for _ in range(UNSIGNED_WEBHOOKS):
        resp = httpx.post(f"{worker.url}/webhooks/mailgun", json={"event-data": {}}, timeout=30)
        assert resp.status_code in (401, 403), resp.text


def test_ctr_drop_alert_fires_through_real_prometheus(broker, workers, tmp_path):
    # laid out as deployed: ingest on the public port, Prometheus scrapes the admin listener
    worker = WorkerProcess(
        broker.address, tmp_path, admin_port=free_port(), env={"MAILGUN_WEBHOOK_SIGNING_KEY": "e2e-key"}
    )
    workers.append(worker.start())
    prometheus, prom_url = start_prometheus(tmp_path, [f"127.0.0.1:{worker.admin_port}"])
    try:
        send_bad_traffic(worker)
        # ctr-drop across an hour boundary, so that a complete 1h window holds events; then
        # ctor-drop, later in event time (lateness is judged per partition), for the human CTOR
        # test's series, which a window of few openers (ctr-drop's collapse) does not have
        hour = int(time.time()) // 3600 * 3600
        for scenario, seed, start in (("ctr-drop", 5, hour - 4500), ("ctor-drop", 6, hour - 2400)):
            sim = subprocess.run(
                [
                    *(sys.executable, "-m", "pipeline", "simulate", "--url", worker.url),
                    *("--scenario", scenario, "--seed", str(seed), "--start", str(start), "--batch", "1000"),
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
                a
                for a in alerts
                if a["labels"]["alertname"] == "FunnelCTRDrop"
                and a["state"] == "firing"
                and (a["labels"]["channel"], a["labels"]["campaign"]) == ("email", "newsletter-5-0")
            ]
            if firing:
                break
            time.sleep(5)
        assert firing, f"FunnelCTRDrop not firing for email/newsletter-5-0; alerts: {alerts}"
        alert = firing[0]
        assert "CTR dropped on email campaign newsletter-5-0" in alert["annotations"]["summary"]
        assert "bottleneck: open_rate." in alert["annotations"]["summary"]  # the diagnosis, quoted

        # every dashboard query is valid PromQL against this Prometheus and has data to show
        empty = [expr for expr in dashboard_queries() if not query(prom_url, expr)]
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
        # the variables' label_values(selector, label) queries, as the label-values API calls
        # Grafana's Prometheus data source makes for them, offer the campaigns' channels and ids
        offered = {}
        for var_query in variable_queries():
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var_query)
            assert match, var_query
            selector, label = substitute(match.group(1)), match.group(2)
            resp = httpx.get(
                f"{prom_url}/api/v1/label/{label}/values", params={"match[]": selector}, timeout=10
            ).json()
            assert resp["status"] == "success", (var_query, resp)
            offered.setdefault(label, set()).update(resp["data"])
        assert offered["channel"] == {"ads", "email"}
        assert "newsletter-5-0" in offered["campaign"]
        # and the error panels count exactly the bad traffic sent
        for expr, expected in (
            ("sum(pipeline_events_rejected_total)", len(BAD_EVENTS)),
            ("sum(pipeline_dead_lettered_total)", len(BAD_EVENTS)),
            ('sum(pipeline_webhook_signature_failures_total{provider="mailgun"})', UNSIGNED_WEBHOOKS),
        ):
            assert [float(r["value"][1]) for r in query(prom_url, expr)] == [expected], expr
    finally:
        prometheus.terminate()
        prometheus.wait(10)
