"""A worker killed with SIGKILL mid-stream recovers its state; the final numbers are exact."""

from __future__ import annotations

import asyncio
import random
import time

from conftest import WorkerProcess
from helpers import assert_exact, wait_for_counts

from pipeline.simulate import generate, send


def test_sigkill_mid_stream_then_restart(broker, tmp_path, workers):
    rng = random.Random(3)
    traffic = generate(seed=21, subscribers=3000)
    worker = WorkerProcess(broker.address, tmp_path).start()
    workers.append(worker)
    chunks = 4
    size = len(traffic.events) // chunks + 1
    for i in range(chunks):
        chunk = traffic.events[i * size : (i + 1) * size]
        assert asyncio.run(send(worker.url, chunk, batch=200)) == len(chunk)
        time.sleep(rng.uniform(0.0, 0.6))  # the worker is still working through the chunk
        worker.kill()
        worker.start()  # same data dir and port: local RocksDB state plus changelog recovery
    docs = wait_for_counts([worker.url], traffic, timeout=180)
    assert_exact(docs, traffic)


def test_restart_with_lost_local_state(broker, tmp_path, workers):
    """The local RocksDB files are gone (a new machine): state comes back from the changelogs."""
    import shutil

    traffic = generate(seed=22, subscribers=900)
    worker = WorkerProcess(broker.address, tmp_path).start()
    workers.append(worker)
    half = len(traffic.events) // 2
    asyncio.run(send(worker.url, traffic.events[:half]))
    time.sleep(1.5)
    worker.kill()
    shutil.rmtree(tmp_path / f"state-{worker.port}")
    worker.start()
    asyncio.run(send(worker.url, traffic.events[half:]))
    docs = wait_for_counts([worker.url], traffic, timeout=180)
    assert_exact(docs, traffic)
