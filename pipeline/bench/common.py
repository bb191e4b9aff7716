"""Shared helpers of the bench: peak RSS, status files, progress on stderr, producing events,
and the brokers it runs on (:func:`open_broker`), with how their clients connect."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
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


# --- the brokers and how their clients connect --------------------------------------------------

# the PIPELINE_KAFKA_* variables that say how a Kafka client connects (pipeline.kafka.security)
SECURITY_VARIABLES = (
    "PIPELINE_KAFKA_SECURITY_PROTOCOL",
    "PIPELINE_KAFKA_SASL_MECHANISM",
    "PIPELINE_KAFKA_SASL_USERNAME",
    "PIPELINE_KAFKA_SASL_PASSWORD",
    "PIPELINE_KAFKA_SASL_PASSWORD_FILE",
    "PIPELINE_KAFKA_SSL_CAFILE",
    "PIPELINE_KAFKA_SSL_CERTFILE",
    "PIPELINE_KAFKA_SSL_KEYFILE",
)
SASL_PREFIX = "kafka-sasl"  # kafka-sasl, kafka-sasl-<version>: one node serving SASL_SSL
SASL_MECHANISM = "SCRAM-SHA-512"
SASL_USER = "worker"


@dataclass(frozen=True)
class BenchBroker:
    """A broker the bench runs a mechanism on: its clients' bootstrap address and the
    ``PIPELINE_KAFKA_*`` variables every client and worker of it connects with (none: plain TCP)."""

    kind: str
    address: str
    security: Mapping[str, str] = field(default_factory=dict)


def kafka_version(kind: str) -> str | None:
    """The Apache Kafka version of a broker kind (None: the embedded Tansu); raises on an unknown one."""
    from pipeline.kafka.local import KAFKA_VERSION

    if kind == "tansu":
        return None
    for prefix in (SASL_PREFIX, "kafka"):
        if kind == prefix:
            return KAFKA_VERSION
        if kind.startswith(prefix + "-"):
            return kind[len(prefix) + 1 :]
    raise ValueError(
        f"unknown broker kind {kind!r}: tansu, kafka, kafka-<version>, kafka-sasl or kafka-sasl-<version>"
    )


def is_sasl(kind: str) -> bool:
    return kind == SASL_PREFIX or kind.startswith(SASL_PREFIX + "-")


@contextlib.contextmanager
def open_broker(kind: str, workdir: Path, name: str) -> Iterator[BenchBroker]:
    """A fresh broker of ``kind``, stopped on exit: ``tansu`` (embedded), ``kafka`` or
    ``kafka-<version>`` (one Apache Kafka node, plain TCP), ``kafka-sasl`` or
    ``kafka-sasl-<version>`` (one node serving clients only on SASL_SSL: SCRAM-SHA-512 as
    user ``worker``, its certificate signed by the cluster's own CA)."""
    version = kafka_version(kind)
    if version is None:
        from pipeline.kafka.tansu import EmbeddedBroker

        with EmbeddedBroker(log_path=workdir / f"{name}.log") as broker:
            yield BenchBroker(kind, broker.address)
        return
    from pipeline.kafka.local import KafkaCluster

    if not is_sasl(kind):
        with KafkaCluster(workdir / name, brokers=1, version=version) as cluster:
            yield BenchBroker(kind, cluster.bootstrap)
        return
    with KafkaCluster(workdir / name, brokers=1, version=version, security="secure") as cluster:
        yield BenchBroker(kind, cluster.bootstrap, sasl_variables(cluster.tls_dir))


def sasl_variables(tls_dir: Path) -> dict[str, str]:
    """What a worker of a secure local cluster needs (as ``pipeline kafka --secure`` prints it):
    SASL_SSL, SCRAM-SHA-512 as user worker, the password from its file, the cluster's CA."""
    return {
        "PIPELINE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "PIPELINE_KAFKA_SASL_MECHANISM": SASL_MECHANISM,
        "PIPELINE_KAFKA_SASL_USERNAME": SASL_USER,
        "PIPELINE_KAFKA_SASL_PASSWORD_FILE": str(tls_dir / f"{SASL_USER}.password"),
        "PIPELINE_KAFKA_SSL_CAFILE": str(tls_dir / "ca.pem"),
    }


def security_settings(env: Mapping[str, str] | None) -> Any:
    """The :class:`~pipeline.settings.Settings` of these ``PIPELINE_KAFKA_*`` variables (any
    others in ``env`` ignored), checked as a worker checks them, the password read from its file."""
    from pipeline.settings import Settings

    return Settings.from_env({k: v for k, v in (env or {}).items() if k in SECURITY_VARIABLES})


def kafka_options(security: Mapping[str, str] | None) -> dict[str, Any]:
    """aiokafka's TLS and SASL keyword arguments for these variables (``{}``: plain TCP)."""
    if not security:
        return {}
    from pipeline.kafka.security import client_options

    return client_options(security_settings(security))


def client_env(security: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a process the bench starts: this one's without any
    ``PIPELINE_KAFKA_*`` connection variables, then ``security`` (plain TCP means plain TCP)."""
    env = {k: v for k, v in os.environ.items() if k not in SECURITY_VARIABLES}
    env.update(security or {})
    return env


async def produce_batched(
    broker: str,
    events: list[dict[str, Any]],
    request_size: int = 1000,
    *,
    security: Mapping[str, str] | None = None,
) -> float:
    """Publish like the HTTP ingest does (per request: group by partition, one message a group);
    ``security``: the ``PIPELINE_KAFKA_*`` variables of the broker's clients."""
    from dataclasses import replace

    from pipeline.ingest.producer import EventProducer

    producer = EventProducer(replace(security_settings(security), broker=broker, idempotent_producer=False))
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


async def produce_single(
    broker: str,
    topic: str,
    events: list[dict[str, Any]],
    partitions: int = 4,
    *,
    security: Mapping[str, str] | None = None,
) -> None:
    """One event per message, keyed by subscriber: what a direct producer writes.
    ``security``: the ``PIPELINE_KAFKA_*`` variables of the broker's clients."""
    from aiokafka import AIOKafkaProducer

    from pipeline.events import routing_key
    from pipeline.kafka.topics import partition_for

    producer = AIOKafkaProducer(
        bootstrap_servers=broker, acks="all", linger_ms=5, enable_idempotence=False, **kafka_options(security)
    )
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
    broker: str,
    events: list[dict[str, Any]],
    *,
    misplaced: bool = False,
    partitions: int = 4,
    security: Mapping[str, str] | None = None,
) -> tuple[float, int]:
    """One canonical event per record on its raw topic, keyed by subscriber: what a Kafka client
    writing directly sends. Each record goes to the partition the rule gives
    (``partition_for(routing_key(event))``, where aiokafka's default partitioner puts the key),
    or with ``misplaced`` to another one: the n-th record to ``right + 1 + n % (partitions - 1)``,
    so a subscriber's records, and an event and its redeliveries, spread over the wrong
    partitions (counted where they land, they would not be exact). Returns the seconds it took
    and how many records the broker acknowledged on a partition other than their right one.
    ``security``: the ``PIPELINE_KAFKA_*`` variables of the broker's clients."""
    from aiokafka import AIOKafkaProducer

    from pipeline.events import routing_key
    from pipeline.kafka.topics import partition_for, raw_topic

    producer = AIOKafkaProducer(
        bootstrap_servers=broker, acks="all", linger_ms=5, enable_idempotence=False, **kafka_options(security)
    )
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


async def create_topics(
    broker: str, topics: list[str], partitions: int = 4, *, security: Mapping[str, str] | None = None
) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=broker, **kafka_options(security))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [NewTopic(t, partitions, 1) for t in topics if t not in existing]
        if new:
            await admin.create_topics(new)
    finally:
        await admin.close()


async def partitions_of(
    broker: str, topics: list[str], *, security: Mapping[str, str] | None = None
) -> dict[str, list[int]]:
    """The partitions of existing topics. A consumer that subscribes to nothing has no metadata
    of a topic (Tansu sends every topic's anyway, Apache Kafka only what is asked for)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=broker, **kafka_options(security))
    await admin.start()
    try:
        found = await admin.describe_topics(topics)
        return {doc["topic"]: sorted(p["partition"] for p in doc["partitions"]) for doc in found}
    finally:
        await admin.close()
