"""Stage 1, keyed by subscriber: drop redeliveries, decide uniqueness, count per partition.

For every batch (all messages a fetch delivered, up to ``batch_max``), per partition: decode
every message once, read every subscriber record and partial the batch touches in one
multi-get, apply the events in order (:mod:`pipeline.dedupe`), then write each changed record
once, then each changed partial once, then send every changed partial's snapshot to the
aggregator keyed by campaign and wait for the broker's acknowledgements. Records' changelog
is acknowledged before partials are written, partials before snapshots go out. Offsets are
committed only after the batch, so a crash at any point leaves either nothing or something a
replay recomputes identically.

Messages the ingest produced carry the :data:`~pipeline.topics.VALIDATED_HEADER`: their events
were validated and normalised there, so they are not validated again. Every other message (a
direct producer's single event, or an array) is validated event by event.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any

import faust
import orjson

from pipeline.agents.context import BulkTable, group_by_partition
from pipeline.dedupe import STAMP_SPAN, Partial, SubscriberRecord, apply
from pipeline.events import EventError, validate_event
from pipeline.settings import Settings
from pipeline.topics import TOPIC_CODES, is_validated

log = logging.getLogger(__name__)


def record_key(event: dict[str, Any]) -> bytes:
    sub = event.get("subscriber_id") or "#" + event["event_id"]
    return f"{event['channel']}|{event['campaign_id']}|{sub}".encode()


def campaign_key(event: dict[str, Any]) -> str:
    return f"{event['channel']}|{event['campaign_id']}"


CHUNK_BYTES = 4 * 1024 * 1024  # about 25,000 events of 170 bytes: bounds memory, amortises acks
_loads = orjson.loads
_dumps = orjson.dumps


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
        self._records = BulkTable(subscribers)
        self._partials = BulkTable(partials)

    def chunks(self, events: list[faust.types.EventT]) -> list[list[faust.types.EventT]]:
        """Split a batch of messages into pieces of about ``CHUNK_BYTES`` of events, in order."""
        out: list[list[faust.types.EventT]] = []
        current: list[faust.types.EventT] = []
        size = 0
        for event in events:
            current.append(event)
            size += len(event.value or b"")
            if size >= CHUNK_BYTES:
                out.append(current)
                current, size = [], 0
        if current:
            out.append(current)
        return out

    async def process(self, events: list[faust.types.EventT]) -> int:
        rejected: list[tuple[Any, str, dict[str, Any]]] = []
        applied = 0
        results = []
        now = time.time()
        # the work on a batch creates many small containers and no reference cycles: the
        # cyclic collector would walk every live record again and again for nothing
        collecting = gc.isenabled()
        gc.disable()
        try:
            for partition, group in group_by_partition(events).items():
                result = self._apply_partition(partition, group, rejected, now)
                applied += result[3]
                results.append(result)
        finally:
            if collecting:
                gc.enable()
        # records first (and acknowledged), then partials: a partial never counts what its
        # records lack, not even in a changelog replayed onto an empty store
        pending: list[asyncio.Future] = []
        for partition, group, (records, _), _ in results:
            pending += await self._records.put_many(partition, records, group[0])
        for fut in pending:
            await fut
        pending = []
        for partition, group, (_, partials), _ in results:
            pending += await self._partials.put_many(partition, partials, group[0])
        for fut in pending:
            await fut
        snapshots = []
        for partition, _group, (_, partials), _ in results:
            for pkey, raw in partials.items():
                snapshots.append(await self.send_raw_snapshot(partition, pkey.split(b"|", 1)[1], raw))
        if rejected:
            await self.dead_letters(rejected)
        for fut in snapshots:
            await fut  # the aggregator's input is acknowledged before our offsets move
        return applied

    def _decode(
        self, group: list[faust.types.EventT], partition: int, rejected: list, now: float
    ) -> list[tuple[dict[str, Any], list[int]]]:
        """Every valid event of the group with its stamp, in order."""
        skew = self.settings.max_future_skew
        out: list[tuple[dict[str, Any], list[int]]] = []
        for message_event in group:
            message = message_event.message
            code = TOPIC_CODES.get(message.topic)
            value = message_event.value
            try:
                doc = _loads(value)
            except (orjson.JSONDecodeError, TypeError):
                rejected.append((value, "malformed_message", _where(message, partition)))
                continue
            items = doc if isinstance(doc, list) else [doc]
            if code is None or len(items) > STAMP_SPAN:
                rejected.append((items, "message_too_large", _where(message, partition)))
                continue
            base = message.offset * STAMP_SPAN
            if is_validated(message.headers) and isinstance(doc, list):
                for index, item in enumerate(items):
                    if type(item) is dict and type(item.get("timestamp")) is float:
                        out.append((item, [code, base + index]))
                    else:  # not what the ingest writes: validate it like any other
                        self._validate_into(
                            out, item, code, base, index, message, partition, now, skew, rejected
                        )
                continue
            for index, item in enumerate(items):
                self._validate_into(out, item, code, base, index, message, partition, now, skew, rejected)
        return out

    @staticmethod
    def _validate_into(out, item, code, base, index, message, partition, now, skew, rejected) -> None:
        # "future" is judged against the message's own time, so a replay decides the same
        produced_at = message.timestamp or now
        try:
            event = validate_event(item, produced_at, skew)
        except EventError as exc:
            rejected.append((item, exc.reason, {**_where(message, partition), "index": index}))
            return
        out.append((event, [code, base + index]))

    def _apply_partition(
        self, partition: int, group: list[faust.types.EventT], rejected: list, now: float
    ) -> tuple[int, list, tuple[dict[bytes, bytes], dict[bytes, bytes]], int]:
        settings = self.settings
        decoded = self._decode(group, partition, rejected, now)
        # one multi-get for every record and partial the batch touches
        rkeys: list[bytes] = []
        ckeys: list[str] = []
        for event, _ in decoded:
            ckey = event["channel"] + "|" + event["campaign_id"]
            ckeys.append(ckey)
            rkeys.append((ckey + "|" + (event.get("subscriber_id") or "#" + event["event_id"])).encode())
        unique_rkeys = list(dict.fromkeys(rkeys))
        unique_ckeys = list(dict.fromkeys(ckeys))
        raw_records = self._records.get_many(partition, unique_rkeys, group[0])
        from_json = SubscriberRecord.from_json
        records = {
            k: from_json(_loads(raw) if raw else {}) for k, raw in zip(unique_rkeys, raw_records, strict=True)
        }
        pkeys = [f"{partition}|{c}".encode() for c in unique_ckeys]
        raw_partials = self._partials.get_many(partition, pkeys, group[0])
        partials = {
            c: Partial.from_json(_loads(raw)) if raw else Partial()
            for c, raw in zip(unique_ckeys, raw_partials, strict=True)
        }
        changed: dict[bytes, str] = {}
        touched: set[str] = set()
        applied = 0
        windows = tuple(settings.windows)
        lateness = settings.allowed_lateness
        bot_seconds = settings.bot_click_seconds
        for (event, stamp), rkey, ckey in zip(decoded, rkeys, ckeys, strict=True):
            partial = partials[ckey]
            before = partial.seq
            if apply(event, stamp, records[rkey], partial, now, windows, lateness, bot_seconds):
                changed[rkey] = ckey
            if partial.seq != before:
                touched.add(ckey)
                applied += 1
        out_records: dict[bytes, bytes] = {}
        retention = settings.dedupe_retention
        for rkey, ckey in changed.items():
            record = records[rkey]
            record.prune(now, retention, partials[ckey].evicted)
            out_records[rkey] = _dumps(record.to_json())
        out_partials: dict[bytes, bytes] = {}
        for ckey in touched:
            partial = partials[ckey]
            partial.prune(settings.window_retention)
            out_partials[f"{partition}|{ckey}".encode()] = _dumps(partial.to_json())
        return partition, group, (out_records, out_partials), applied

    async def send_raw_snapshot(self, partition: int, ckey: bytes, snapshot: bytes) -> asyncio.Future:
        value = b'{"p":%d,"s":%s}' % (partition, snapshot)
        return await self.partials_topic.send(key=ckey, value=value)

    async def send_snapshot(self, partition: int, ckey: str, snapshot: dict[str, Any]) -> asyncio.Future:
        return await self.partials_topic.send(
            key=ckey.encode(), value=orjson.dumps({"p": partition, "s": snapshot})
        )

    async def resend_all(self) -> int:
        """Send every partial this worker owns again: heals a snapshot lost in a crash."""
        sent = []
        for key, value in list(self.partials.items()):
            partition, ckey = key.decode().split("|", 1)
            sent.append(await self.send_raw_snapshot(int(partition), ckey.encode(), value))
        for fut in sent:
            await fut
        return len(sent)


def _where(message: Any, partition: int) -> dict[str, Any]:
    return {"topic": message.topic, "partition": partition, "offset": message.offset}
