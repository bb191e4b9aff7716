"""Shared helpers of the bench: peak RSS, status files, progress on stderr, producing events."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson


def _status_mib(pid: int | str, field: str) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def peak_rss_mib(pid: int | str = "self") -> float:
    """Peak resident set size (VmHWM) of a process, in MiB."""
    return _status_mib(pid, "VmHWM:")


def rss_mib(pid: int | str = "self") -> float:
    """Current resident set size (VmRSS) of a process, in MiB."""
    return _status_mib(pid, "VmRSS:")


def wait_until_done(
    proc: Any, status: Path, name: str, log: Path, timeout: float, describe: Any
) -> dict[str, Any]:
    """Poll a measuring subprocess's status file until it says ``done``; report progress.

    Raises if the process exits first or the timeout passes; ``describe(doc)`` is the progress text.
    """
    deadline = time.monotonic() + timeout
    doc = None
    last_report = 0.0
    while time.monotonic() < deadline:
        doc = read_json(status)
        if doc and doc.get("done"):
            return doc
        if proc.poll() is not None:
            raise RuntimeError(f"{name} worker exited with {proc.returncode}; see {log}")
        if doc and time.monotonic() - last_report > 5:
            last_report = time.monotonic()
            progress(f"{name}: {describe(doc)}")
        time.sleep(0.2)
    raise RuntimeError(f"{name} did not finish within {timeout}s (last status {doc and describe(doc)})")


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median rate (``events_per_s``), with every run's rate beside it."""
    ranked = sorted(runs, key=lambda run: run["events_per_s"])
    return {**ranked[(len(ranked) - 1) // 2], "runs_events_per_s": [run["events_per_s"] for run in runs]}


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_json(path: Path, doc: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(orjson.dumps(doc))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None


def run_async(coro: Any) -> Any:
    return asyncio.run(coro)


async def produce_batched(broker: str, events: list[dict[str, Any]], request_size: int = 1000) -> float:
    """Publish like the HTTP ingest does (per request: group by partition, one message a group)."""
    from pipeline.ingest.producer import EventProducer
    from pipeline.settings import Settings

    producer = EventProducer(Settings(broker=broker, idempotent_producer=False))
    started = time.perf_counter()
    try:
        pending: list[asyncio.Task] = []
        for i in range(0, len(events), request_size):
            pending.append(asyncio.ensure_future(producer.publish(events[i : i + request_size])))
            if len(pending) >= 8:
                await pending.pop(0)
        for task in pending:
            await task
    finally:
        await producer.stop()
    return time.perf_counter() - started


async def produce_single(broker: str, topic: str, events: list[dict[str, Any]], partitions: int = 4) -> None:
    """One event per message, keyed by subscriber: what a direct producer writes."""
    from aiokafka import AIOKafkaProducer

    from pipeline.events import routing_key
    from pipeline.kafka.topics import partition_for

    producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all", linger_ms=5, enable_idempotence=False)
    await producer.start()
    try:
        futures = []
        for event in events:
            key = routing_key(event)
            futures.append(
                await producer.send(
                    topic, orjson.dumps(event), key=key.encode(), partition=partition_for(key, partitions)
                )
            )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def produce_direct(
    broker: str, events: list[dict[str, Any]], *, misplaced: bool = False, partitions: int = 4
) -> tuple[float, int]:
    """One canonical event per record on its raw topic, keyed by subscriber: what a Kafka client
    writing directly sends. Each record goes to the partition the rule gives
    (``partition_for(routing_key(event))``, where aiokafka's default partitioner puts the key),
    or with ``misplaced`` to another one: the n-th record to ``right + 1 + n % (partitions - 1)``,
    so a subscriber's records, and an event and its redeliveries, spread over the wrong
    partitions (counted where they land, they would not be exact). Returns the seconds it took
    and how many records the broker acknowledged on a partition other than their right one."""
    from aiokafka import AIOKafkaProducer

    from pipeline.events import routing_key
    from pipeline.kafka.topics import partition_for, raw_topic

    producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all", linger_ms=5, enable_idempotence=False)
    await producer.start()
    started = time.perf_counter()
    try:
        futures = []
        right = []
        for n, event in enumerate(events):
            key = routing_key(event)
            partition = partition_for(key, partitions)
            right.append(partition)
            if misplaced:
                partition = (partition + 1 + n % (partitions - 1)) % partitions
            futures.append(
                await producer.send(
                    raw_topic(event["type"]), orjson.dumps(event), key=key.encode(), partition=partition
                )
            )
        acked = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    elsewhere = sum(meta.partition != want for meta, want in zip(acked, right, strict=True))
    return time.perf_counter() - started, elsewhere


async def create_topics(broker: str, topics: list[str], partitions: int = 4) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [NewTopic(t, partitions, 1) for t in topics if t not in existing]
        if new:
            await admin.create_topics(new)
    finally:
        await admin.close()


async def partitions_of(broker: str, topics: list[str]) -> dict[str, list[int]]:
    """The partitions of existing topics. A consumer that subscribes to nothing has no metadata
    of a topic (Tansu sends every topic's anyway, Apache Kafka only what is asked for)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        found = await admin.describe_topics(topics)
        return {doc["topic"]: sorted(p["partition"] for p in doc["partitions"]) for doc in found}
    finally:
        await admin.close()
