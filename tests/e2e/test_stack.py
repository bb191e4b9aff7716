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
event time would have its events counted late). One fault at a time, each while events stream
in: the Kafka node leading most raw partitions is SIGKILLed during the first run and started
again; once every partition is back in sync, the worker the second run is sent to is SIGKILLed
and started again on its port and data directory (compose's `restart: unless-stopped`).

The stack runs once for the module; its tests then check: FunnelCTRDrop (both campaigns of
ctr-drop) and FunnelCTORDrop (ctor-drop) reach the receiver with the pipeline's diagnosis in
their summary, and the FunnelCTRDrop a CTOR drop also sets off is held back by Alertmanager's
inhibition; the raw topics hold every acknowledged event; every count on /metrics, summed over
the workers, equals what `pipeline simulate --expect` wrote, and every count, window and rate of
/campaigns the ground truth: 0 lost, 0 doubled.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import CHECKOUT_VARIABLES, WorkerProcess, outside_environ
from deploy_helpers import AlertReceiver, query, running_alertmanager, start_prometheus, stop, wait_ready
from helpers import (
    assert_exact,
    count_stored_copies,
    metric_sum,
    nonzero,
    report_counts,
    scrape,
    wait_for_counts,
)

from pipeline.diagnosis.diagnose import ADVICE
from pipeline.kafka.local import KafkaCluster
from pipeline.kafka.tansu import free_port
from pipeline.kafka.topics import RAW_TOPICS
from pipeline.simulation.traffic import Traffic, scenario

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
        return round(metric_sum(worker.admin_url, "pipeline_events_ingested_total"))
    except httpx.HTTPError:
        return 0


def wait_ingested(worker: WorkerProcess, at_least: int, sim: subprocess.Popen, log: Path) -> None:
    """Until ``worker`` acknowledged ``at_least`` events of the run ``sim`` is sending; a fault
    injected then hits a stream in full flow."""
    deadline = time.monotonic() + 300
    while ingested(worker) < at_least:
        assert sim.poll() is None, f"simulate ended before {at_least} events:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"{at_least} events not ingested:\n{worker.log()}"
        time.sleep(0.2)


def consumer_lag(url: str) -> dict[str, float]:
    """The partitions a worker owns and has not processed to the end: "topic/partition" -> lag."""
    samples = scrape(url)
    return {
        f"{dict(labels)['topic']}/{dict(labels)['partition']}": value
        for (name, labels), value in samples.items()
        if name == "pipeline_consumer_lag" and value
    }


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


@dataclass
class Stack:
    """What the stack run left for the tests to check."""

    cluster: KafkaCluster
    workers: list[WorkerProcess]
    receiver: AlertReceiver
    alertmanager: str  # host:port
    prometheus: str  # URL
    traffics: dict[str, Traffic]  # scenario -> what `pipeline simulate` sent, with its truth
    expected: dict[str, Any]  # "channel/campaign" -> what `pipeline simulate --expect` wrote
    acknowledged: int
    log: list[str] = field(default_factory=list)
    stored_twice: int | None = None  # copies of retried requests in the raw topics, once counted

    @property
    def urls(self) -> list[str]:
        return [worker.admin_url for worker in self.workers]

    def sent(self) -> int:
        return sum(len(traffic.events) for traffic in self.traffics.values())


@pytest.fixture(scope="module")
def stack(installed: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    _, venv = installed
    pipeline = str(venv / "bin" / "pipeline")
    tmp = tmp_path_factory.mktemp("stack")
    # the compose file's secrets, as files
    secret_dir = tmp / "secrets"
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
    outside = tmp / "outside"  # the working directory: nothing of the checkout there
    outside.mkdir()
    sim_env = {
        **outside_environ(),
        "PIPELINE_INGEST_TOKEN_FILE": env["PIPELINE_INGEST_TOKEN_FILE"],
    }
    # event time: ctr-drop first, ctor-drop after its end, each across an hour boundary (so a
    # complete 1h window holds events of it) and placed the same way on every run
    hour = int(time.time()) // 3600 * 3600
    starts = {"ctr-drop": hour - 8100, "ctor-drop": hour - 4500}
    traffics = {name: scenario(name, seed, start=starts[name]) for name, seed in RUNS}
    ends = {name: max(e["timestamp"] for e in traffic.events) for name, traffic in traffics.items()}
    assert ends["ctr-drop"] < starts["ctor-drop"] and ends["ctor-drop"] < hour, (starts, ends)
    log: list[str] = []
    started = time.monotonic()

    with ExitStack() as cleanup:
        cluster = cleanup.enter_context(KafkaCluster(tmp / "kafka", brokers=3))
        workers = [
            WorkerProcess(
                cluster.bootstrap,
                tmp / "workers",
                admin_port=free_port(),
                env=env,
                program=(pipeline,),
                code_dir=outside,
                unset=(*CHECKOUT_VARIABLES, "PIPELINE_ID_SALT"),
            )
            for _ in range(2)
        ]
        for worker in workers:
            worker.start(wait=False)
            cleanup.callback(worker.stop)  # before the cluster stops
        receiver = cleanup.enter_context(AlertReceiver())
        manager = cleanup.enter_context(running_alertmanager(tmp, receiver.url, quick=True))
        prometheus, prom_url = start_prometheus(
            tmp, [f"127.0.0.1:{w.admin_port}" for w in workers], alertmanager=manager, quick=True
        )
        cleanup.callback(stop, prometheus)
        wait_ready(prometheus, f"{prom_url}/-/ready", tmp / "prometheus.log")
        for worker in workers:
            worker.wait_healthy(180)
        log.append(f"stack up after {time.monotonic() - started:.0f} s")

        acknowledged = 0
        for (name, seed), target in zip(RUNS, workers, strict=True):
            sim_log = tmp / f"simulate-{name}.log"
            sim = subprocess.Popen(
                [
                    *(pipeline, "simulate", "--url", target.url, "--scenario", name),
                    *("--seed", str(seed), "--start", str(starts[name])),
                    *("--expect", str(tmp / f"{name}.expect.json")),
                ],
                env=sim_env,
                cwd=outside,
                stdout=open(sim_log, "wb"),
                stderr=subprocess.STDOUT,
            )
            total = len(traffics[name].events)
            wait_ingested(target, total // 3, sim, sim_log)
            if name == "ctr-drop":
                leaders = cluster.leader_counts(RAW_TOPICS)
                victim = leaders.most_common(1)[0][0]
                cluster.kill(victim)
                log.append(f"{name}: SIGKILL Kafka node {victim}, leader of {leaders[victim]} raw partitions")
                wait_ingested(target, 2 * total // 3, sim, sim_log)
                cluster.start_node(victim, wait=False)
                log.append(f"{name}: Kafka node {victim} started again")
            else:
                target.kill()
                log.append(f"{name}: SIGKILL of the worker it is sent to")
                target.start(wait=False)  # same port and data directory, as compose restarts it
                log.append(f"{name}: that worker started again")
            assert sim.wait(600) == 0, sim_log.read_text()
            done = re.search(r"sent (\d+) events \((\d+) accepted\)", sim_log.read_text())
            assert done and int(done.group(1)) == total, sim_log.read_text()
            acknowledged += int(done.group(2))
            log.append(f"{name}: {total} events sent after {time.monotonic() - started:.0f} s")
            if name == "ctr-drop":  # one fault at a time
                cluster.wait_ready()
                cluster.wait_in_sync()
                log.append(f"every partition in sync after {time.monotonic() - started:.0f} s")
                # and its alerts out before the worker is killed: a summary rendered while the
                # worker exporting the campaign is down or its partitions move finds no
                # funnel_diagnosis_info to quote ("not diagnosed", seen once), and Alertmanager
                # does not notify again when only the annotations change
                wait_alerts(receiver, [key for key in ALERTS if key[2].endswith("-1-0")])
                log.append(f"{name}: its alerts received after {time.monotonic() - started:.0f} s")
        for worker in workers:
            worker.wait_healthy(180)

        # what `pipeline simulate --expect` wrote is the ground truth the test generated
        expected: dict[str, Any] = {}
        for name, _ in RUNS:
            traffic = traffics[name]
            written = json.loads((tmp / f"{name}.expect.json").read_text())
            truth = {f"{ch}/{camp}": traffic.truth.expected(ch, camp) for ch, camp in traffic.campaigns}
            assert written == json.loads(json.dumps(truth)), name
            expected.update(written)
        yield Stack(cluster, workers, receiver, manager, prom_url, traffics, expected, acknowledged, log)
        print("\n".join(log))


def wait_alerts(receiver: AlertReceiver, wanted: list[tuple[str, str, str]], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while missing := set(wanted) - set(received_alerts(receiver)):
        assert time.monotonic() < deadline, (
            f"alerts missing at the receiver: {missing}; received: {receiver.alerts()}"
        )
        time.sleep(1)


@pytest.mark.slow
def test_drop_alerts_reach_the_receiver_with_the_diagnosis(stack: Stack) -> None:
    started = time.monotonic()
    wait_alerts(stack.receiver, list(ALERTS))
    stack.log.append(f"alerts received {time.monotonic() - started:.0f} s after the last event was sent")
    first = received_alerts(stack.receiver)
    for (alertname, channel, campaign), (path, bottleneck) in ALERTS.items():
        got_path, alert = first[(alertname, channel, campaign)]
        summary = alert["annotations"]["summary"]
        assert got_path == path, (alertname, campaign, got_path)
        assert alert["labels"]["severity"] == "critical"
        assert f"bottleneck: {bottleneck}." in summary, summary
        assert f"Fix: {ADVICE[(channel, bottleneck)]}" in summary, summary  # notes may follow
        print(f"{alertname} {channel}/{campaign} -> {path}: {summary}")
    # the CTR alert a CTOR drop also sets off fires in Prometheus; Alertmanager holds it back
    deadline = time.monotonic() + 120
    while True:
        held = [
            a
            for a in httpx.get(f"http://{stack.alertmanager}/api/v2/alerts", timeout=10).json()
            if (a["labels"]["alertname"], a["labels"].get("channel"), a["labels"].get("campaign"))
            == INHIBITED
        ]
        if held and held[0]["status"]["state"] == "suppressed":
            assert held[0]["status"]["inhibitedBy"], held
            break
        assert time.monotonic() < deadline, f"{INHIBITED} not suppressed: {held}"
        time.sleep(1)
    up = {
        r["metric"]["instance"]: r["value"][1] for r in query(stack.prometheus, 'up{job="funnel-pipeline"}')
    }
    assert up == {f"127.0.0.1:{w.admin_port}": "1" for w in stack.workers}, up


@pytest.mark.slow
def test_kafka_holds_every_acknowledged_event(stack: Stack) -> None:
    """Through the SIGKILL of a node (3 replicas, min.insync.replicas=2, acks=all) and of the
    worker whose ingest acknowledged them."""
    assert stack.acknowledged == stack.sent()
    # and copies of requests retried across the faults are in the log: dropped as duplicates
    stack.stored_twice = sum(count_stored_copies(stack.cluster.bootstrap, t) for t in stack.traffics.values())


@pytest.mark.slow
def test_counts_exact_through_the_faults(stack: Stack) -> None:
    if stack.stored_twice is None:  # run alone: the duplicates expected include the retried copies
        test_kafka_holds_every_acknowledged_event(stack)
    stored_twice = stack.stored_twice
    started = time.monotonic()
    try:
        # /campaigns: every count, retained window and rate
        docs: dict[str, Any] = {}
        for traffic in stack.traffics.values():
            try:
                docs.update(wait_for_counts(stack.urls, traffic, timeout=60))
            except AssertionError as exc:
                lag = {url: consumer_lag(url) for url in stack.urls}
                message = f"{exc}\nconsumer lag left: {lag}\nfaults: {stack.log}"
                print(message)  # an expected failure shows no traceback
                raise AssertionError(message) from exc
            assert_exact(docs, traffic)
        stack.log.append(f"/campaigns exact {time.monotonic() - started:.0f} s after the last event was sent")
    finally:
        # /metrics, summed over the workers: every count, and the windows shown
        metrics = metric_counts(stack.urls)
        compared = [
            (exported(want["counts"]), nonzero(metrics["campaigns"].get(key, {}).get("counts", {})))
            for key, want in stack.expected.items()
        ]
        name = "stack: 3 Kafka nodes, 2 workers from the wheel; SIGKILL of a Kafka node, then of a worker"
        report_counts(name, stack.sent(), stack.acknowledged, compared, stored_twice)
    for key, want in stack.expected.items():
        got = metrics["campaigns"][key]
        assert len(got["exported_by"]) == 1, (key, got["exported_by"])
        assert nonzero(got["counts"]) == exported(want["counts"]), key
        assert len(got["windows"]) == len(WINDOW_SIZES), (key, got["windows"])
        for window, counts in got["windows"].items():
            assert nonzero(counts) == exported(want["windows"].get(window, {})), (key, window)
    for channel in ("email", "ads"):
        campaigns = [
            t.truth.expected(*c) for t in stack.traffics.values() for c in t.campaigns if c[0] == channel
        ]
        assert metrics["duplicates"][channel] == sum(c["duplicates"] for c in campaigns), channel
        assert metrics["late"][channel] == sum(c["late"] for c in campaigns) == 0, channel
