"""The production path under faults: a 3-node Apache Kafka cluster (replication factor 3,
min.insync.replicas=2, acks=all, idempotent ingest producer) loses brokers while events stream
in, and workers come and go. Every test compares exact final counts with the generated ground
truth, checks the workers recovered by themselves, and records sent / acknowledged / counted /
lost / doubled (printed, and appended to $PIPELINE_FAULT_REPORT when set)."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest
from conftest import WorkerProcess
from helpers import Sender, assert_exact, count_stored_copies, report, scrape, wait_for_counts

from pipeline.kafka.local import KafkaCluster
from pipeline.kafka.topics import RAW_TOPICS
from pipeline.simulation.traffic import generate

REPLICATED = {"PIPELINE_REPLICATION": "3"}


def broker_faults(cluster: KafkaCluster, fault: str, log: list[str]) -> list[Callable[[], None]]:
    """The fault's steps; events stream between any two of them and after the last."""
    victim: list[int] = []

    def kill_raw_leader() -> None:
        leaders = cluster.leader_counts(RAW_TOPICS)
        node_id = leaders.most_common(1)[0][0]
        led, total = leaders[node_id], sum(leaders.values())
        log.append(f"SIGKILL node {node_id}, leader of {led} of {total} raw partitions")
        victim.append(node_id)
        cluster.kill(node_id)

    def kill_controller() -> None:
        node_id = cluster.active_controller()
        assert node_id is not None
        log.append(f"SIGKILL node {node_id}, the active controller")
        victim.append(node_id)
        cluster.kill(node_id)

    def restart_victim() -> None:
        node_id = victim.pop()
        cluster.start_node(node_id)
        cluster.wait_in_sync()
        log.append(f"node {node_id} back, every partition in sync")

    def stop(node_id: int) -> Callable[[], None]:
        def step() -> None:
            cluster.node(node_id).terminate()
            cluster.node(node_id).wait_stopped()
            log.append(f"node {node_id} stopped (SIGTERM)")

        return step

    def start(node_id: int) -> Callable[[], None]:
        def step() -> None:
            cluster.start_node(node_id)
            cluster.wait_in_sync()
            log.append(f"node {node_id} back, every partition in sync")

        return step

    return {
        "leader": [kill_raw_leader, restart_victim],
        "controller": [kill_controller, restart_victim],
        "rolling": [step for node in (1, 2, 3) for step in (stop(node), start(node))],
    }[fault]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["leader", "controller", "rolling"])
def test_broker_faults_lose_and_double_nothing(
    cluster: KafkaCluster, tmp_path, cluster_workers, fault
) -> None:
    traffic = generate(seed=71, subscribers=3000)
    first = WorkerProcess(cluster.bootstrap, tmp_path, env=REPLICATED).start()
    cluster_workers.append(first)
    second = WorkerProcess(cluster.bootstrap, tmp_path, env=REPLICATED).start()
    cluster_workers.append(second)
    assert {len(replicas) for _, replicas, _ in cluster.partitions(RAW_TOPICS).values()} == {3}
    log: list[str] = []
    steps = broker_faults(cluster, fault, log)
    sender = Sender(first.url, traffic.events, stops=len(steps))
    sender.start()
    for index, step in enumerate(steps):
        sender.wait_stop(index)
        step()
        sender.resume(index)
    sender.join(600)
    assert sender.error is None and not sender.is_alive(), sender.error
    assert sender.acknowledged == len(traffic.events)
    stored_twice = count_stored_copies(cluster.bootstrap, traffic)
    urls = [first.url, second.url]
    docs = wait_for_counts(urls, traffic, timeout=300)
    assert_exact(docs, traffic)
    for worker in (first, second):  # nobody restarted them
        assert worker.process is not None and worker.process.poll() is None, worker.log()
        assert httpx.get(f"{worker.url}/health", timeout=10).status_code == 200
    print("\n".join(log))
    names = {
        "leader": "Kafka 3 nodes: SIGKILL of the node leading most raw partitions, restart",
        "controller": "Kafka 3 nodes: SIGKILL of the active controller, restart",
        "rolling": "Kafka 3 nodes: rolling restart of all three (SIGTERM, wait in sync)",
    }
    report(names[fault], traffic, sender.acknowledged, docs, stored_twice)


def owned_raw_partitions(url: str) -> set[tuple[str, str]]:
    return {
        (labels["topic"], labels["partition"])
        for name, labels in ((name, dict(labels)) for name, labels in scrape(url))
        if name == "pipeline_consumer_lag" and labels["topic"] in RAW_TOPICS
    }


def wait_spread(urls: list[str], timeout: float = 120.0) -> dict[str, set[tuple[str, str]]]:
    """Until every worker owns raw partitions and no partition is owned twice."""
    deadline = time.monotonic() + timeout
    while True:
        owned = {url: owned_raw_partitions(url) for url in urls}
        overlap = [a & b for i, a in enumerate(owned.values()) for b in list(owned.values())[i + 1 :]]
        if all(owned.values()) and not any(overlap):
            return owned
        assert time.monotonic() < deadline, owned
        time.sleep(0.5)


@pytest.mark.brokers("kafka")
def test_workers_spread_then_one_killed_and_one_added(broker, tmp_path, workers) -> None:
    """Two workers share 6 partitions; a third joins while events stream in, then one of the
    first two is SIGKILLed; the remaining two end with exact counts."""
    traffic = generate(seed=72, subscribers=4000, email_campaigns=4, ads_campaigns=3)
    env = {"PIPELINE_PARTITIONS": "6"}
    first = WorkerProcess(broker.address, tmp_path, env=env).start()
    second = WorkerProcess(broker.address, tmp_path, env=env).start()
    workers += [first, second]
    third = WorkerProcess(broker.address, tmp_path, env=env)
    sender = Sender(first.url, traffic.events, stops=2)
    sender.start()
    sender.wait_stop(0)
    wait_spread([first.url, second.url])
    third.start(wait=False)  # joins while events stream in
    workers.append(third)
    sender.resume(0)
    third.wait_healthy()
    sender.wait_stop(1)
    wait_spread([first.url, second.url, third.url])
    second.kill()
    sender.resume(1)
    sender.join(600)
    assert sender.error is None and not sender.is_alive(), sender.error
    stored_twice = count_stored_copies(broker.address, traffic)
    urls = [first.url, third.url]
    docs = wait_for_counts(urls, traffic, timeout=300)
    assert_exact(docs, traffic)
    wait_spread(urls)
    name = "Kafka: 2 workers, a 3rd joins, one SIGKILLed, mid-stream"
    report(name, traffic, sender.acknowledged, docs, stored_twice)
