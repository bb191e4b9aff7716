"""Fault suite against the real broker: every test compares exact final counts with the
generated ground truth and records sent / acknowledged / counted / lost / doubled figures
(printed, and appended to $PIPELINE_FAULT_REPORT when set, for the README's table)."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import WorkerProcess
from helpers import (
    Sender,
    assert_exact,
    campaign_doc,
    count_stored_copies,
    late_ids,
    nonzero,
    report,
    scrape,
    wait_for_counts,
)

from pipeline.kafka.tansu import EmbeddedBroker, free_port, wait_for_port
from pipeline.simulation.traffic import Traffic, generate, send
from pipeline.simulation.truth import from_stream


@pytest.mark.brokers("tansu", "kafka")
def test_sigkill_at_random_points_of_a_long_stream(broker, broker_kind, tmp_path, workers):
    rng = random.Random(61)
    traffic = generate(seed=61, subscribers=6000)
    worker = WorkerProcess(broker.address, tmp_path).start()
    workers.append(worker)
    sender = Sender(worker.url, traffic.events)
    sender.start()
    for _ in range(3):
        time.sleep(rng.uniform(1.0, 4.0))
        worker.kill()  # mid-request, mid-batch, mid-commit: wherever it is
        time.sleep(rng.uniform(0.0, 1.0))
        worker.start(wait=False)
    sender.join(300)
    assert sender.error is None and not sender.is_alive(), sender.error
    assert sender.acknowledged == len(traffic.events)
    stored_twice = count_stored_copies(broker.address, traffic)  # requests cut by a kill were sent again
    worker.wait_healthy()
    docs = wait_for_counts([worker.url], traffic, timeout=240)
    assert_exact(docs, traffic)
    report(f"worker SIGKILL x3 mid-stream ({broker_kind})", traffic, sender.acknowledged, docs, stored_twice)


@pytest.fixture
def durable_broker(tmp_path):
    """Tansu on S3 storage (moto's S3 server on loopback): topics survive a broker restart."""
    import boto3

    s3_port = free_port()
    moto = subprocess.Popen(
        [str(Path(os.sys.executable).parent / "moto_server"), "-p", str(s3_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port("127.0.0.1", s3_port, 30)
    boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{s3_port}",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="eu-west-1",
    ).create_bucket(Bucket="tansu", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    env = {
        "AWS_ENDPOINT": f"http://127.0.0.1:{s3_port}",
        "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }
    broker = EmbeddedBroker(storage="s3://tansu/", env=env, log_path=tmp_path / "broker.log").start()
    yield broker
    broker.stop()
    moto.terminate()
    moto.wait(10)


def test_broker_restart_with_durable_storage(durable_broker, tmp_path, workers):
    traffic = generate(seed=62, subscribers=1500)
    worker = WorkerProcess(durable_broker.address, tmp_path, env={"PIPELINE_SEND_TIMEOUT": "3"}).start()
    workers.append(worker)
    third = len(traffic.events) // 3
    acknowledged = asyncio.run(send(worker.url, traffic.events[:third]))
    durable_broker.stop()
    # during the outage: 503, nothing half-accepted, retrying later is safe
    resp = httpx.post(f"{worker.url}/events", json=traffic.events[third : third + 50], timeout=60)
    assert resp.status_code == 503, resp.text
    sender = Sender(worker.url, traffic.events[third:])
    sender.start()
    time.sleep(5)
    durable_broker.start()  # same port, same bucket
    sender.join(300)
    assert sender.error is None and not sender.is_alive(), sender.error
    acknowledged += sender.acknowledged
    stored_twice = count_stored_copies(durable_broker.address, traffic)
    docs = wait_for_counts([worker.url], traffic, timeout=240)  # the worker reconnected by itself
    assert_exact(docs, traffic)
    assert worker.process.poll() is None
    report("broker stop/start (Tansu, S3 storage)", traffic, acknowledged, docs, stored_twice)


@pytest.mark.brokers("tansu", "kafka")
def test_rebalance_second_worker_joins_then_leaves(broker, broker_kind, tmp_path, workers):
    traffic = generate(seed=63, subscribers=3000, email_campaigns=4, ads_campaigns=3)
    first = WorkerProcess(broker.address, tmp_path).start()
    workers.append(first)
    part = len(traffic.events) // 3
    acknowledged = asyncio.run(send(first.url, traffic.events[:part]))
    second = WorkerProcess(broker.address, tmp_path).start()
    workers.append(second)
    acknowledged += asyncio.run(send(second.url, traffic.events[part : 2 * part]))
    urls = [first.url, second.url]
    docs = wait_for_counts(
        urls,
        Traffic(traffic.events[: 2 * part], _partial_truth(traffic, 2 * part), traffic.campaigns),
        timeout=180,
    )
    # both own something, and every campaign is exported by exactly one of them
    owners = {}
    for url in urls:
        samples = scrape(url)
        owned = {dict(labels)["campaign"] for (name, labels) in samples if name == "funnel_events_total"}
        owners[url] = owned
    assert owners[first.url] and owners[second.url], owners
    assert not owners[first.url] & owners[second.url], owners
    assert owners[first.url] | owners[second.url] == {c for _, c in traffic.campaigns}
    second.stop()  # leaves cleanly; its partitions move back
    acknowledged += asyncio.run(send(first.url, traffic.events[2 * part :]))
    docs = wait_for_counts([first.url], traffic, timeout=180)
    assert_exact(docs, traffic)
    for channel, campaign in traffic.campaigns:
        assert campaign_doc([first.url], channel, campaign) is not None
    report(f"second worker joins then leaves ({broker_kind})", traffic, acknowledged, docs)


def _partial_truth(traffic: Traffic, upto: int):
    """Ground truth of a prefix of the stream."""
    return from_stream(traffic.events[:upto], traffic.truth.windows, late_ids(traffic))


@pytest.mark.brokers("tansu", "kafka")
def test_a_record_the_consumer_skips_and_acknowledges_is_read_again(broker, broker_kind, tmp_path, workers):
    """Faust skips a record of a stale consumer generation and acknowledges it, so its offset
    would be committed unprocessed. The failpoint does exactly that to one raw record. First
    the 3rd record, with later records of its partition revealing the hole; then, after a
    restart, the only record of a last request, which nothing after it reveals (the stage
    sees its partition's end beyond what it applied). Every count must be exact."""
    traffic = generate(seed=66, subscribers=400)
    worker = WorkerProcess(broker.address, tmp_path, env={"PIPELINE_FAILPOINT": "stream.drop_raw_record:3"})
    workers.append(worker.start())
    acknowledged = asyncio.run(send(worker.url, traffic.events, batch=100))
    assert_exact(wait_for_counts([worker.url], traffic), traffic)
    assert "a later record arrived first; reading again from offset" in worker.log_path.read_text()

    worker.stop()  # committed: the restarted worker's first record is the new one
    worker.env["PIPELINE_FAILPOINT"] = "stream.drop_raw_record:1"
    worker.start()
    newest = max(event["timestamp"] for event in traffic.events)  # not late in any window
    last = dict(traffic.events[-1], event_id="the-last-one", type="click", timestamp=newest + 1)
    acknowledged += asyncio.run(send(worker.url, [last]))
    events = [*traffic.events, last]
    tail = Traffic(events, from_stream(events, traffic.truth.windows, late_ids(traffic)), traffic.campaigns)
    docs = wait_for_counts([worker.url], tail)
    assert_exact(docs, tail)
    log = worker.log_path.read_text()
    assert log.count("failpoint stream.drop_raw_record hit") == 2
    assert "the next record never arrived; reading again from offset" in log
    report(
        f"a raw record skipped and acknowledged by the consumer, x2 ({broker_kind})", tail, acknowledged, docs
    )


@pytest.mark.brokers("tansu", "kafka")
def test_redelivery_storm(worker, broker_kind):
    """Every event delivered 3-5 times, interleaved across the whole stream."""
    rng = random.Random(64)
    traffic = generate(seed=64, subscribers=900, redelivery=0.0)
    storm = []
    for index, event in enumerate(traffic.events):
        storm.append((index, 0, dict(event)))  # the first copy keeps its place in the stream
        for copy in range(rng.randint(2, 4)):  # 2-4 more copies, later, interleaved with the rest
            storm.append((index + rng.randint(1, 3000), 1 + copy, dict(event)))
    storm.sort(key=lambda item: (item[0], item[1]))
    events = [event for _, _, event in storm]
    acknowledged = asyncio.run(send(worker.url, events, batch=500))
    for channel, campaign in traffic.campaigns:
        traffic.truth.duplicates[(channel, campaign)] += sum(
            1 for e in events if e["campaign_id"] == campaign
        ) - sum(1 for e in traffic.events if e["campaign_id"] == campaign)
    storm_traffic = Traffic(events, traffic.truth, traffic.campaigns)
    docs = wait_for_counts([worker.url], storm_traffic)
    assert_exact(docs, storm_traffic)
    report(f"redelivery storm, 3-5 copies ({broker_kind})", storm_traffic, acknowledged, docs)


@pytest.mark.brokers("tansu", "kafka")
def test_out_of_order_and_late_across_window_boundaries(worker):
    """Hand-built: events straddling a 5m boundary arrive out of order; one arrives too late."""
    boundary = (int(time.time()) // 3600 - 2) * 3600  # a boundary of both 5m and 1h windows

    def ev(n: int, kind: str, at: float, who: str = "s1") -> dict:
        return {
            "event_id": f"w{n}",
            "type": kind,
            "channel": "email",
            "campaign_id": "windows",
            "subscriber_id": who,
            "timestamp": at,
        }

    # lateness is judged per topic partition (here: the open topic's own event time)
    events = [
        ev(1, "delivery", boundary - 30),
        ev(2, "open", boundary + 10),  # the next window first...
        ev(3, "click", boundary - 5),  # ...then the previous one, out of order (not late)
        ev(4, "open", boundary + 200),
        ev(5, "open", boundary + 1500),  # moves the opens' event time 25 minutes on
        ev(6, "open", boundary + 600),  # too late for its 5m window, inside its open 1h window
        ev(7, "open", boundary - 4000),  # too late for every window: counts in "all" only
    ]
    assert httpx.post(f"{worker.url}/events", json=events, timeout=30).status_code == 202
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        resp = httpx.get(f"{worker.url}/campaigns/email/windows")
        if resp.status_code == 200 and resp.json()["counts"]["open"] == 5:
            break
        time.sleep(0.3)
    doc = resp.json()
    assert nonzero(doc["counts"]) == {
        "delivery": 1,
        "open": 5,
        "click": 1,
        "unique_open": 1,
        "unique_human_open": 1,
        "unique_click": 1,
    }
    assert doc["late_events"] == 2
    windows = {
        (w["start"], w["end"] - w["start"]): nonzero(w["counts"])
        for ws in doc["window_history"].values()
        for w in ws
    }
    assert windows[(boundary - 300, 300)] == {
        "delivery": 1,
        "click": 1,
        "unique_click": 1,
        "unique_open": 1,
        "unique_human_open": 1,
    }
    assert windows[(boundary, 300)] == {"open": 2, "unique_open": 1, "unique_human_open": 1}
    assert windows[(boundary + 1500, 300)] == {"open": 1, "unique_open": 1, "unique_human_open": 1}
    assert windows[(boundary - 3600, 3600)] == {
        "delivery": 1,
        "click": 1,
        "unique_click": 1,
        "unique_open": 1,
        "unique_human_open": 1,
    }
    assert windows[(boundary, 3600)] == {"open": 4, "unique_open": 1, "unique_human_open": 1}
    assert (boundary + 600, 300) not in windows
