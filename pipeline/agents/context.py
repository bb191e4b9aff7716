"""Run table reads and writes on behalf of one partition, and in bulk.

Faust routes a table access to the store and changelog partition of the *current event*.
A batch taken from a stream mixes partitions, so each partition's group of events is handled
inside :func:`on_partition_of`, which makes one of its events current.

:class:`BulkTable` reads and writes many keys of one partition at once: with the RocksDB store
(rocksdict) it reads with one multi-get, writes with one ``WriteBatch`` and sends the changelog
as whole record batches (one Kafka message per key, exactly what ``table[key] = value`` would
send, so Faust's recovery and log compaction work unchanged), then records the changelog
offset as Faust does. Faust's per-key path (a future, a buffer entry and a producer call per
key) costs more than the rest of the work on an event; this is the same effect for less.
Other stores fall back to the per-key table API.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from faust.streams import _current_event
from faust.types import TP, EventT


@contextmanager
def on_partition_of(event: EventT) -> Iterator[None]:
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


def group_by_partition(events: list[EventT]) -> dict[int, list[EventT]]:
    """Events per partition, each group in the order the stream delivered it."""
    groups: dict[int, list[EventT]] = {}
    for event in events:
        groups.setdefault(event.message.partition, []).append(event)
    return groups


class BulkTable:
    """Many keys of one table partition per call; bytes keys and values."""

    def __init__(self, table: Any) -> None:
        self.table = table

    def _rocks(self) -> Any | None:
        store = self.table.data
        if getattr(store, "use_rocksdict", False) and hasattr(store, "_db_for_partition"):
            return store
        return None

    def get_many(self, partition: int, keys: Sequence[bytes], event: EventT) -> list[bytes | None]:
        if not keys:
            return []
        store = self._rocks()
        if store is not None:
            return store._db_for_partition(partition).get(list(keys))
        with on_partition_of(event):
            return [self.table.get(key) for key in keys]

    async def put_many(
        self, partition: int, items: dict[bytes, bytes], event: EventT
    ) -> list[asyncio.Future]:
        """Write locally, then queue the changelog; return futures that resolve when it is acked."""
        if not items:
            return []
        store = self._rocks()
        if store is None:
            with on_partition_of(event):
                for key, value in items.items():
                    self.table[key] = value
            return []
        from rocksdict import WriteBatch

        batch = WriteBatch(raw_mode=True)
        for key, value in items.items():
            batch.put(key, value)
        store._db_for_partition(partition).write(batch)
        return await self._send_changelog(store, partition, items)

    async def _send_changelog(self, store: Any, partition: int, items: dict[bytes, bytes]) -> list:
        app = self.table.app
        producer = app.producer._ensure_producer()  # the app's own aiokafka producer
        topic = self.table.changelog_topic.get_topic_name()
        tp = TP(topic, partition)
        futures: list[asyncio.Future] = []

        async def flush(builder: Any) -> None:
            sent = await producer.send_batch(builder, topic, partition=partition)
            future = sent if isinstance(sent, asyncio.Future) else sent.future

            def persisted(fut: asyncio.Future) -> None:
                if not fut.cancelled() and fut.exception() is None:
                    # the batch's first offset: recovery may re-apply the rest, which is harmless
                    store.set_persisted_offset(tp, fut.result().offset)

            future.add_done_callback(persisted)
            futures.append(future)

        builder = producer.create_batch()
        for key, value in items.items():
            if builder.append(key=key, value=value, timestamp=None) is None:
                await flush(builder)
                builder = producer.create_batch()
                if builder.append(key=key, value=value, timestamp=None) is None:
                    raise ValueError(f"changelog entry of {len(value)} bytes does not fit a batch")
        if builder.record_count():
            await flush(builder)
        return futures
