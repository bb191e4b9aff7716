"""A worker that lost its local state recovers it from the changelogs; the final numbers are exact.

(SIGKILL at random points of a long stream: tests/e2e/test_faults.py.)"""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import WorkerProcess
from helpers import assert_exact, report, wait_for_counts

from pipeline.simulation.traffic import generate, send


@pytest.mark.brokers("tansu", "kafka")
def test_restart_with_lost_local_state(broker, broker_kind, tmp_path, workers):
    """The local RocksDB files are gone (a new machine): state comes back from the changelogs."""
    import shutil

    traffic = generate(seed=22, subscribers=900)
    worker = WorkerProcess(broker.address, tmp_path).start()
    workers.append(worker)
    half = len(traffic.events) // 2
    acknowledged = asyncio.run(send(worker.url, traffic.events[:half]))
    time.sleep(1.5)
    worker.kill()
    shutil.rmtree(tmp_path / f"state-{worker.port}")
    worker.start()
    acknowledged += asyncio.run(send(worker.url, traffic.events[half:]))
    docs = wait_for_counts([worker.url], traffic, timeout=180)
    assert_exact(docs, traffic)
    report(f"restart with the local state deleted ({broker_kind})", traffic, acknowledged, docs)
