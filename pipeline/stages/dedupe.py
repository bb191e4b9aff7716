"""Stage 1, keyed by subscriber: drop redeliveries, decide uniqueness, count per partition.

A batch (the messages waiting when it was taken, up to ``batch_max``: see
:mod:`pipeline.stages.batches`) is cut into chunks of at most about :data:`CHUNK_BYTES`, so a
chunk is the backlog, up to that size (:meth:`DedupeStage.chunks`). For every chunk, per
partition: decode every message once, read every subscriber record and partial the chunk
touches in one multi-get, apply the events in order
(:mod:`pipeline.rules.dedupe`), then write each changed record once. The rest of a chunk runs while
the next chunk is applied: once the records' changelog is acknowledged, each changed partial
is written once, then every changed partial's snapshot goes to the aggregator keyed by
campaign, and is acknowledged. Until a partial is stored, later chunks read it from memory.
Offsets are committed only after the whole batch, so a crash at any point leaves either
nothing or something a replay recomputes identically.

Messages the ingest produced carry the :data:`~pipeline.kafka.topics.VALIDATED_HEADER`: their events
were validated and normalised there, so they are not validated again. Every other message (a
direct producer's single event, or an array) is validated event by event.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust
import orjson

from pipeline import failpoints
from pipeline.events import EventError, normalise_schema_valid, routing_key, schema_valid_all, validate_event
from pipeline.kafka.compat import RecordRun, app_producer
from pipeline.kafka.topics import RAW_TOPICS, TOPIC_CODES, is_validated, partition_for, partition_of_key
from pipeline.rules.dedupe import STAMP_SHIFT, STAMP_SPAN, Rules, apply, moved_stamp_of, stamp_of
from pipeline.settings import Settings
from pipeline.stages.placement import Moves, moved_stamps, send_moves
from pipeline.stages.sequence import Sequencer
from pipeline.state import codec
from pipeline.state.bulk_table import BulkTable, group_by_partition, partition_count, send_values
from pipeline.state.codec import Partial, SubscriberRecord, campaign_key, record_key

log = logging.getLogger(__name__)


# about 90,000 events of 180 bytes: bounds the memory a batch holds (about 150 MiB) while
# spreading each chunk's fixed work (partials, snapshots, acknowledgements) over many events
CHUNK_BYTES = 16 * 1024 * 1024
SNAPSHOT_MESSAGE_BYTES = 256 * 1024  # a message of the partials topic ends once its snapshots reach this
_loads = orjson.loads
_MALFORMED = object()  # a record whose value is not JSON (dead-lettered)


def _compact(encoded: bytes) -> bytes:
    """A right-sized copy of what ``orjson.dumps`` returned, for keeping many of them.

    orjson writes into a buffer of a few KiB and shrinks it in place: the freed tail is too
    small for the next buffer, so every result kept alive starts a new page of the heap. For
    the ~100,000 records a chunk encodes that was one page fault (~2 us here) per record;
    the copy costs ~0.15 us and lets the next ``dumps`` reuse the same buffer.
    """
    return memoryview(encoded).tobytes()


class Decoded:
    """One partition's valid events of a chunk, with the keys they touch.

    ``events``: (event, stamp, campaign key, record key) in order; ``last``: record key ->
    index of its last event (keys in first-seen order); ``campaigns``: campaign keys in
    first-seen order. Collected while decoding, when each event is in the CPU's cache.
    """

    __slots__ = ("campaigns", "events", "last")

    def __init__(self) -> None:
        self.events: list[tuple[dict[str, Any], int, bytes, bytes]] = []
        self.last: dict[bytes, int] = {}
        self.campaigns: dict[bytes, None] = {}

    def add(self, item: dict[str, Any], stamp: int) -> None:
        """An event to apply, in order."""
        channel, campaign = item["channel"], item["campaign_id"]
        ckey = campaign_key(channel, campaign)
        rkey = record_key(channel, campaign, item.get("subscriber_id"), item["event_id"])
        events = self.events
        self.last[rkey] = len(events)
        self.campaigns[ckey] = None
        events.append((item, stamp, ckey, rkey))

    def legacy_keys(self, rkeys: list[bytes]) -> list[bytes]:
        """The keys these records had before record keys were collision-free."""
        events = self.events
        last = self.last
        keys = []
        for rkey in rkeys:
            item = events[last[rkey]][0]
            keys.append(
                codec.legacy_record_key(
                    item["channel"], item["campaign_id"], item.get("subscriber_id"), item["event_id"]
                )
            )
        return keys


class DedupeStage:
    def __init__(
        self,
        settings: Settings,
        subscribers: faust.Table,
        partials: faust.Table,
        partials_topic: faust.TopicT,
        dead_letters: Any,
    ) -> None:
        self.settings = settings
        self.subscribers = subscribers
        self.partials = partials
        self.partials_topic = partials_topic
        self.dead_letters = dead_letters  # async callable(list of (item, reason, where))
        # one thread, so RocksDB reads and writes of the records run in the order submitted
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="records-io")
        self._records = BulkTable(subscribers, io=self._io)
        self._partials = BulkTable(partials)
        # partials of chunks applied but not yet stored: partial key -> (Partial, encoded)
        self._inflight: dict[bytes, tuple[Partial, bytes]] = {}
        # every raw partition's records applied in offset order, none left out
        self.sequencer = Sequencer()
        self.seek: Callable[[Any, int], Awaitable[bool]] | None = None  # set by the topology
        self._unassigned_logged: set[Hashable] = set()
        self.moved: dict[str, int] = {}  # topic -> events moved to their partition (acknowledged)
        self._misplaced_logged: set[str] = set()

    async def process_in_order(self, events: list[faust.types.EventT]) -> int:
        """:meth:`process_batch` for the records that come in offset order (:mod:`.sequence`).

        Records after a hole are removed from ``events`` (so they are not acknowledged) and
        their partition is sought back to the missing record. Returns events applied.
        """
        for event in [e for e in events if failpoints.hit(failpoints.DROP_RAW_RECORD)]:
            events.remove(event)
            event.ack()  # as Faust does with a stale generation's record: skipped and acknowledged
            first, last = _run(event).offsets
            log.warning("failpoint: %s[%d] offsets %d-%d dropped", *event.message.tp, first, last)
        sequencer = self.sequencer
        admission = sequencer.admit(
            (
                (event.message.tp, _run(event).first_offset, _run(event).last_offset, event)
                for event in events
            ),
            time.monotonic(),
        )
        if admission.left_out:
            events[:] = admission.admitted
        if admission.unassigned and admission.unassigned != self._unassigned_logged:
            # normal until the first assignment has sought its partitions (once per change)
            self._unassigned_logged = admission.unassigned
            names = ", ".join(f"{tp[0]}[{tp[1]}]" for tp in sorted(admission.unassigned))
            log.info("records left out until their partition's start offset is known: %s", names)
        await self._seek_back(admission.seeks, "a later record arrived first")
        tps = {event.message.tp for event in events}
        try:
            applied = await self.process_batch(events)
        except BaseException:
            try:
                await self._seek_back(sequencer.failed(tps), "the batch failed")
            except Exception:  # the original error is the one to raise
                log.exception("seeking back after a failed batch")
            raise
        sequencer.applied(tps)
        return applied

    async def _seek_back(self, seeks: Mapping[Hashable, int], why: str) -> None:
        for tp, offset in seeks.items():
            log.warning("%s[%d]: %s; reading again from offset %d", tp[0], tp[1], why, offset)
            if self.seek is not None:
                await self.seek(tp, offset)

    async def seek_stalled(self, ends: Mapping[Hashable, int | None]) -> None:
        """Seek back partitions whose next record never arrived although the log holds it."""
        await self._seek_back(self.sequencer.stalled(ends, time.monotonic()), "the next record never arrived")

    def reset_offsets(self, starts: Mapping[Any, int]) -> None:
        """The consumer sought its partitions to these offsets (a new assignment)."""
        self.sequencer.reset({tp: offset for tp, offset in starts.items() if tp[0] in RAW_TOPICS})

    def chunks(self, events: list[faust.types.EventT]) -> list[list[faust.types.EventT]]:
        """Split a batch of messages into pieces of at most about ``CHUNK_BYTES``, in order.

        A batch is what was waiting when it was taken (:mod:`pipeline.stages.batches`), so the
        chunk follows the backlog: a trickle goes through in small chunks at once, a backlog in
        chunks of up to 16 MiB. Cutting a batch smaller than that into several chunks, to show
        its first results earlier, was measured: it cost the topology-only rate 10-20 % (every
        chunk sends a snapshot per campaign and partition it touched), and below capacity the
        batches are small anyway, so it would help only under a backlog.
        """
        out: list[list[faust.types.EventT]] = []
        current: list[faust.types.EventT] = []
        size = 0
        for event in events:
            current.append(event)
            size += _run(event).size
            if size >= CHUNK_BYTES:
                out.append(current)
                current, size = [], 0
        if current:
            out.append(current)
        return out

    async def process_batch(self, events: list[faust.types.EventT]) -> int:
        """Every chunk of a batch; a chunk's work overlaps the previous chunk's wait for acks.

        Returns once every chunk is acknowledged end to end (the caller then lets Faust commit
        the batch's offsets). Events applied are returned.
        """
        applied = 0
        tail: asyncio.Task | None = None
        try:
            for chunk in self.chunks(events):
                count, tail = await self._begin(chunk, tail)
                applied += count
            if tail is not None:
                await tail
        except BaseException:
            # the batch's offsets are not committed, so it is replayed: partials it applied in
            # memory only must not survive (the stored ones are what the replay starts from)
            if tail is not None and not tail.done():
                tail.cancel()
            self._inflight.clear()
            raise
        return applied

    async def _begin(
        self, events: list[faust.types.EventT], previous: asyncio.Task | None
    ) -> tuple[int, asyncio.Task]:
        """Apply a chunk and write its records; return the task that makes the rest durable.

        The records are written locally and their changelog is on its way when this returns;
        the chunk's partials wait in memory (:attr:`_inflight`, where the next chunk reads
        them) until the task has seen the records acknowledged and ``previous`` finished.
        """
        rejected: list[tuple[Any, str, dict[str, Any]]] = []
        applied = 0
        now = time.time()
        acks: list[asyncio.Future] = []
        stored: list[tuple[int, faust.types.EventT, dict[bytes, tuple[Partial, bytes]]]] = []
        moves = Moves()
        # the work on a batch creates many small containers and no reference cycles: the
        # cyclic collector would walk every live record again and again for nothing
        collecting = gc.isenabled()
        gc.disable()
        try:
            # decode every partition's messages while the records they touch are read on the
            # I/O thread, then apply each partition while the previous one is being written
            reads: deque = deque()  # taken from the front, so each partition's events are freed once applied
            for partition, group in group_by_partition(events).items():
                decoded = self._decode(group, partition, rejected, now, moves)
                rkeys = list(decoded.last)
                reading = self._records.read_later(partition, rkeys, group[0])
                legacy = self._records.any_key_from_later(partition, codec.LEGACY_RECORD_KEYS_FROM, group[0])
                reads.append((partition, group, decoded, rkeys, reading, legacy))
            while reads:
                partition, group, decoded, rkeys, reading, legacy = reads.popleft()
                stored_records = dict(zip(rkeys, await reading, strict=True))
                moved: dict[bytes, bytes] = {}
                if await legacy:
                    moved = await self._read_legacy(partition, group[0], decoded, stored_records)
                records, partials, count = self._apply_partition(
                    partition, group, decoded, stored_records, now, moved
                )
                del decoded, stored_records  # freed while warm, not after the acknowledgements
                applied += count
                acks += await self._records.write_later(
                    partition, records, group[0], deletes=list(set(moved.values()))
                )
                self._inflight.update(partials)
                stored.append((partition, group[0], partials))
        finally:
            if collecting:
                gc.enable()
        if moves:
            self._note_misplaced(moves)
        return applied, asyncio.ensure_future(self._finish(previous, acks, stored, rejected, moves))

    async def _finish(
        self,
        previous: asyncio.Task | None,
        record_acks: list[asyncio.Future],
        stored: list[tuple[int, faust.types.EventT, dict[bytes, tuple[Partial, bytes]]]],
        rejected: list,
        moves: Moves,
    ) -> None:
        if previous is not None:
            await previous  # partials, snapshots and moved events go out in chunk order
        moving = (
            asyncio.ensure_future(send_moves(app_producer(self.partials_topic.app), moves)) if moves else None
        )
        # records acknowledged before partials are written: a partial never counts what its
        # records lack, not even in a changelog replayed onto an empty store
        for fut in record_acks:
            await fut
        failpoints.reach(failpoints.AFTER_RECORDS)
        pending: list[asyncio.Future] = []
        for partition, first, partials in stored:
            pending += await self._partials.put_many(
                partition, {pkey: raw for pkey, (_, raw) in partials.items()}, first
            )
            for pkey, entry in partials.items():
                if self._inflight.get(pkey) is entry:
                    del self._inflight[pkey]  # stored now; a later chunk's newer one stays
        for fut in pending:
            await fut
        snapshots = await self.send_snapshots(
            (partition, codec.parse_partial_key(pkey)[1], raw)
            for partition, _first, partials in stored
            for pkey, (_, raw) in partials.items()
        )
        if rejected:
            await self.dead_letters(rejected)
        for fut in snapshots:
            await fut  # the aggregator's input is acknowledged before our offsets move
        if moving is not None:
            await moving  # so are the moved events
            for topic, count in moves.counts().items():
                self.moved[topic] = self.moved.get(topic, 0) + count

    def _note_misplaced(self, moves: Moves) -> None:
        """Say once per topic that a producer's placement is off, and what is done about it."""
        for topic, (arrived, target) in moves.example.items():
            if topic in self._misplaced_logged:
                continue
            self._misplaced_logged.add(topic)
            log.warning(
                "%s: an event of partition %d arrived on partition %d: its producer does not place "
                "events by murmur2 of subscriber_id as the ingest does (no key, another key or another "
                "partitioner); such events are moved to their partition before they are counted "
                "(pipeline_records_moved_total)",
                topic,
                target,
                arrived,
            )

    async def _read_legacy(
        self, partition: int, event: faust.types.EventT, decoded: Decoded, stored: dict[bytes, bytes | None]
    ) -> dict[bytes, bytes]:
        """Records not found under their key but under their legacy key (state written before
        keys were collision-free): put into ``stored``; return record key -> legacy key, so the
        record is written under its key and the legacy one deleted, in one batch."""
        missing = [rkey for rkey, raw in stored.items() if raw is None]
        if not missing:
            return {}
        legacy_keys = decoded.legacy_keys(missing)
        found = await self._records.read_later(partition, legacy_keys, event)
        moved = {}
        for rkey, lkey, raw in zip(missing, legacy_keys, found, strict=True):
            if raw is not None:
                stored[rkey] = raw
                moved[rkey] = lkey
        if moved:
            log.info(
                "partition %d: %d subscriber records moved to collision-free keys", partition, len(moved)
            )
        return moved

    def _decode(
        self, group: list[faust.types.EventT], partition: int, rejected: list, now: float, moves: Moves
    ) -> Decoded:
        """Every valid event of the group that belongs on this partition, in order, with its
        stamp, campaign and record keys; the events that belong on another go to ``moves``.

        A direct producer's record holds one event (a JSON object): the records of a run are
        decoded first, their events' schema checked in one call, then each is normalised,
        placed and added inline (this loop is the per-record cost of direct producers). The
        ingest's arrays, and anything else, go through :meth:`_decode_record`.
        """
        decoded = Decoded()
        add = decoded.add
        skew = self.settings.max_future_skew
        partitions = self.settings.partitions
        for message_event in group:
            topic = message_event.message.topic
            code = TOPIC_CODES.get(topic, -1)  # -1: not a raw topic (_decode_record rejects it)
            records = _run(message_event).records
            docs: list[Any] = []
            for record in records:
                try:
                    docs.append(_loads(record.value))
                except (orjson.JSONDecodeError, TypeError):
                    where = _where(topic, partition, record.offset)
                    rejected.append((record.value, "malformed_message", where))
                    docs.append(_MALFORMED)
            singles = [doc for doc in docs if type(doc) is dict]
            singles_valid = code >= 0 and bool(singles) and schema_valid_all(singles)
            for record, doc in zip(records, docs, strict=True):
                if type(doc) is not dict or not singles_valid:
                    if doc is not _MALFORMED:
                        self._decode_record(
                            record, doc, topic, code, partition, decoded, rejected, now, moves
                        )
                    continue
                offset = record.offset
                # "future" is judged against the record's own time, so a replay decides the same
                latest = (record.timestamp / 1000 if record.timestamp else now) + skew
                try:
                    item = normalise_schema_valid(doc, latest)
                except EventError as exc:
                    rejected.append((doc, exc.reason, {**_where(topic, partition, offset), "index": 0}))
                    continue
                target = partition_for(routing_key(item), partitions)
                if target == partition:
                    add(item, stamp_of(code, offset, 0))
                else:
                    moves.add(topic, partition, target, item, moved_stamp_of(code, partition, offset, 0))
        return decoded

    def _decode_record(
        self,
        record: Any,
        doc: Any,
        topic: str,
        code: int,
        partition: int,
        decoded: Decoded,
        rejected: list,
        now: float,
        moves: Moves,
    ) -> None:
        """One record's events into ``decoded`` (or ``moves``, or ``rejected``), validated one
        by one unless they are the ingest's (or moved here by this stage). ``code``: the topic's
        code, -1 for a topic that is not a raw one."""
        offset = record.offset
        items = doc if isinstance(doc, list) else [doc]
        if code < 0 or len(items) > STAMP_SPAN:
            rejected.append((items, "message_too_large", _where(topic, partition, offset)))
            return
        first = stamp_of(code, offset, 0)
        # the ingest's arrays (and the events this stage moved) are validated and on their partition
        trusted = isinstance(doc, list) and is_validated(record.headers)
        stamps = moved_stamps(record.headers, len(items)) if trusted else None
        produced_at = record.timestamp / 1000 if record.timestamp else now
        for index, item in enumerate(items):
            if not (trusted and type(item) is dict and type(item.get("timestamp")) is float):
                # a direct producer's event (or not what the ingest writes): validate it, and
                # move it if it belongs on another partition
                try:
                    item = validate_event(item, produced_at, self.settings.max_future_skew)
                except EventError as exc:
                    rejected.append((item, exc.reason, {**_where(topic, partition, offset), "index": index}))
                    continue
                if not trusted:
                    target = partition_for(routing_key(item), self.settings.partitions)
                    if target != partition:
                        stamp = moved_stamp_of(code, partition, offset, index)
                        moves.add(topic, partition, target, item, stamp)
                        continue
            stamp = first + (index << STAMP_SHIFT)
            if stamps is not None:
                stamp = stamps[index] or stamp
            decoded.add(item, stamp)

    def _apply_partition(
        self,
        partition: int,
        group: list[faust.types.EventT],
        decoded: Decoded,
        stored_records: dict[bytes, bytes | None],
        now: float,
        moved: dict[bytes, bytes],
    ) -> tuple[dict[bytes, bytes], dict[bytes, tuple[Partial, bytes]], int]:
        """Apply one partition's events; return its changed records and partials, encoded.

        Records in ``moved`` (found under their legacy key) are written even if unchanged.
        """
        settings = self.settings
        windows = tuple(settings.windows)
        sizes = list(windows)
        partials = self._load_partials(partition, decoded.campaigns, group[0])
        seqs = {ckey: partial.seq for ckey, partial in partials.items()}
        decode_record = codec.decode_record
        encode_record = codec.encode_record
        new_record = SubscriberRecord
        # a record is decoded at its first event of the chunk and encoded and freed at its
        # last: most records see one or two events, so this happens while its objects are
        # still in the CPU's cache (walking all records of a chunk afterwards cost about as
        # much as the rules themselves)
        last = decoded.last
        records: dict[bytes, SubscriberRecord] = {}
        changed: set[bytes] = set(moved)
        out_records: dict[bytes, bytes] = {}
        rules = Rules(windows, settings.allowed_lateness, settings.bot_click_seconds)
        retention = settings.dedupe_retention
        for i, (event, stamp, ckey, rkey) in enumerate(decoded.events):
            record = records.get(rkey)
            if record is None:
                raw = stored_records[rkey]
                record = records[rkey] = decode_record(raw, sizes) if raw else new_record()
            partial = partials[ckey]
            if apply(event, stamp, record, partial, rules, now):
                changed.add(rkey)
            if last[rkey] == i:
                if rkey in changed:
                    record.prune(now, retention, partial.evicted)
                    out_records[rkey] = _compact(encode_record(record, sizes))
                del records[rkey]
        out_partials: dict[bytes, tuple[Partial, bytes]] = {}
        applied = 0
        for ckey, partial in partials.items():
            if partial.seq != seqs[ckey]:  # events applied, not skipped as already counted
                applied += partial.seq - seqs[ckey]
                partial.prune(settings.window_retention, windows)
                out_partials[codec.partial_key(partition, ckey)] = (partial, codec.encode_partial(partial))
        return out_records, out_partials, applied

    def _load_partials(
        self, partition: int, campaigns: Iterable[bytes], event: faust.types.EventT
    ) -> dict[bytes, Partial]:
        """The partials of these campaigns: from memory if a chunk in flight holds them, else stored."""
        partials: dict[bytes, Partial] = {}
        stored: list[tuple[bytes, bytes]] = []
        for ckey in campaigns:
            pkey = codec.partial_key(partition, ckey)
            entry = self._inflight.get(pkey)
            if entry is None:
                stored.append((ckey, pkey))
            else:
                partials[ckey] = entry[0]  # a previous chunk's, not stored yet
        raw_partials = self._partials.get_many(partition, [pkey for _, pkey in stored], event)
        for (ckey, _), raw in zip(stored, raw_partials, strict=True):
            partials[ckey] = codec.decode_partial(raw) if raw else Partial()
        return partials

    async def send_snapshots(self, snapshots: Iterable[tuple[int, bytes, bytes]]) -> list[asyncio.Future]:
        """(partition, campaign key, encoded partial) as snapshots to the aggregate stage;
        futures that resolve once they are acknowledged.

        A message carries the snapshots of many campaigns (those whose key puts them on the
        message's partition, as a keyed send would, so each campaign stays on its partition):
        a batch touches hundreds of (campaign, partition) pairs, and a message each cost
        Faust's per-message path twice, sending and again receiving.
        """
        topic = self.partials_topic.get_topic_name()
        count = await partition_count(self.partials_topic.app, topic)
        by_partition: dict[int, list[tuple[bytes, int, bytes]]] = {}
        for partition, ckey, raw in snapshots:
            by_partition.setdefault(partition_of_key(ckey, count), []).append((ckey, partition, raw))
        futures: list[asyncio.Future] = []
        for target, entries in by_partition.items():
            messages, size, start = [], 0, 0
            for n, (_, _, raw) in enumerate(entries):
                size += len(raw)
                if size >= SNAPSHOT_MESSAGE_BYTES:
                    messages.append(codec.encode_snapshots(entries[start : n + 1]))
                    size, start = 0, n + 1
            if start < len(entries):
                messages.append(codec.encode_snapshots(entries[start:]))
            futures += await send_values(self.partials_topic.app, topic, target, messages)
        return futures

    async def resend_all(self) -> int:
        """Send every partial this worker owns again: heals a snapshot lost in a crash."""
        snapshots = [(*codec.parse_partial_key(key), value) for key, value in list(self.partials.items())]
        for fut in await self.send_snapshots(snapshots):
            await fut
        return len(snapshots)


def _run(event: faust.types.EventT) -> RecordRun:
    """The records a dedupe stream event carries: the consumer hands the raw topics over in runs
    (:func:`pipeline.kafka.compat.deliver_in_runs`, registered with the topology)."""
    run = event.value
    assert isinstance(run, RecordRun), "raw topics are delivered in runs"
    return run


def _where(topic: str, partition: int, offset: int) -> dict[str, Any]:
    return {"topic": topic, "partition": partition, "offset": offset}
