"""Apache Kafka without Docker (`pipeline kafka`), and the topics a worker creates on it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, WorkerProcess
from helpers import alive, children, port_open

from pipeline.kafka.declare import TopicSpec, declare_topics
from pipeline.kafka.local import KAFKA_VERSION
from pipeline.kafka.tansu import free_port
from pipeline.kafka.topics import PARTIALS_TOPIC, RAW_TOPICS


def test_pipeline_kafka_starts_a_broker_and_stops_it_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "kafka.out"
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "kafka", "--port", str(port), "--dir", str(tmp_path / "kafka")],
        cwd=ROOT,
        stdout=open(out, "ab"),
        stderr=subprocess.STDOUT,
    )
    jvms: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while f"PIPELINE_BROKER=127.0.0.1:{port}" not in out.read_text():
            assert process.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.3)
        assert f"Apache Kafka {KAFKA_VERSION}" in out.read_text()
        jvms = children(process.pid)
        assert len(jvms) == 1 and "java" in Path(f"/proc/{jvms[0]}/cmdline").read_text()
        assert port_open(port)
        process.send_signal(signal.SIGTERM)
        assert process.wait(90) == 0, out.read_text()
        assert not any(alive(pid) for pid in jvms)
        assert not port_open(port)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in jvms:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.brokers("kafka")
def test_worker_creates_every_topic_with_the_pipeline_settings(broker, tmp_path, workers) -> None:
    """Not the broker's defaults (4 partitions, auto-creation off): PIPELINE_PARTITIONS, compaction."""
    worker = WorkerProcess(broker.address, tmp_path, env={"PIPELINE_PARTITIONS": "6"}).start()
    workers.append(worker)
    topics = [*RAW_TOPICS, PARTIALS_TOPIC, "funnel-subscribers-changelog"]
    partitions = broker.partitions(topics)
    for topic in topics:
        assert sorted(p for t, p in partitions if t == topic) == list(range(6)), topic


def test_topics_with_another_partition_count_stop_the_worker(broker, tmp_path) -> None:
    """The partition count is fixed at the first start; a changed setting is refused, loudly."""
    import asyncio

    asyncio.run(declare_topics(broker.address, [TopicSpec(RAW_TOPICS[0], 2, 1)]))
    worker = WorkerProcess(broker.address, tmp_path)
    worker.start(wait=False)
    assert worker.process is not None and worker.process.wait(120) != 0
    assert (
        f"topic {RAW_TOPICS[0]} has 2 partitions, the pipeline wants 4 (PIPELINE_PARTITIONS)" in worker.log()
    )
