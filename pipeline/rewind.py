"""Faust's consumer never skips a record of a stream topic: two fixes of its seeking.

1. Seek every assigned partition back to its committed offset, even when none is committed yet.

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

2. Never let a record be skipped inside a generation. Faust also drops fetched records without
seeking back: the rest of a fetch when a rebalance starts in the middle of handing it out, a
record whose hand-over a flow stop interrupts (its read offset still moves on). When the next
fetch then starts after them, Faust takes the jump for a gap in the log (as compaction or
transaction markers leave) and counts the missing offsets as done: they are committed and never
processed. Against Apache Kafka, where a worker killed and restarted meets a rebalance when its
old membership expires, this lost a whole batch of acknowledged events now and then.
:class:`HoleGuard` checks every record of a stream topic before Faust sees it: one that comes
after a hole makes the consumer seek back to the hole instead. Only a record that the broker
returns first after that seek may leave a gap: then there is nothing in between to read.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError

log = logging.getLogger(__name__)


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


class HoleGuard:
    """Decides, record by record, whether a stream partition jumped over records.

    ``read`` is Faust's read offset of the partition: the last offset handed out, or after a
    seek the offset sought to. A record beyond ``read + 1`` follows a hole, unless it is the
    first record the broker returned after the guard sought back to exactly there.
    """

    def __init__(self) -> None:
        self.sought: dict[Any, int] = {}  # partition -> offset the guard sought back to

    def hole_at(self, tp: Any, offset: int, read: int | None) -> int | None:
        """The offset to seek back to, or None when the record may be handed out."""
        target = self.sought.pop(tp, None)
        if target is not None and offset >= target:
            return None  # the first record after our seek: what it leaves out does not exist
        if read is not None and offset > read + 1:
            self.sought[tp] = read + 1
            return read + 1
        return None


def guarded_getmany(original: Any) -> Any:
    """Wrap ``Consumer.getmany`` so that records after a hole are not handed to Faust."""

    async def getmany(self: Any, timeout: float) -> AsyncIterator[tuple[Any, Any]]:
        guard: HoleGuard = self.__dict__.setdefault("_pipeline_hole_guard", HoleGuard())
        seeking: set[Any] = set()  # partitions whose rest of this fetch is left for the re-read
        async for tp, message in original(self, timeout):
            if tp in seeking:
                continue
            if not self._is_changelog_tp(tp):  # changelogs are compacted: gaps are normal there
                target = guard.hole_at(tp, message.offset, self._read_offset.get(tp))
                if target is not None:
                    seeking.add(tp)
                    log.warning(
                        "%s: record %d follows a hole after %d: reading again from %d",
                        tp,
                        message.offset,
                        target - 1,
                        target,
                    )
                    try:
                        await self.seek(tp, target)
                    except IllegalStateError:  # no longer ours: its new owner starts from the commit
                        guard.sought.pop(tp, None)
                    continue
            yield tp, message

    getmany._pipeline_patched = True  # type: ignore[attr-defined]
    return getmany


def install() -> None:
    """Make Faust's consumer seek back with :func:`seek_to_committed` and read through
    :class:`HoleGuard`."""
    from faust.transport.consumer import Consumer
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    AIOKafkaConsumerThread.seek_to_committed = _seek_to_committed  # type: ignore[method-assign]
    if not getattr(Consumer.getmany, "_pipeline_patched", False):
        Consumer.getmany = guarded_getmany(Consumer.getmany)  # type: ignore[method-assign]
