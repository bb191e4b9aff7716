"""The stack of docker-compose.yml, run as processes (no Docker engine on these machines).

- a 3-node Apache Kafka cluster (KRaft; replication factor 3, min.insync.replicas=2) in place
  of the compose file's one broker, as the production path;
- two `pipeline worker` processes of the wheel built from this checkout, installed in a fresh
  virtual environment and run from outside the checkout, set up as compose sets them up: an
  admin listener for /metrics, the ingest token and the salt from secret files, only
  `POST /events` served;
- Debian's Prometheus on a copy of deploy/prometheus (configuration and rules) scraping the
  workers, and Debian's Alertmanager on deploy/alertmanager/alertmanager.yml, whose receivers
  post to a webhook receiver of this test's (a real HTTP server on a loopback port).

`pipeline simulate` (the wheel's) sends the ctr-drop scenario, then the ctor-drop one (given a
later event time: lateness is judged per partition, so a second run overlapping the first in
event time would have its events counted late). One Kafka node is SIGKILLed during the first
and started again; the worker the second is sent to is SIGKILLed during it and started again.
Then: FunnelCTRDrop (both campaigns of ctr-drop) and FunnelCTORDrop (ctor-drop) reach the
receiver with the pipeline's diagnosis in their summary; the FunnelCTRDrop that a CTOR drop
also sets off is held back by Alertmanager's inhibition; every count on /metrics, summed over
the workers, equals what `pipeline simulate --expect` wrote, and every count, window and rate
of /campaigns equals the ground truth: 0 lost, 0 doubled.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import CHECKOUT_VARIABLES, WorkerProcess
from deploy_helpers import AlertReceiver, query, running_alertmanager, start_prometheus, stop, wait_ready
from helpers import assert_exact, count_stored_copies, nonzero, report_counts, scrape, wait_for_counts

from pipeline.diagnosis.diagnose import ADVICE
from pipeline.kafka.local import KafkaCluster
from pipeline.kafka.tansu import free_port
from pipeline.kafka.topics import RAW_TOPICS
from pipeline.simulation.traffic import SCENARIOS, Traffic, scenario

# (scenario, seed); campaigns are named after the seed
RUNS = (("ctr-drop", 1), ("ctor-drop", 2))
# (alert, channel, campaign) -> (the receiver's path in alertmanager.yml, the diagnosis expected)
ALERTS = {
    ("FunnelCTRDrop", "email", "newsletter-1-0"): ("/marketing/email", "open_rate"),
    ("FunnelCTRDrop", "ads", "display-1-0"): ("/marketing/ads", "ctr"),
    ("FunnelCTORDrop", "email", "newsletter-2-0"): ("/marketing/email", "ctor"),
}
# a CTOR drop drops CTR too; Alertmanager holds that alert back (inhibit_rules)
INHIBITED = ("FunnelCTRDrop", "email", "newsletter-2-0")
WINDOW_SIZES = {"5m": 300, "1h": 3600}


def ingested(worker: WorkerProcess) -> int:
    """Events this worker's ingest acknowledged since it started (0 while it is down)."""
    try:
        samples = scrape(worker.admin_url)
    except httpx.HTTPError:
        return 0
    return round(sum(v for (name, _), v in samples.items() if name == "pipeline_events_ingested_total"))


def wait_ingested(worker: WorkerProcess, at_least: int, sim: subprocess.Popen, log: Path) -> None:
    """Until ``worker`` acknowledged ``at_least`` events of the run ``sim`` is sending; a fault
    injected then hits a stream in full flow."""
    deadline = time.monotonic() + 300
    while ingested(worker) < at_least:
        assert sim.poll() is None, f"simulate ended before {at_least} events:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"{at_least} events not ingested:\n{worker.log()}"
        time.sleep(0.2)


def metric_counts(urls: list[str]) -> dict[str, Any]:
    """Per "channel/campaign", from every worker's /metrics: the lifetime counts summed over the
    workers, the workers exporting it, and the windows shown ("5m:<start>" -> counts);
    duplicates and late events per channel."""
    campaigns: dict[str, dict[str, Any]] = {}
    per_channel: dict[str, Counter[str]] = {"duplicates": Counter(), "late": Counter()}
    for url in urls:
        samples = scrape(url)
        ends: dict[tuple[str, str], float] = {}
        for (name, labels), value in samples.items():
            doc = dict(labels)
            if name == "funnel_window_end_seconds":
                ends[(f"{doc['channel']}/{doc['campaign']}", doc["window"])] = value
        for (name, labels), value in samples.items():
            doc = dict(labels)
            if name in ("pipeline_duplicates_dropped_total", "pipeline_late_events_total"):
                kind = "duplicates" if "duplicates" in name else "late"
                per_channel[kind][doc["channel"]] += round(value)
                continue
            if name not in ("funnel_events_total", "funnel_unique_events_total", "funnel_window_events"):
                continue
            key = f"{doc['channel']}/{doc['campaign']}"
            entry = campaigns.setdefault(key, {"counts": Counter(), "exported_by": set(), "windows": {}})
            entry["exported_by"].add(url)
            if name == "funnel_window_events":
                size = WINDOW_SIZES[doc["window"]]
                start = round(ends[(key, doc["window"])]) - size
                entry["windows"].setdefault(f"{size}:{start}", Counter())[doc["event"]] += round(value)
            else:
                prefix = "unique_" if name == "funnel_unique_events_total" else ""
                entry["counts"][prefix + doc["event"]] += round(value)
    return {"campaigns": campaigns, **per_channel}


