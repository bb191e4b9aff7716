"""`pipeline broker` as documented for several workers: a worker started with its defaults works
against it (one warning, no endless InitProducerId retries), and SIGTERM or SIGINT stops the
Tansu process it started."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, WorkerProcess
from helpers import alive, assert_exact, children, port_open, wait_for_counts

from pipeline.kafka.tansu import free_port, wait_for_port
from pipeline.simulation.traffic import generate


@contextlib.contextmanager
def pipeline_broker(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    """`pipeline broker --port P`: (the command's process, P, the Tansu process's pid)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "broker", "--port", str(port)],
        cwd=ROOT,
        stdout=open(tmp_path / "broker.log", "ab"),
        stderr=subprocess.STDOUT,
    )
    tansu: list[int] = []
    try:
        wait_for_port("127.0.0.1", port, 30)
        tansu = children(process.pid)
        assert len(tansu) == 1, tansu
        yield process, port, tansu[0]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in tansu:  # whatever the command left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_pipeline_broker_stops_tansu_on(tmp_path: Path, signum: int) -> None:
    with pipeline_broker(tmp_path) as (process, port, tansu):
        process.send_signal(signum)
        assert process.wait(30) == 0
        deadline = time.monotonic() + 10
        while alive(tansu) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(tansu), "the Tansu process outlived `pipeline broker`"
        assert not port_open(port)


def test_worker_with_defaults_works_against_pipeline_broker(tmp_path: Path, workers) -> None:
    with pipeline_broker(tmp_path) as (_process, port, _tansu):
        worker = WorkerProcess(f"127.0.0.1:{port}", tmp_path).start()  # no PIPELINE_IDEMPOTENT_PRODUCER
        workers.append(worker)
        traffic = generate(seed=14, subscribers=300)
        batch = 250
        for start in range(0, len(traffic.events), batch):
            # no retry: every request is accepted the first time
            resp = httpx.post(f"{worker.url}/events", json=traffic.events[start : start + batch], timeout=60)
            assert resp.status_code == 202, resp.text
        assert_exact(wait_for_counts([worker.url], traffic), traffic)
        log = worker.log_path.read_text(errors="replace")
        assert log.count("does not give out producer ids") == 1, log[-3000:]
        assert "InitProducerIdRequest" not in log
        worker.stop()  # before its broker
