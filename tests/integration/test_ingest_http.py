"""``POST /events`` through a real socket against the real broker: status codes of the contract."""

from __future__ import annotations

import time

import httpx
import orjson
from aiokafka import AIOKafkaConsumer
from conftest import WorkerProcess

from pipeline.kafka.topics import DEAD_LETTER_TOPIC


def good(i: int, **extra) -> dict:
    return {
        "event_id": f"e{i}",
        "type": "click",
        "channel": "ads",
        "campaign_id": "c1",
        "subscriber_id": f"s{i}",
        "timestamp": time.time() - 60,
        **extra,
    }


def read_dead_letters(bootstrap: str, expected: int, timeout: float = 20.0) -> list[dict]:
    import asyncio

    async def run() -> list[dict]:
        consumer = AIOKafkaConsumer(
            DEAD_LETTER_TOPIC, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
        )
        await consumer.start()
        out: list[dict] = []
        deadline = time.monotonic() + timeout
        try:
            while len(out) < expected and time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    out += [orjson.loads(r.value) for r in records]
        finally:
            await consumer.stop()
        return out

    return asyncio.run(run())


def test_bad_input_is_reported_by_index_and_valid_events_survive(worker, broker):
    url = f"{worker.url}/events"
    items = [
        good(1),
        {"event_id": "e2", "type": "clack", "channel": "ads", "campaign_id": "c1", "timestamp": 1},
        {"event_id": "e3", "type": "click", "channel": "ads", "timestamp": 1, "subscriber_id": "x"},
        {
            "event_id": 4,
            "type": "click",
            "channel": "ads",
            "campaign_id": "c1",
            "timestamp": 1,
            "subscriber_id": "x",
        },
        good(5, timestamp=time.time() + 86400),
        good(6, subscriber_id="Someone@Example.com"),
        "not an object",
        good(7, timestamp="2026-01-01T00:00:00Z"),
    ]
    resp = httpx.post(url, json=items, timeout=30)
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["accepted"] == 3
    reasons = {r["index"]: r["reason"] for r in body["rejected"]}
    assert reasons == {
        1: "unknown_type",
        2: "missing_field:campaign_id",
        3: "invalid_event_id:type",
        4: "timestamp_in_future",
        6: "not_an_object",
    }
    # every rejected event is in the dead-letter topic with its reason, no address in clear
    letters = read_dead_letters(broker.address, 5)
    assert sorted(letter["reason"] for letter in letters) == sorted(reasons.values())
    assert b"@example.com" not in orjson.dumps(letters).lower()
    # the accepted ones count
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        doc = httpx.get(f"{worker.url}/campaigns/ads/c1").json()
        if doc.get("counts", {}).get("click") == 3:
            break
        time.sleep(0.3)
    assert doc["counts"]["click"] == 3 and doc["counts"]["unique_click"] == 3


def test_body_errors(worker):
    url = f"{worker.url}/events"
    for body in (b"{not json", b"", b"42", b"\xff\xfe\x00"):
        resp = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
        assert resp.status_code == 400, (body, resp.text)
        assert "error" in resp.json()
    # NDJSON with one broken line: the good lines are accepted
    lines = b"\n".join([orjson.dumps(good(10)), b"{broken", orjson.dumps(good(11))])
    resp = httpx.post(url, content=lines)
    assert resp.status_code == 202
    assert resp.json() == {"accepted": 2, "rejected": [{"index": 1, "reason": "malformed_json"}]}
    # only invalid events: 400 with the same report, nothing accepted
    resp = httpx.post(url, json=[{"type": "click"}])
    assert resp.status_code == 400 and resp.json()["accepted"] == 0
    # oversized body: 413, and the worker is still fine
    resp = httpx.post(url, content=b"[" + b" " * (6 * 1024 * 1024) + b"]")
    assert resp.status_code == 413
    assert httpx.get(f"{worker.url}/health").status_code == 200
    assert httpx.get(f"{worker.url}/nowhere").status_code == 404


def test_token_required_when_set(broker, tmp_path, workers):
    worker = WorkerProcess(broker.address, tmp_path, env={"PIPELINE_INGEST_TOKEN": "s3cret"}).start()
    workers.append(worker)
    url = f"{worker.url}/events"
    assert httpx.post(url, json=good(1)).status_code == 401
    assert httpx.post(url, json=good(1), headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.post(url, json=good(1), headers={"Authorization": "Bearer s3cret"}).status_code == 202


def test_broker_down_gives_503_and_recovers(broker, tmp_path, workers):
    worker = WorkerProcess(broker.address, tmp_path, env={"PIPELINE_SEND_TIMEOUT": "3"}).start()
    workers.append(worker)
    url = f"{worker.url}/events"
    assert httpx.post(url, json=good(1), timeout=30).status_code == 202
    broker.stop()
    resp = httpx.post(url, json=good(2), timeout=60)
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"] == "broker_unavailable"
    assert httpx.get(f"{worker.url}/metrics", timeout=10).status_code == 200


def test_back_pressure_bounds_events_waiting_for_the_broker(broker, tmp_path, workers):
    """While the broker hangs, at most PIPELINE_MAX_IN_FLIGHT_EVENTS wait; the rest get 503 at once."""
    import threading

    worker = WorkerProcess(
        broker.address, tmp_path, env={"PIPELINE_SEND_TIMEOUT": "6", "PIPELINE_MAX_IN_FLIGHT_EVENTS": "100"}
    ).start()
    workers.append(worker)
    import os
    import signal

    os.kill(broker.process.pid, signal.SIGSTOP)  # a broker that hangs: sends wait for acks
    first: dict = {}
    waiting = threading.Thread(
        target=lambda: first.update(
            resp=httpx.post(f"{worker.url}/events", json=[good(i) for i in range(80)], timeout=60)
        )
    )
    waiting.start()
    time.sleep(1.5)
    started = time.monotonic()
    resp = httpx.post(f"{worker.url}/events", json=[good(100 + i) for i in range(40)], timeout=60)
    assert resp.status_code == 503 and resp.json()["error"] == "overloaded"
    assert time.monotonic() - started < 3  # refused at once, not queued
    waiting.join()
    os.kill(broker.process.pid, signal.SIGCONT)
    assert first["resp"].status_code == 503 and first["resp"].json()["error"] == "broker_unavailable"
