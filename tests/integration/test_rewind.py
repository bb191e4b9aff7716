"""Seeking back to committed offsets, on the embedded broker (what Faust does after throwing
away records fetched while its flow was stopped)."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from pipeline.bench.common import create_topics
from pipeline.kafka.compat import seek_to_committed
from pipeline.kafka.tansu import EmbeddedBroker


async def _scenario(address: str) -> tuple[dict, dict, dict]:
    await create_topics(address, ["rewind"], partitions=2)
    producer = AIOKafkaProducer(bootstrap_servers=address, enable_idempotence=False)
    await producer.start()
    try:
        for partition in (0, 1):
            for n in range(5):
                await producer.send_and_wait("rewind", b"%d" % n, partition=partition)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        "rewind",
        bootstrap_servers=address,
        group_id="rewind-test",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        p0, p1 = TopicPartition("rewind", 0), TopicPartition("rewind", 1)
        read: dict[TopicPartition, int] = {}
        while sum(read.values()) < 10:  # read everything: positions at the end
            for tp, records in (await consumer.getmany(timeout_ms=1000)).items():
                read[tp] = read.get(tp, 0) + len(records)
        await consumer.commit({p0: 3})  # partition 1: nothing committed
        committed, starts = await seek_to_committed(consumer)
        positions = {tp: await consumer.position(tp) for tp in (p0, p1)}
        return committed, positions, starts
    finally:
        await consumer.stop()


def test_every_partition_goes_back_even_without_a_committed_offset(broker: EmbeddedBroker) -> None:
    committed, positions, starts = asyncio.run(_scenario(broker.address))
    p0, p1 = TopicPartition("rewind", 0), TopicPartition("rewind", 1)
    assert committed == {p0: 3, p1: None}
    # aiokafka's own seek_to_committed leaves partition 1 at 5: its 5 records would be lost
    assert positions == {p0: 3, p1: 0}
    # what the dedupe stage's account of offsets starts from: the commit, else the log's start
    assert starts == {p0: 3, p1: 0}
