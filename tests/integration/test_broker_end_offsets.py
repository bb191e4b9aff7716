"""The real end of a partition on the embedded broker, whose ListOffsets answer is short."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaProducer
from faust.types import TP

from pipeline.bench.common import create_topics
from pipeline.kafka.tansu import EmbeddedBroker, EndOffsetsError, true_end_offsets


async def _write_batches(address: str, topic: str, sizes: list[int]) -> None:
    await create_topics(address, [topic], partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=address, enable_idempotence=False)
    await producer.start()
    try:
        for size in sizes:  # one record batch each, as the changelog writer sends them
            batch = producer.create_batch()
            for n in range(size):
                assert batch.append(key=b"k%d" % n, value=b"v", timestamp=None) is not None
            await (await producer.send_batch(batch, topic, partition=0))
    finally:
        await producer.stop()


def test_end_of_a_multi_record_batch_is_read_from_the_log(broker: EmbeddedBroker) -> None:
    asyncio.run(_write_batches(broker.address, "ends", [5, 7]))
    tp = TP("ends", 0)
    # what Tansu reports (first offset of the last batch + 1) and what Kafka would (12)
    for reported in (6, 12):
        assert asyncio.run(true_end_offsets(broker.address, {tp: reported})) == {tp: 12}
    assert asyncio.run(true_end_offsets(broker.address, {tp: 0})) == {tp: 0}  # empty: nothing to read


def test_a_partition_that_does_not_answer_stops_recovery_loudly(broker: EmbeddedBroker) -> None:
    asyncio.run(_write_batches(broker.address, "ends", [3]))
    with pytest.raises(EndOffsetsError):
        # offset 50 does not exist: no record ever comes back for it
        asyncio.run(true_end_offsets(broker.address, {TP("ends", 0): 51}, timeout=2.0))
