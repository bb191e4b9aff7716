"""Fault suite for direct producers: records written straight into the raw topics by a Kafka
client that does not partition by subscriber (no key, or an explicit wrong partition).

The dedupe stage moves such a record to its subscriber's partition (the same raw topic, a
header naming its origin) before deciding anything about it, and commits the origin's offset
only once the move is acknowledged; a move repeated after a crash is recognised by its origin
and not counted twice, while a redelivery (another record) is a duplicate. Every test compares
exact final counts with the generated ground truth and records sent / acknowledged / counted
/ lost / doubled figures (printed, and appended to $PIPELINE_FAULT_REPORT when set), plus what
was moved: records that arrived misplaced, and the moved copies the raw topics hold.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from conftest import WorkerProcess
from direct_producers import assert_moves_reported
from helpers import (
    assert_exact,
    campaign_doc,
    late_ids,
    metric_sum,
    nonzero,
    read_raw_topics,
    report,
    scrape,
    wait_for_counts,
)

from pipeline.events import routing_key
from pipeline.kafka.topics import MOVED_HEADER, RAW_TOPICS, TOPIC_CODES, header, partition_for, raw_topic
from pipeline.rules.dedupe import moved_stamp_of
from pipeline.simulation.traffic import Traffic, generate
from pipeline.simulation.truth import from_stream

Key = tuple[str, str, str]  # (channel, campaign, event id)


# Lateness is judged per path into a partition (the records read there, and those moved there
# from each other partition), in that path's order, and a path carries the stream in sending
# order: an event trails what came before it on its path by at most the generator's jitter
# (2 minutes) or, for a redelivery applied before its original (the copy landed on its
# partition, the original was moved), by the 400 positions it was sent after it (up to ~7
# minutes of event time here). Beyond the default 5 minutes, within an hour: no event of the
# stories is late whatever the two paths' interleaving, and the simulator's late events (3 h
# old) still are (every path they take carries earlier stories of their campaign and type).
ALLOWED_LATENESS = {"PIPELINE_ALLOWED_LATENESS": "1h"}


def order_independent(traffic: Traffic) -> Traffic:
    """The traffic with every conversion of a repeated order at the time of the order's first
    conversion, and its truth recomputed in sending order.

    Moving records changes the order in which events of one subscriber are applied: two
    records sent to different partitions are moved in whatever order their partitions are read.
    Which of two conversions of one order counts (the other is a duplicate) follows that order,
    and the simulator gives the second one a later time, so its window could differ from the
    truth's. Nothing else the truth says depends on that order: the distinct counts are sets,
    a redelivery is the same event, and no story's event can be late (:data:`ALLOWED_LATENESS`).
    """
    first: dict[tuple[str, str, str], float] = {}
    events = []
    for event in traffic.events:
        order = event.get("order_id")
        if order:
            at = first.setdefault((event["channel"], event["campaign_id"], order), event["timestamp"])
            event = {**event, "timestamp": at}
        events.append(event)
    truth = from_stream(events, traffic.truth.windows, late_ids(traffic))
    return Traffic(events, truth, traffic.campaigns)


def right_partition(event: dict[str, Any], partitions: int) -> int:
    return partition_for(routing_key(event), partitions)


class DirectProducer(threading.Thread):
    """Writes every event as its own record straight into its raw topic (aiokafka, acks=all):
    half with no key (the client's partitioner picks any partition), half keyed by campaign
    with an explicit partition that is never the subscriber's. At about ``rate`` events a
    second (an attribute: the test may change it), ``group`` records awaited at a time.

    With ``stops=n`` the events are cut into n + 1 equal parts and the producer waits after
    each of the first n (:meth:`wait_stop`, :meth:`resume`), as :class:`helpers.Sender` does.
    """

    def __init__(
        self,
        bootstrap: str,
        events: list[dict[str, Any]],
        seed: int,
        rate: float = 500.0,
        group: int = 100,
        stops: int = 0,
    ) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.events, self.rate, self.group = bootstrap, events, rate, group
        self.rng = random.Random(seed)
        self.acknowledged = 0
        self.error: BaseException | None = None
        self.reached = [threading.Event() for _ in range(stops)]
        self.resumed = [threading.Event() for _ in range(stops)]
        self.size = -(-len(events) // (stops + 1))
        self.streaming = False  # in the middle of a part

    def run(self) -> None:
        try:
            asyncio.run(self._produce())
        except BaseException as exc:
            self.error = exc
            for event in self.reached:
                event.set()

    def _partitioner(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        # aiokafka's default for a record without a key (a random partition), seeded
        return self.rng.choice(all_partitions)

    async def _produce(self) -> None:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            enable_idempotence=False,  # Tansu has no InitProducerId; copies are counted below
            partitioner=self._partitioner,
            request_timeout_ms=30_000,
        )
        await producer.start()
        try:
            counts = {topic: len(await producer.partitions_for(topic)) for topic in RAW_TOPICS}
            for part in range(len(self.reached) + 1):
                self.streaming = True
                events = self.events[part * self.size : (part + 1) * self.size]
                for i in range(0, len(events), self.group):
                    started = time.monotonic()
                    futures = []
                    for event in events[i : i + self.group]:
                        topic = raw_topic(event["type"])
                        count = counts[topic]
                        value = orjson.dumps(event)
                        if self.rng.random() < 0.5:
                            futures.append(await producer.send(topic, value))
                        else:
                            right = right_partition(event, count)
                            wrong = self.rng.choice([p for p in range(count) if p != right])
                            key = event["campaign_id"].encode()
                            futures.append(await producer.send(topic, value, key=key, partition=wrong))
                    self.acknowledged += len(await asyncio.gather(*futures))
                    ahead = started + len(futures) / self.rate - time.monotonic()
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                self.streaming = False
                if part < len(self.reached):
                    self.reached[part].set()
                    await asyncio.to_thread(self.resumed[part].wait)
        finally:
            await producer.stop()

    def wait_stop(self, index: int, timeout: float = 300.0) -> None:
        assert self.reached[index].wait(timeout), f"part {index} not acknowledged within {timeout} s"
        assert self.error is None, self.error

    def resume(self, index: int) -> None:
        self.resumed[index].set()


@dataclass
class RawLog:
    """What the raw topics hold: the producer's records, and the arrays the dedupe stage moved
    (the :data:`~pipeline.kafka.topics.MOVED_HEADER` holds the stamp of where each event arrived)."""

    originals: Counter[Key] = field(default_factory=Counter)
    # stamp a misplaced original gets when it is moved -> the event id it carries
    misplaced: dict[int, str] = field(default_factory=dict)
    moved: Counter[int] = field(default_factory=Counter)  # stamp of origin -> copies moved
    wrong: list[str] = field(default_factory=list)  # moved copies that are not what they should be
    records: int = 0
    moved_records: int = 0


async def read_raw_log(bootstrap: str) -> RawLog:
    raw = RawLog()
    moved_ids: list[tuple[int, str, str, int]] = []  # (stamp, event id, topic, partition)
    for tp, count, record in await read_raw_topics(bootstrap):
        raw.records += 1
        doc = orjson.loads(record.value)
        stamps = header(record.headers, MOVED_HEADER)
        if stamps is None:  # the producer's: one event
            key = (doc["channel"], doc["campaign_id"], doc["event_id"])
            raw.originals[key] += 1
            if right_partition(doc, count) != tp.partition:
                stamp = moved_stamp_of(TOPIC_CODES[tp.topic], tp.partition, record.offset, 0)
                raw.misplaced[stamp] = doc["event_id"]
            continue
        raw.moved_records += 1
        stamps = orjson.loads(stamps)
        if len(stamps) != len(doc):
            raw.wrong.append(f"{tp.topic}[{tp.partition}]@{record.offset}: {len(doc)} events")
            continue
        for event, stamp in zip(doc, stamps, strict=True):
            raw.moved[stamp] += 1
            moved_ids.append((stamp, event["event_id"], tp.topic, tp.partition))
            if right_partition(event, count) != tp.partition:
                raw.wrong.append(f"{event['event_id']} moved to {tp.topic}[{tp.partition}]")
    for stamp, event_id, topic, partition in moved_ids:
        if raw.misplaced.get(stamp) != event_id:  # None included: a move must name its origin
            raw.wrong.append(f"{event_id} on {topic}[{partition}] moved with stamp {stamp} of no such origin")
    return raw


def originals_stored(bootstrap: str, traffic: Traffic) -> tuple[RawLog, int]:
    """Every acknowledged record is in the raw topics; a record the producer stored twice
    (a retried request) is a redelivery, added to the truth's duplicates. Returns the log and
    the number of such copies."""
    raw = asyncio.run(read_raw_log(bootstrap))
    sent = Counter((e["channel"], e["campaign_id"], e["event_id"]) for e in traffic.events)
    missing = {key: n - raw.originals[key] for key, n in sent.items() if raw.originals[key] < n}
    assert not missing, f"{len(missing)} acknowledged events not in the raw topics, e.g. {list(missing)[:3]}"
    extra = 0
    for (channel, campaign, event_id), n in raw.originals.items():
        copies = n - sent[(channel, campaign, event_id)]
        traffic.truth.duplicates[(channel, campaign)] += copies
        extra += copies
    return raw, extra


def moves_checked(bootstrap: str) -> RawLog:
    """Every misplaced record was moved, whole, to its subscriber's partition, with the stamp of
    where it arrived (a copy moved again after a crash carries the same stamp); nothing else
    was moved."""
    raw = asyncio.run(read_raw_log(bootstrap))
    assert not raw.wrong, f"{len(raw.wrong)} moved copies wrong, e.g. {raw.wrong[:5]}"
    unmoved = [event_id for stamp, event_id in raw.misplaced.items() if not raw.moved[stamp]]
    assert not unmoved, f"{len(unmoved)} misplaced records never moved, e.g. {unmoved[:5]}"
    return raw


def counts_or_figures(urls: list[str], traffic: Traffic, name: str, acknowledged: int, timeout: float):
    """:func:`helpers.wait_for_counts`; if the counts do not converge, the figures of what the
    workers show (lost / doubled) are reported before the failure is raised."""
    try:
        return wait_for_counts(urls, traffic, timeout=timeout)
    except AssertionError:
        docs, diffs = {}, []
        for channel, campaign in traffic.campaigns:
            doc = campaign_doc(urls, channel, campaign) or {"counts": {}, "duplicates_dropped": 0}
            docs[f"{channel}/{campaign}"] = doc
            want = traffic.truth.expected(channel, campaign)
            got = nonzero(doc["counts"])
            diff = {k: got.get(k, 0) - want["counts"].get(k, 0) for k in set(got) | set(want["counts"])}
            diffs.append(
                (
                    f"{channel}/{campaign}",
                    {k: v for k, v in sorted(diff.items()) if v},
                    f"duplicates {doc.get('duplicates_dropped')} want {want['duplicates']}",
                    f"late {doc.get('late_events')} want {want['late']}",
                )
            )
        report(f"{name} [FAILED]", traffic, acknowledged, docs)
        print("counted minus truth, per campaign:", *diffs, sep="\n  ")
        raise


def duplicates_are_the_redeliveries(urls: list[str], traffic: Traffic, stored_twice: int) -> dict[str, int]:
    """``pipeline_duplicates_dropped_total`` (summed over workers and channels) is exactly the
    redeliveries sent, plus repeated orders and copies the producer stored twice: a record
    moved again after a crash is not among them."""
    ids = Counter(e["event_id"] for e in traffic.events)
    redeliveries = sum(n - 1 for n in ids.values())
    dropped = sum(traffic.truth.duplicates.values())
    repeated_orders = dropped - redeliveries - stored_twice
    assert repeated_orders >= 0
    metric = sum(metric_sum(url, "pipeline_duplicates_dropped_total") for url in urls)
    assert metric == dropped, (metric, dropped, redeliveries, repeated_orders, stored_twice)
    return {
        "redeliveries": redeliveries,
        "repeated_orders": repeated_orders,
        "duplicates_dropped": int(metric),
    }


def report_moves(name: str, producer: DirectProducer, raw: RawLog, extra: dict[str, Any]) -> None:
    """What was moved, beside :func:`helpers.report`'s figures (same output, same file)."""
    figures = {
        "fault": name,
        "records_written_directly": producer.acknowledged,
        "misplaced": len(raw.misplaced),
        "moved_messages": raw.moved_records,
        "moved_events": sum(raw.moved.values()),
        "moved_again": sum(raw.moved.values()) - len(raw.moved),  # copies of a move repeated after a crash
        **extra,
    }
    print(json.dumps(figures))
    if os.environ.get("PIPELINE_FAULT_REPORT"):
        with open(os.environ["PIPELINE_FAULT_REPORT"], "a") as out:
            out.write(json.dumps(figures) + "\n")


@pytest.mark.brokers("tansu", "kafka")
def test_sigkill_while_misplaced_records_are_moved(broker, broker_kind, tmp_path, workers):
    """A direct producer streams every event to a partition chosen without its subscriber
    (10 % redeliveries, each copy placed on its own), in 5 parts. Each time the worker is
    consuming again, the next part starts, and a random 0.5-3 s later the worker is SIGKILLed
    (4 times): the kill lands while records stream in and are being moved, with a backlog
    from the restart; the worker restarts on the same data directory each time."""
    name = f"worker SIGKILL x4 while misplaced records are moved ({broker_kind})"
    rng = random.Random(71)
    traffic = order_independent(generate(seed=71, subscribers=6000))
    worker = WorkerProcess(broker.address, tmp_path, env=dict(ALLOWED_LATENESS)).start()
    workers.append(worker)
    kills = 4
    producer = DirectProducer(broker.address, traffic.events, seed=71, rate=500, stops=kills)
    producer.start()
    streaming = []
    for kill in range(kills):
        worker.wait_healthy()
        if kill:
            producer.wait_stop(kill - 1)
            producer.resume(kill - 1)
        time.sleep(rng.uniform(0.5, 3.0))
        streaming.append(producer.streaming)
        worker.kill()  # mid-batch, mid-move, mid-commit: wherever it is
        time.sleep(rng.uniform(0.0, 1.0))
        worker.start(wait=False)
    producer.wait_stop(kills - 1)
    producer.resume(kills - 1)
    producer.join(300)
    assert producer.error is None and not producer.is_alive(), producer.error
    assert producer.acknowledged == len(traffic.events)
    assert all(streaming), f"the producer was not streaming at every kill: {streaming}"
    raw, stored_twice = originals_stored(broker.address, traffic)
    assert len(raw.misplaced) > len(traffic.events) // 2
    worker.wait_healthy()
    docs = counts_or_figures([worker.url], traffic, name, producer.acknowledged, timeout=240)
    assert_exact(docs, traffic)
    duplicates = duplicates_are_the_redeliveries([worker.url], traffic, stored_twice)
    raw = moves_checked(broker.address)
    assert_moves_reported(worker.url, worker.log_path, len(raw.misplaced))  # its last run's
    report(name, traffic, producer.acknowledged, docs, stored_twice)
    report_moves(name, producer, raw, duplicates)


def _partial(traffic: Traffic, upto: int) -> Traffic:
    """The traffic's first ``upto`` events with their own truth."""
    events = traffic.events[:upto]
    return Traffic(events, from_stream(events, traffic.truth.windows, late_ids(traffic)), traffic.campaigns)


@pytest.mark.brokers("tansu", "kafka")
def test_rebalance_while_misplaced_records_are_moved(broker, broker_kind, tmp_path, workers):
    """A second worker joins while misplaced records stream in (records one worker reads are
    moved to partitions the other owns), both own campaigns once the second third is in, then
    it leaves (SIGTERM) while the last third streams; the remaining worker counts exactly."""
    name = f"second worker joins then leaves while misplaced records are moved ({broker_kind})"
    traffic = order_independent(generate(seed=73, subscribers=3000, email_campaigns=4, ads_campaigns=3))
    first = WorkerProcess(broker.address, tmp_path, env=dict(ALLOWED_LATENESS)).start()
    workers.append(first)
    producer = DirectProducer(broker.address, traffic.events, seed=73, rate=400, stops=2)
    producer.start()
    producer.wait_stop(0)
    second = WorkerProcess(broker.address, tmp_path, env=dict(ALLOWED_LATENESS)).start(wait=False)
    workers.append(second)
    producer.rate = 100  # the second third streams slowly until the second worker is in
    producer.resume(0)
    second.wait_healthy()
    time.sleep(2)  # the first worker has handed partitions over: both consume
    joined_while_streaming = producer.streaming
    producer.rate = 400
    producer.wait_stop(1)
    assert joined_while_streaming, "the second worker joined after the second third was in"
    urls = [first.url, second.url]
    prefix = _partial(traffic, 2 * producer.size)
    counts_or_figures(urls, prefix, f"{name}, two thirds", 2 * producer.size, timeout=180)
    owners = {}
    for url in urls:
        owners[url] = {
            dict(labels)["campaign"] for (metric, labels) in scrape(url) if metric == "funnel_events_total"
        }
    assert owners[first.url] and owners[second.url], owners
    assert not owners[first.url] & owners[second.url], owners
    assert owners[first.url] | owners[second.url] == {c for _, c in traffic.campaigns}
    producer.resume(1)
    time.sleep(random.Random(73).uniform(1.0, 3.0))
    assert producer.streaming, "the stream ended before the second worker left"
    second.stop()  # leaves while the last third streams; its partitions move back
    producer.join(300)
    assert producer.error is None and not producer.is_alive(), producer.error
    assert producer.acknowledged == len(traffic.events)
    raw, stored_twice = originals_stored(broker.address, traffic)
    docs = counts_or_figures([first.url], traffic, name, producer.acknowledged, timeout=180)
    assert_exact(docs, traffic)
    for channel, campaign in traffic.campaigns:
        assert campaign_doc([first.url], channel, campaign) is not None
    duplicates = duplicates_are_the_redeliveries([first.url], traffic, stored_twice)
    raw = moves_checked(broker.address)
    assert_moves_reported(first.url, first.log_path, len(raw.misplaced))
    report(name, traffic, producer.acknowledged, docs, stored_twice)
    report_moves(name, producer, raw, duplicates)
