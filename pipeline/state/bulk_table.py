"""Run table reads and writes on behalf of one partition, and in bulk.

Faust routes a table access to the store and changelog partition of the *current event*.
A batch taken from a stream mixes partitions, so each partition's group of events is handled
inside :func:`~pipeline.kafka.compat.on_partition_of`, which makes one of its events current.

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
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Executor
from itertools import chain
from typing import Any

from faust.types import TP, EventT

from pipeline.kafka.compat import app_producer, on_partition_of, partition_db


def group_by_partition(events: list[EventT]) -> dict[int, list[EventT]]:
    """Events per partition, each group in the order the stream delivered it."""
    groups: dict[int, list[EventT]] = {}
    for event in events:
        groups.setdefault(event.message.partition, []).append(event)
    return groups


def _write_batch(items: dict[bytes, bytes], deletes: Sequence[bytes] = ()) -> Any:
    from rocksdict import WriteBatch

    batch = WriteBatch(raw_mode=True)
    for key in deletes:
        batch.delete(key)
    for key, value in items.items():
        batch.put(key, value)
    return batch


def _any_key_from(db: Any, start: bytes) -> bool:
    it = db.iter()
    it.seek(start)
    return it.valid()


class BulkTable:
    """Many keys of one table partition per call; bytes keys and values.

    With an ``io`` executor (a single thread, so operations run in the order submitted),
    :meth:`read_later` and :meth:`write_later` run RocksDB's multi-get and batch write there:
    rocksdict releases the GIL inside RocksDB, so the event loop's thread goes on with Python
    work meanwhile.
    """

    def __init__(self, table: Any, io: Executor | None = None) -> None:
        self.table = table
        self.io = io

    def _db(self, partition: int) -> Any | None:
        """The partition's rocksdict database, or None when the table has another store."""
        return partition_db(self.table, partition)

    def get_many(self, partition: int, keys: Sequence[bytes], event: EventT) -> list[bytes | None]:
        if not keys:
            return []
        db = self._db(partition)
        if db is not None:
            return db.get(list(keys))
        with on_partition_of(event):
            return [self.table.get(key) for key in keys]

    def read_later(self, partition: int, keys: Sequence[bytes], event: EventT) -> asyncio.Future:
        """:meth:`get_many` on the I/O thread, after every operation submitted before it."""
        db = self._db(partition)
        loop = asyncio.get_running_loop()
        if db is None or self.io is None or not keys:
            done = loop.create_future()
            done.set_result(self.get_many(partition, keys, event))
            return done
        return loop.run_in_executor(self.io, db.get, list(keys))

    def any_key_from_later(self, partition: int, start: bytes, event: EventT) -> asyncio.Future:
        """Whether the partition holds any key at or after ``start`` (bytewise), on the I/O
        thread after every operation submitted before it: one seek with RocksDB."""
        db = self._db(partition)
        loop = asyncio.get_running_loop()
        if db is None or self.io is None:
            done = loop.create_future()
            if db is not None:
                done.set_result(_any_key_from(db, start))
            else:
                with on_partition_of(event):
                    done.set_result(any(key >= start for key in self.table.keys()))
            return done
        return loop.run_in_executor(self.io, _any_key_from, db, start)

    async def write_later(
        self, partition: int, items: dict[bytes, bytes], event: EventT, deletes: Sequence[bytes] = ()
    ) -> list[asyncio.Future]:
        """:meth:`put_many` with the local write on the I/O thread.

        Reads submitted later see the write. The returned futures (the local write's and the
        changelog's) resolve when it is stored and acknowledged; the changelog offset is
        recorded as persisted only once the local write is done, so a recovery never skips
        entries the local store lacks.
        """
        db = self._db(partition)
        if db is None or self.io is None or not (items or deletes):
            return await self.put_many(partition, items, event, deletes)
        loop = asyncio.get_running_loop()
        local = loop.run_in_executor(self.io, db.write, _write_batch(items, deletes))
        return [local, *await self._send_changelog(partition, items, deletes, local)]

    async def put_many(
        self, partition: int, items: dict[bytes, bytes], event: EventT, deletes: Sequence[bytes] = ()
    ) -> list[asyncio.Future]:
        """Write (and delete ``deletes``) locally, then queue the changelog; return futures that
        resolve when it is acked."""
        if not (items or deletes):
            return []
        db = self._db(partition)
        if db is None:
            with on_partition_of(event):
                for key in deletes:
                    self.table.pop(key, None)
                for key, value in items.items():
                    self.table[key] = value
            return []
        db.write(_write_batch(items, deletes))
        return await self._send_changelog(partition, items, deletes)

    async def _send_changelog(
        self,
        partition: int,
        items: dict[bytes, bytes],
        deletes: Sequence[bytes] = (),
        local: asyncio.Future | None = None,
    ) -> list:
        store = self.table.data
        topic = self.table.changelog_topic.get_topic_name()
        tp = TP(topic, partition)
        # a deletion is a tombstone (no value), as Faust's own ``del table[key]`` sends it
        entries: Iterator[tuple[bytes, bytes | None]] = chain(((key, None) for key in deletes), items.items())
        futures = await send_records(app_producer(self.table.app), topic, partition, entries)

        def persisted(fut: asyncio.Future) -> None:
            if fut.cancelled() or fut.exception() is not None:
                return
            # the batch's first offset: recovery may re-apply the rest, which is harmless
            offset = fut.result().offset

            def stored(write: asyncio.Future | None) -> None:
                if write is None or (not write.cancelled() and write.exception() is None):
                    store.set_persisted_offset(tp, offset)

            if local is None or local.done():
                stored(local)
            else:
                local.add_done_callback(stored)

        for future in futures:
            future.add_done_callback(persisted)
        return futures


async def send_records(
    producer: Any, topic: str, partition: int, entries: Iterable[tuple[bytes | None, bytes | None]]
) -> list[asyncio.Future]:
    """Records to one topic partition, in order, as whole record batches (aiokafka's public
    ``create_batch``/``send_batch``); one future per batch, resolved with its metadata (its
    first offset) once the broker acknowledged it."""
    futures: list[asyncio.Future] = []

    async def flush(builder: Any) -> None:
        sent = await producer.send_batch(builder, topic, partition=partition)
        futures.append(sent if isinstance(sent, asyncio.Future) else sent.future)

    builder = producer.create_batch()
    for key, value in entries:
        if builder.append(key=key, value=value, timestamp=None) is None:
            await flush(builder)
            builder = producer.create_batch()
            if builder.append(key=key, value=value, timestamp=None) is None:
                raise ValueError(f"record of {len(value or b'')} bytes does not fit a batch")
    if builder.record_count():
        await flush(builder)
    return futures


async def partition_count(app: Any, topic: str) -> int:
    """How many partitions ``topic`` has, as the app's producer knows it."""
    return len(await app_producer(app).partitions_for(topic))


async def send_values(app: Any, topic: str, partition: int, values: Iterable[bytes]) -> list[asyncio.Future]:
    """Messages without key to one partition, in order, as whole record batches (see
    :func:`send_records`) through the app's own producer."""
    return await send_records(app_producer(app), topic, partition, ((None, value) for value in values))