def exported(counts: dict[str, int]) -> dict[str, int]:
    """The counts /metrics exports (scanner clicks are in /campaigns only), zeros left out."""
    return {name: n for name, n in counts.items() if n and name != "bot_click"}


def received_alerts(receiver: AlertReceiver) -> dict[tuple[str, str, str], tuple[str, dict]]:
    """The first firing notification of each (alert, channel, campaign): (path, alert)."""
    first: dict[tuple[str, str, str], tuple[str, dict]] = {}
    for path, alert in receiver.alerts():
        labels = alert["labels"]
        key = (labels["alertname"], labels.get("channel", ""), labels.get("campaign", ""))
        if alert["status"] == "firing" and key not in first:
            first[key] = (path, alert)
    return first


@pytest.mark.slow
def test_stack_alerts_reach_the_receiver_and_counts_stay_exact_through_faults(
    installed: tuple[Path, Path],
    cluster: KafkaCluster,
    cluster_workers: list[WorkerProcess],
    tmp_path: Path,
) -> None:
    _, venv = installed
    pipeline = str(venv / "bin" / "pipeline")
    # the compose file's secrets, as files
    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir(mode=0o700)
    for name in ("ingest_token", "id_salt"):
        (secret_dir / name).write_text(secrets.token_hex(32) + "\n")
    env = {
        "PIPELINE_REPLICATION": "3",
        "PIPELINE_PARTITIONS": "4",
        "PIPELINE_ENDPOINTS": "events",
        "PIPELINE_INGEST_TOKEN_FILE": str(secret_dir / "ingest_token"),
        "PIPELINE_ID_SALT_FILE": str(secret_dir / "id_salt"),
    }
    outside = tmp_path / "outside"  # the working directory: nothing of the checkout there
    outside.mkdir()
    workers = [
        WorkerProcess(
            cluster.bootstrap,
            tmp_path / "workers",
            admin_port=free_port(),
            env=env,
            program=(pipeline,),
            code_dir=outside,
            unset=(*CHECKOUT_VARIABLES, "PIPELINE_ID_SALT"),
        )
        for _ in range(2)
    ]
    for worker in workers:
        cluster_workers.append(worker.start(wait=False))
    sim_env = {
        **{k: v for k, v in os.environ.items() if k not in CHECKOUT_VARIABLES},
        "PIPELINE_INGEST_TOKEN_FILE": env["PIPELINE_INGEST_TOKEN_FILE"],
    }
    # event time: ctr-drop first, ctor-drop after its end, both on 5-minute boundaries
    span = max(SCENARIOS[name].span for name, _ in RUNS)
    now = int(time.time()) // 300 * 300
    starts = {"ctr-drop": now - 2 * span - 1200, "ctor-drop": now - span - 600}
    traffics: dict[str, Traffic] = {name: scenario(name, seed, start=starts[name]) for name, seed in RUNS}
    log: list[str] = []
    started = time.monotonic()

    with AlertReceiver() as receiver, running_alertmanager(tmp_path, receiver.url, quick=True) as manager:
        prometheus, prom_url = start_prometheus(
            tmp_path, [f"127.0.0.1:{w.admin_port}" for w in workers], alertmanager=manager, quick=True
        )
        try:
            wait_ready(prometheus, f"{prom_url}/-/ready", tmp_path / "prometheus.log")
            for worker in workers:
                worker.wait_healthy(180)
            log.append(f"stack up after {time.monotonic() - started:.0f} s")
            acknowledged = 0
            for (name, seed), target in zip(RUNS, workers, strict=True):
                sim_log = tmp_path / f"simulate-{name}.log"
                sim = subprocess.Popen(
                    [
                        *(pipeline, "simulate", "--url", target.url, "--scenario", name),
                        *("--seed", str(seed), "--start", str(starts[name])),
                        *("--expect", str(tmp_path / f"{name}.expect.json")),
                    ],
                    env=sim_env,
                    cwd=outside,
                    stdout=open(sim_log, "wb"),
                    stderr=subprocess.STDOUT,
                )
                total = len(traffics[name].events)
                if name == "ctr-drop":
                    wait_ingested(target, total // 3, sim, sim_log)
                    leaders = cluster.leader_counts(RAW_TOPICS)
                    victim = leaders.most_common(1)[0][0]
                    cluster.kill(victim)
                    log.append(
                        f"{name}: SIGKILL Kafka node {victim}, leader of {leaders[victim]} raw partitions"
                    )
                    wait_ingested(target, 2 * total // 3, sim, sim_log)
                    cluster.start_node(victim, wait=False)
                    log.append(f"{name}: Kafka node {victim} started again")
                else:
                    wait_ingested(target, total // 3, sim, sim_log)
                    target.kill()
                    log.append(f"{name}: SIGKILL of the worker it is sent to")
                    target.start(wait=False)  # same port and data directory, as compose restarts it
                    log.append(f"{name}: that worker started again")
                assert sim.wait(600) == 0, sim_log.read_text()
                done = re.search(r"sent (\d+) events \((\d+) accepted\)", sim_log.read_text())
                assert done and int(done.group(1)) == total, sim_log.read_text()
                acknowledged += int(done.group(2))
                log.append(f"{name}: {total} events sent after {time.monotonic() - started:.0f} s")
            for worker in workers:
                worker.wait_healthy(180)
            cluster.wait_ready()
            cluster.wait_in_sync()
            urls = [w.admin_url for w in workers]

            # what `pipeline simulate --expect` wrote is the ground truth the test generated
            expected: dict[str, Any] = {}
            for name, _ in RUNS:
                traffic = traffics[name]
                written = json.loads((tmp_path / f"{name}.expect.json").read_text())
                truth = {f"{ch}/{camp}": traffic.truth.expected(ch, camp) for ch, camp in traffic.campaigns}
                assert written == json.loads(json.dumps(truth)), name
                expected.update(written)
            # copies of requests retried across the faults are in the log: dropped as duplicates
            stored_twice = sum(count_stored_copies(cluster.bootstrap, t) for t in traffics.values())

            # /campaigns: every count, retained window and rate
            docs: dict[str, Any] = {}
            for traffic in traffics.values():
                docs.update(wait_for_counts(urls, traffic, timeout=300))
                assert_exact(docs, traffic)
            # /metrics, summed over the workers: every count, and the windows shown
            metrics = metric_counts(urls)
            for key, want in expected.items():
                got = metrics["campaigns"][key]
                assert len(got["exported_by"]) == 1, (key, got["exported_by"])
                assert nonzero(got["counts"]) == exported(want["counts"]), key
                assert len(got["windows"]) == len(WINDOW_SIZES), (key, got["windows"])
                for window, counts in got["windows"].items():
                    assert nonzero(counts) == exported(want["windows"].get(window, {})), (key, window)
            for channel in ("email", "ads"):
                campaigns = [
                    t.truth.expected(*c) for t in traffics.values() for c in t.campaigns if c[0] == channel
                ]
                assert metrics["duplicates"][channel] == sum(c["duplicates"] for c in campaigns), channel
                assert metrics["late"][channel] == sum(c["late"] for c in campaigns) == 0, channel
            log.append(f"counts exact after {time.monotonic() - started:.0f} s")

            # the alerts, through Prometheus and Alertmanager to the receiver
            deadline = time.monotonic() + 300
            while set(ALERTS) - set(received_alerts(receiver)):
                assert time.monotonic() < deadline, (
                    f"alerts missing at the receiver: {set(ALERTS) - set(received_alerts(receiver))}; "
                    f"received: {receiver.alerts()}; Prometheus: {query(prom_url, 'ALERTS')}"
                )
                time.sleep(1)
            log.append(f"alerts received after {time.monotonic() - started:.0f} s")
            first = received_alerts(receiver)
            for (alertname, channel, campaign), (path, bottleneck) in ALERTS.items():
                got_path, alert = first[(alertname, channel, campaign)]
                summary = alert["annotations"]["summary"]
                assert got_path == path, (alertname, campaign, got_path)
                assert alert["labels"]["severity"] == "critical"
                assert f"bottleneck: {bottleneck}." in summary, summary
                assert f"Fix: {ADVICE[(channel, bottleneck)]}." in summary, summary
                print(f"{alertname} {channel}/{campaign} -> {path}: {summary}")
            # the CTR alert a CTOR drop also sets off fires in Prometheus; Alertmanager holds it back
            deadline = time.monotonic() + 120
            while True:
                held = [
                    a
                    for a in httpx.get(f"http://{manager}/api/v2/alerts", timeout=10).json()
                    if (a["labels"]["alertname"], a["labels"].get("channel"), a["labels"].get("campaign"))
                    == INHIBITED
                ]
                if held and held[0]["status"]["state"] == "suppressed":
                    assert held[0]["status"]["inhibitedBy"], held
                    break
                assert time.monotonic() < deadline, f"{INHIBITED} not suppressed: {held}"
                time.sleep(1)
            up = {
                r["metric"]["instance"]: r["value"][1] for r in query(prom_url, 'up{job="funnel-pipeline"}')
            }
            assert up == {f"127.0.0.1:{w.admin_port}": "1" for w in workers}, up
        finally:
            stop(prometheus)

    print("\n".join(log))
    compared = [
        (exported(want["counts"]), nonzero(metrics["campaigns"][key]["counts"]))
        for key, want in expected.items()
    ]
    sent = sum(len(t.events) for t in traffics.values())
    report_counts(
        "stack: 3 Kafka nodes, 2 workers from the wheel; SIGKILL of a Kafka node and of a worker",
        sent,
        acknowledged,
        compared,
        stored_twice,
    )
    assert acknowledged == sent
