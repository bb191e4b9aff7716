"""Ingest in processes of its own beside the stream worker: one public port shared by them, one
``/metrics`` summing their counters, every count exact, a dead ingest process replaced, and
no ingest process outliving its worker."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from conftest import WorkerProcess
from helpers import assert_exact, children, metric_sum, wait_for_counts

from pipeline.ingest.processes import SHARED_COUNTERS_DIR, ingest_process_count
from pipeline.settings import Settings, SettingsError
from pipeline.simulation.traffic import generate, send


def events(n: int, campaign: str, offset: int = 0) -> list[dict]:
    return [
        {
            "event_id": f"{campaign}-{offset + i}",
            "type": "click",
            "channel": "email",
            "campaign_id": campaign,
            "subscriber_id": f"sub-{(offset + i) % 7}",
            "timestamp": time.time() - 30,
        }
        for i in range(n)
    ]


def test_process_count_follows_the_cpus_unless_set() -> None:
    auto = Settings()
    assert ingest_process_count(auto, cpus=1) == 0
    assert ingest_process_count(auto, cpus=2) == 1
    assert ingest_process_count(auto, cpus=8) == 2
    assert ingest_process_count(Settings(ingest_processes=3), cpus=1) == 3
    assert Settings.from_env({"PIPELINE_INGEST_PROCESSES": "0"}).ingest_processes == 0
    assert Settings.from_env({"PIPELINE_INGEST_PROCESSES": "auto"}).ingest_processes is None
    with pytest.raises(SettingsError):
        Settings.from_env({"PIPELINE_INGEST_PROCESSES": "-1"})


def test_two_ingest_processes_share_the_port_and_one_metrics(broker, tmp_path: Path, workers) -> None:
    worker = WorkerProcess(broker.address, tmp_path, env={"PIPELINE_INGEST_PROCESSES": "2"}).start()
    workers.append(worker)
    assert worker.process is not None
    ingest = children(worker.process.pid)
    assert len(ingest) == 2, ingest
    sent = 0
    for _ in range(40):  # a new connection each: the kernel spreads them over both processes
        batch = events(25, "shared", offset=sent)
        resp = httpx.post(f"{worker.url}/events", json=batch, headers={"Connection": "close"}, timeout=30)
        assert resp.status_code == 202, resp.text
        sent += len(batch)
    counted = {
        path.name.rsplit("_", 1)[1].removesuffix(".db")
        for path in (tmp_path / f"state-{worker.port}" / SHARED_COUNTERS_DIR).glob("counter_*.db")
    }
    assert {str(pid) for pid in ingest} <= counted, (ingest, counted)
    # the sum over both processes, on the public port (forwarded) as on any listener
    assert metric_sum(worker.url, "pipeline_events_ingested_total", source="canonical") == sent
    requests = metric_sum(worker.url, "pipeline_http_requests_total", endpoint="/events", status="202")
    assert requests == 40
    before = metric_sum(worker.url, "pipeline_http_requests_total", endpoint="/metrics")
    # a forwarded request is counted once, by the ingest process that took it
    assert metric_sum(worker.url, "pipeline_http_requests_total", endpoint="/metrics") == before + 1
    campaigns = httpx.get(f"{worker.url}/campaigns/email/shared", timeout=10)
    deadline = time.monotonic() + 60
    while campaigns.status_code != 200 or campaigns.json()["counts"]["click"] != sent:
        assert time.monotonic() < deadline, campaigns.text
        time.sleep(0.3)
        campaigns = httpx.get(f"{worker.url}/campaigns/email/shared", timeout=10)
    assert campaigns.json()["counts"]["unique_click"] == 7

    # a dead ingest process is replaced, and the counts it made stay in the sum
    os.kill(ingest[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        now = children(worker.process.pid)
        if len(now) == 2 and ingest[0] not in now:
            break
        assert time.monotonic() < deadline, now
        time.sleep(0.2)
    worker.wait_healthy()
    resp = httpx.post(f"{worker.url}/events", json=events(5, "shared", offset=sent), timeout=30)
    assert resp.status_code == 202
    assert metric_sum(worker.url, "pipeline_events_ingested_total", source="canonical") == sent + 5
    assert "restarting it" in worker.log()


def test_admin_port_with_ingest_processes(broker, tmp_path: Path, workers) -> None:
    from pipeline.kafka.tansu import free_port

    worker = WorkerProcess(
        broker.address, tmp_path, admin_port=free_port(), env={"PIPELINE_INGEST_PROCESSES": "1"}
    ).start()
    workers.append(worker)
    traffic_events = events(30, "admin")
    assert httpx.post(f"{worker.url}/events", json=traffic_events, timeout=30).status_code == 202
    for path in ("/health", "/metrics", "/campaigns"):
        assert httpx.get(f"{worker.url}{path}", timeout=10).status_code == 404, path
    assert httpx.get(f"{worker.url}/livez", timeout=10).status_code == 200
    assert metric_sum(worker.admin_url, "pipeline_events_ingested_total", source="canonical") == 30
    assert metric_sum(worker.admin_url, "pipeline_broker_up") == 1


def test_ingest_processes_do_not_outlive_their_worker(broker, tmp_path: Path) -> None:
    worker = WorkerProcess(broker.address, tmp_path, env={"PIPELINE_INGEST_PROCESSES": "1"}).start()
    assert worker.process is not None
    ingest = children(worker.process.pid)
    assert len(ingest) == 1
    os.kill(worker.process.pid, signal.SIGKILL)  # the worker alone, not its process group
    worker.process.wait()
    deadline = time.monotonic() + 20
    while Path(f"/proc/{ingest[0]}").exists() and "zombie" not in _state(ingest[0]):
        assert time.monotonic() < deadline, "the ingest process outlived its worker"
        time.sleep(0.2)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def test_ground_truth_through_two_ingest_processes(broker, tmp_path: Path, workers) -> None:
    worker = WorkerProcess(broker.address, tmp_path, env={"PIPELINE_INGEST_PROCESSES": "2"}).start()
    workers.append(worker)
    traffic = generate(seed=5, subscribers=300)
    assert asyncio.run(send(worker.url, traffic.events, batch=100)) == len(traffic.events)
    assert_exact(wait_for_counts([worker.url], traffic), traffic)
