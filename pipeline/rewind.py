"""Seek every assigned partition back to its committed offset, even when none is committed yet.

Faust throws away the records a fetch returns while its flow is stopped (during a rebalance or
a table recovery), then seeks back to the committed offsets through aiokafka's
``seek_to_committed``. That call (aiokafka 0.14) has two holes, and each loses the records
just thrown away, for good and silently:

* a partition with no committed offset is not sought at all: its position stays after them;
* it awaits each partition's committed offset in turn, and when the assignment changes
  meanwhile it raises at the first partition no longer assigned: the rest are not sought.

:func:`install` (called by ``create_pipeline``, like the fetch-wait fix) makes Faust use
:func:`seek_to_committed`, which seeks every partition that is still assigned, to its committed
offset or, with none, to the beginning (nothing there was committed, so reading it again is
at worst a replay, which the dedupe stage recomputes exactly), and skips one that moved away
(its new owner starts from the committed offset).
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError


async def seek_to_committed(consumer: AIOKafkaConsumer) -> dict[TopicPartition, int | None]:
    committed_offsets: dict[TopicPartition, int | None] = {}
    for tp in sorted(consumer.assignment()):
        committed = await consumer.committed(tp)
        try:
            if committed:
                consumer.seek(tp, committed)
            else:
                await consumer.seek_to_beginning(tp)
        except IllegalStateError:
            continue  # no longer ours
        committed_offsets[tp] = committed
    return committed_offsets


async def _seek_to_committed(self: Any) -> dict[TopicPartition, int | None]:
    return await self.call_thread(seek_to_committed, self._ensure_consumer())


def install() -> None:
    """Make Faust's aiokafka consumer thread seek back with :func:`seek_to_committed`."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    AIOKafkaConsumerThread.seek_to_committed = _seek_to_committed  # type: ignore[method-assign]
