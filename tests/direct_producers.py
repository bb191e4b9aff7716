"""Writing canonical events straight to the raw topics with Kafka clients that are not the
project's own: Kafka's console producer (Java, from the jars ``pipeline kafka`` fetches), kcat
and confluent-kafka (both librdkafka), each with its own default partitioner.

A record is one canonical event (``schemas/event.schema.json``) as JSON, with a key or none.
The pipeline's rule puts an event on ``partition_for(routing_key(event))`` (the Java client's
murmur2 of the subscriber, else of ``"#" + event_id``); what these clients do instead:

* the console producer: keyed, murmur2 of the key (the rule's placement when the key is the
  routing key); unkeyed, the sticky partitioner (a batch to one partition, then the next);
* kcat and confluent-kafka: librdkafka's ``consistent_random``: keyed, CRC32 of the key (not
  the rule's placement); unkeyed, a random partition per record.

Also here: the subscriber id an address becomes (computed with ``hmac`` directly, not with the
ingest's code), what the raw topics hold and where (:func:`raw_records`, :func:`placement`,
:func:`count_stored_copies`), a wait until a worker has applied a given number of records, and
the check that a worker reports the events it moved (:func:`assert_moves_reported`).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import os
import shutil
import subprocess
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

# (event, key): the key as the producer sends it, None for a record without a key
Record = tuple[dict[str, Any], str | None]

SEPARATOR = "\t"  # between key and value on a line; compact JSON never holds a raw tab

CLIENTS = ("console-producer", "kcat", "confluent-kafka")


def key_by_subscriber(event: dict[str, Any]) -> str | None:
    """The subscriber id; an event without one (an ads impression) by ``"#" + event_id``, as
    the rule says."""
    return event.get("subscriber_id") or "#" + event["event_id"]


def key_by_campaign(event: dict[str, Any]) -> str | None:
    return event["campaign_id"]


def no_key(event: dict[str, Any]) -> str | None:
    return None


KEYINGS: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "keyed by subscriber_id": key_by_subscriber,
    "unkeyed": no_key,
    "keyed by campaign_id": key_by_campaign,
}


def hashed_subscriber(address: str, salt: bytes) -> str:
    """The id the ingest gives an address (README, Security): ``h:`` + the first 32 hex digits
    of HMAC-SHA256(salt, lower-cased address)."""
    digest = hmac.new(salt, address.strip().lower().encode("utf-8"), hashlib.sha256).hexdigest()
    return "h:" + digest[:32]


def _by_topic(records: Iterable[Record]) -> dict[tuple[str, bool], list[Record]]:
    """Records per (raw topic, keyed), each list in the order given."""
    groups: dict[tuple[str, bool], list[Record]] = {}
    for event, key in records:
        if key is not None and (SEPARATOR in key or "\n" in key or "\r" in key):
            raise ValueError(f"a key a line-based producer cannot carry: {key!r}")
        groups.setdefault((f"funnel.raw.{event['type']}", key is not None), []).append((event, key))
    return groups


def _lines(records: list[Record]) -> bytes:
    out = []
    for event, key in records:
        value = orjson.dumps(event)
        out.append(value if key is None else key.encode("utf-8") + SEPARATOR.encode() + value)
    return b"\n".join(out) + b"\n"


# ---------------------------------------------------------------- Kafka's console producer

CONSOLE_PRODUCER_CLASSES = {
    "org/apache/kafka/tools/ConsoleProducer.class": "org.apache.kafka.tools.ConsoleProducer",
    "kafka/tools/ConsoleProducer.class": "kafka.tools.ConsoleProducer",
}


@functools.cache
def console_producer() -> tuple[Path, str]:
    """(the jars folder, the console producer's class) from :func:`fetch_jars`.

    Kafka 4's console producer (``org.apache.kafka.tools.ConsoleProducer``) is in the tools
    module (``kafka-tools``), which the broker's dependencies fetched for the default version
    do not include; the 3.9.1 jars the suite also tests with carry ``kafka.tools.ConsoleProducer``
    in ``kafka_2.13``. The first tested version whose jars hold either class is used: the Java
    client of that version (3.9.1 today), which speaks to Kafka 4 and Tansu alike.
    """
    from pipeline.kafka.local import KAFKA_VERSION, TESTED_VERSIONS, fetch_jars

    for version in dict.fromkeys((KAFKA_VERSION, *TESTED_VERSIONS)):
        libs = fetch_jars(version)
        for jar in sorted(libs.glob("*.jar")):
            with zipfile.ZipFile(jar) as archive:
                names = set(archive.namelist())
            for entry, name in CONSOLE_PRODUCER_CLASSES.items():
                if entry in names:
                    return libs, name
    raise AssertionError("no console producer in the jars of any tested Kafka version")


def write_console_producer(bootstrap: str, records: Iterable[Record], broker_kind: str) -> None:
    """One ``java -cp <libs>/* ...ConsoleProducer`` per raw topic and keyedness, lines in order:
    ``parse.key`` and ``key.separator`` for keyed records, neither for unkeyed ones. Against
    Tansu, which rejects InitProducerId, ``enable.idempotence=false`` (the Java client's
    default is true)."""
    libs, main = console_producer()
    java = shutil.which("java")
    assert java, "java is not on PATH (apt-get install openjdk-17-jre-headless)"

    def run(topic: str, keyed: bool, group: list[Record]) -> None:
        command = [
            java,
            "-Xmx256m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-cp",
            f"{libs}/*",
            main,
            "--bootstrap-server",
            bootstrap,
            "--topic",
            topic,
            "--request-required-acks",
            "all",
        ]
        if keyed:
            command += ["--property", "parse.key=true", "--property", f"key.separator={SEPARATOR}"]
        if broker_kind == "tansu":
            command += ["--producer-property", "enable.idempotence=false"]
        done = subprocess.run(command, input=_lines(group), capture_output=True, timeout=180)
        output = (done.stdout + done.stderr).decode(errors="replace")
        assert done.returncode == 0, (
            f"console producer on {topic} exited {done.returncode}:\n{output[-3000:]}"
        )
        assert "Error when sending" not in output, f"console producer on {topic}:\n{output[-3000:]}"

    groups = _by_topic(records)
    with ThreadPoolExecutor(max_workers=4) as pool:  # each JVM takes seconds to start
        for future in [pool.submit(run, topic, keyed, group) for (topic, keyed), group in groups.items()]:
            future.result()


# ---------------------------------------------------------------- kcat


@functools.cache
def bundled_librdkafka() -> Path:
    """A folder whose ``librdkafka.so.1`` is the librdkafka inside the confluent-kafka wheel."""
    import confluent_kafka

    (library,) = (Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs").glob(
        "librdkafka*.so*"
    )
    folder = Path(tempfile.mkdtemp(prefix="librdkafka-"))
    (folder / "librdkafka.so.1").symlink_to(library)
    return folder


def write_kcat(bootstrap: str, records: Iterable[Record], broker_kind: str) -> None:
    """One ``kcat -P`` per raw topic and keyedness: ``-K <tab>`` for keyed records, plain lines
    for unkeyed ones (librdkafka's default partitioner either way).

    Against Tansu, kcat runs on the librdkafka of the confluent-kafka wheel (2.16): Debian 12's
    kcat 1.7.1 comes with librdkafka 2.0.2, which cannot read Tansu's ApiVersions v3 answer
    ("Protocol read buffer underflow for ApiVersion v3", every broker down); the producer,
    its options and the partitioner (``consistent_random``) are the same.
    """
    kcat = shutil.which("kcat")
    assert kcat, "kcat is not on PATH (apt-get install kcat)"
    env = dict(os.environ)
    if broker_kind == "tansu":
        env["LD_LIBRARY_PATH"] = str(bundled_librdkafka())
    for (topic, keyed), group in _by_topic(records).items():
        command = [kcat, "-P", "-b", bootstrap, "-t", topic, "-X", "acks=all"]
        if keyed:
            command += ["-K", SEPARATOR]
        done = subprocess.run(command, input=_lines(group), capture_output=True, timeout=180, env=env)
        output = (done.stdout + done.stderr).decode(errors="replace")
        assert done.returncode == 0, f"kcat on {topic} exited {done.returncode}:\n{output[-3000:]}"
        assert "ERROR" not in output, f"kcat on {topic}:\n{output[-3000:]}"


# ---------------------------------------------------------------- confluent-kafka


class ConfluentWriter:
    """A confluent-kafka ``Producer`` (librdkafka's defaults: not idempotent, partitioner
    ``consistent_random``) kept open; :meth:`write` returns once every record given is
    acknowledged, or raises naming the first failures. A context manager: closed at the end."""

    def __init__(self, bootstrap: str) -> None:
        from confluent_kafka import Producer

        self.producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})
        self.failures: list[str] = []

    def __enter__(self) -> ConfluentWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.producer.flush(10)
        self.producer.close()

    def _delivered(self, error: Any, message: Any) -> None:
        if error is not None:
            self.failures.append(f"{message.topic()}: {error}")

    def write(self, records: Iterable[Record]) -> None:
        for event, key in records:
            while True:
                try:
                    self.producer.produce(
                        f"funnel.raw.{event['type']}",
                        value=orjson.dumps(event),
                        key=None if key is None else key.encode("utf-8"),
                        on_delivery=self._delivered,
                    )
                    break
                except BufferError:  # the local queue is full: let deliveries drain it
                    self.producer.poll(0.1)
            self.producer.poll(0)
        left = self.producer.flush(120)
        assert left == 0, f"confluent-kafka: {left} records not acknowledged within 120 s"
        assert not self.failures, f"confluent-kafka: {len(self.failures)} failed, e.g. {self.failures[:3]}"


def write_confluent(bootstrap: str, records: Iterable[Record], broker_kind: str) -> None:
    """All records through one :class:`ConfluentWriter` (the same settings for either broker)."""
    with ConfluentWriter(bootstrap) as writer:
        writer.write(records)


WRITERS: dict[str, Callable[..., None]] = {
    "console-producer": write_console_producer,
    "kcat": write_kcat,
    "confluent-kafka": write_confluent,
}


def write(client: str, bootstrap: str, records: Iterable[Record], broker_kind: str) -> None:
    """Write ``records`` with ``client`` (one of :data:`CLIENTS`) to the broker at ``bootstrap``
    of kind ``broker_kind`` (``tansu``, ``kafka``: what each client needs to speak to it);
    returns once all are acknowledged."""
    WRITERS[client](bootstrap, list(records), broker_kind)


# ---------------------------------------------------------------- what landed where


@dataclass
class Stored:
    """One record of a raw topic: where it is, and its value parsed."""

    topic: str
    partition: int
    partitions: int  # of its topic
    moved: bool  # written by the dedupe stage: events it moved to their partition
    doc: Any  # an event (a direct producer's) or a list of events (the ingest's, or moved ones)


async def _raw_records(bootstrap: str) -> list[Stored]:
    from helpers import read_raw_topics

    from pipeline.kafka import topics

    moved_header = getattr(topics, "MOVED_HEADER", None)  # none before the stage moved events
    return [
        Stored(
            tp.topic,
            tp.partition,
            count,
            any(name == moved_header for name, _ in record.headers or ()),
            orjson.loads(record.value),
        )
        for tp, count, record in await read_raw_topics(bootstrap)
    ]


def raw_records(bootstrap: str) -> list[Stored]:
    """Every record of the raw topics."""
    return asyncio.run(_raw_records(bootstrap))


def placement(records: Iterable[Stored]) -> dict[tuple[str, str], Counter[str]]:
    """Per (channel, campaign): single-event records on the partition the rule gives
    (``direct, right partition``) and elsewhere (``direct, misplaced``); events in the ingest's
    arrays (``ingest``) and in the arrays the dedupe stage moved (``moved``)."""
    from pipeline.events import routing_key
    from pipeline.kafka.topics import partition_for

    found: dict[tuple[str, str], Counter[str]] = {}
    for record in records:
        if isinstance(record.doc, list):
            for event in record.doc:
                where = "moved" if record.moved else "ingest"
                found.setdefault((event["channel"], event["campaign_id"]), Counter())[where] += 1
            continue
        event = record.doc
        right = partition_for(routing_key(event), record.partitions) == record.partition
        where = "direct, right partition" if right else "direct, misplaced"
        found.setdefault((event["channel"], event["campaign_id"]), Counter())[where] += 1
    return found


def count_stored_copies(records: Iterable[Stored], traffic: Any) -> int:
    """:func:`helpers.count_stored_copies` for raw topics that also hold moved events: check
    that every sent event is stored, and add to the truth's duplicates every copy stored beyond
    what was sent (a client's retry); the dedupe stage's moved copies are not such copies (each
    is the event it moved, applied with the stamp of where it arrived). Returns the copies."""
    sent = Counter((e["channel"], e["campaign_id"], e["event_id"]) for e in traffic.events)
    stored: Counter[tuple[str, str, str]] = Counter()
    for record in records:
        if record.moved:
            continue
        for event in record.doc if isinstance(record.doc, list) else [record.doc]:
            stored[(event["channel"], event["campaign_id"], event["event_id"])] += 1
    missing = {key: n - stored[key] for key, n in sent.items() if stored[key] < n}
    assert not missing, f"{len(missing)} written events not in the raw topics, e.g. {list(missing)[:3]}"
    extra = 0
    for (channel, campaign, event_id), n in stored.items():
        if (channel, campaign) in traffic.campaigns:
            copies = n - sent[(channel, campaign, event_id)]
            traffic.truth.duplicates[(channel, campaign)] += copies
            extra += copies
    return extra


COUNTED = ("impression", "click", "send", "delivery", "bounce", "open", "conversion")


def wait_applied(url: str, want: Mapping[tuple[str, str], int], timeout: float = 120.0) -> None:
    """Until every campaign's events counted plus duplicates dropped reach ``want``: each
    record applied adds one to exactly one of them, right or wrong as the counts may be."""
    from helpers import campaign_doc

    deadline = time.monotonic() + timeout
    while True:
        short = {}
        for (channel, campaign), n in want.items():
            doc = campaign_doc([url], channel, campaign)
            seen = sum(doc["counts"].get(k, 0) for k in COUNTED) + doc["duplicates_dropped"] if doc else 0
            if seen < n:
                short[campaign] = (seen, n)
        if not short:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not every record applied after {timeout} s: (applied, written) {short}")
        time.sleep(0.5)


# ---------------------------------------------------------------- the moves the worker reports

MOVED_METRIC = "pipeline_records_moved_total"  # events moved to their right partition
MOVED_LABEL = "topic"
MOVED_LOG_WORD = "moved"  # logged once per topic the first time a producer's placement is off
LEGACY_MOVE_LOG = "subscriber records moved to collision-free keys"  # another move, not this one


def assert_moves_reported(url: str, log_path: Path, misplaced: int) -> dict[str, float]:
    """After records were written off their partition (``misplaced`` of them, > 0): the worker's
    ``/metrics`` has ``pipeline_records_moved_total`` by ``topic``, summing to more than 0, and
    its log a line saying records were moved. Returns the counter per topic."""
    from helpers import scrape

    moved: dict[str, float] = {}
    for (name, labels), value in scrape(url).items():
        if name == MOVED_METRIC:
            tags = dict(labels)
            assert MOVED_LABEL in tags, f"{MOVED_METRIC} without a {MOVED_LABEL} label: {labels}"
            moved[tags[MOVED_LABEL]] = moved.get(tags[MOVED_LABEL], 0) + value
    assert misplaced > 0, "the records written must include misplaced ones for this check to mean anything"
    assert sum(moved.values()) > 0, f"{MOVED_METRIC} sums to {sum(moved.values())} on {url}/metrics: {moved}"
    lines = [
        line
        for line in log_path.read_text(errors="replace").splitlines()
        if MOVED_LOG_WORD in line.lower() and "funnel.raw." in line and LEGACY_MOVE_LOG not in line
    ]
    assert lines, f"no line with {MOVED_LOG_WORD!r} and a raw topic in the worker's log {log_path}"
    return moved
