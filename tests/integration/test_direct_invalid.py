"""A direct producer's invalid records: dead-lettered with their reason and where they were, counted
in ``pipeline_dead_lettered_total``, while the valid records around them (misplaced ones included)
are counted, exactly as if they had come through ``POST /events``."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import orjson
from aiokafka import AIOKafkaProducer
from helpers import metric_sum, wait_for_counts
from test_ingest_http import read_dead_letters

from pipeline.events import routing_key
from pipeline.kafka.topics import partition_for, raw_topic
from pipeline.simulation.traffic import Traffic
from pipeline.simulation.truth import from_stream


def click(i: int, **extra) -> dict:
    return {
        "event_id": f"d{i}",
        "type": "click",
        "channel": "ads",
        "campaign_id": "direct-invalid",
        "subscriber_id": f"s{i % 7}",
        "timestamp": time.time() - 600 + i,
        **extra,
    }


async def produce(bootstrap: str, records: list[tuple[int, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for partition, value in records:
            await producer.send_and_wait(raw_topic("click"), value, partition=partition)
    finally:
        await producer.stop()


def test_invalid_direct_records_are_dead_lettered_and_the_valid_ones_counted(worker, broker):
    valid = [click(i) for i in range(40)]
    records: list[tuple[int, bytes]] = []
    for i, event in enumerate(valid):
        right = partition_for(routing_key(event), 4)
        records.append((right if i % 2 else (right + 1) % 4, orjson.dumps(event)))  # half misplaced
        if i == 10:
            records.append((0, b"{not json"))
        if i == 20:
            records.append((1, orjson.dumps({k: v for k, v in click(900).items() if k != "campaign_id"})))
        if i == 30:
            records.append((2, orjson.dumps(click(901, timestamp=time.time() + 86_400))))
            records.append((3, b'"just a string"'))
    asyncio.run(produce(broker.address, records))

    events = [*valid, valid[5]]  # one more: a redelivery of a valid event, misplaced
    right = partition_for(routing_key(valid[5]), 4)
    asyncio.run(produce(broker.address, [((right + 2) % 4, orjson.dumps(valid[5]))]))
    traffic = Traffic(events, from_stream(events, (300, 3600)), [("ads", "direct-invalid")])
    docs = wait_for_counts([worker.admin_url], traffic)
    assert docs["ads/direct-invalid"]["counts"]["click"] == 40

    letters = read_dead_letters(broker.address, 4)
    reasons = Counter(letter["reason"] for letter in letters)
    assert reasons == Counter(
        {"malformed_message": 1, "missing_field:campaign_id": 1, "timestamp_in_future": 1, "not_an_object": 1}
    )
    for letter in letters:
        assert letter["where"]["topic"] == raw_topic("click") and "offset" in letter["where"]
    deadline = time.monotonic() + 20
    while metric_sum(worker.admin_url, "pipeline_dead_lettered_total") < 4 and time.monotonic() < deadline:
        time.sleep(0.5)
    for reason, count in reasons.items():
        assert metric_sum(worker.admin_url, "pipeline_dead_lettered_total", reason=reason) == count
    assert metric_sum(worker.admin_url, "pipeline_records_moved_total", topic=raw_topic("click")) == 21
