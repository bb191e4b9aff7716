"""Stage 1, keyed by subscriber: drop redeliveries, decide uniqueness, count per partition.

For every batch, per partition: load the subscriber records and partials it touches, apply
the events in order (:mod:`pipeline.dedupe`), write each changed record once, then each
changed partial once, then send every changed partial's snapshot to the aggregator keyed by
campaign and wait for the broker's acknowledgement. Offsets are committed only after the
batch, and Faust flushes table changelogs before committing, so a crash at any point leaves
either nothing or something a replay recomputes identically.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import faust
import orjson

from pipeline.agents.context import group_by_partition, on_partition_of
from pipeline.dedupe import STAMP_SPAN, Partial, SubscriberRecord, apply_event, stamp_of
from pipeline.events import EventError, decode_message, routing_key, validate_event
from pipeline.settings import Settings
from pipeline.topics import TOPIC_CODES

log = logging.getLogger(__name__)


def record_key(event: dict[str, Any]) -> bytes:
    return f"{event['channel']}|{event['campaign_id']}|{routing_key(event)}".encode()


def campaign_key(event: dict[str, Any]) -> str:
    return f"{event['channel']}|{event['campaign_id']}"


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

    async def process(self, events: list[faust.types.EventT]) -> int:
        pending: list[asyncio.Future] = []
        rejected: list[tuple[Any, str, dict[str, Any]]] = []
        applied = 0
        for partition, group in group_by_partition(events).items():
            with on_partition_of(group[0]):
                applied += await self._process_partition(partition, group, pending, rejected)
        if rejected:
            await self.dead_letters(rejected)
        for fut in pending:
            await fut  # the aggregator's input is acknowledged before our offsets move
        return applied

    async def _process_partition(
        self,
        partition: int,
        group: list[faust.types.EventT],
        pending: list[asyncio.Future],
        rejected: list[tuple[Any, str, dict[str, Any]]],
    ) -> int:
        settings = self.settings
        now = time.time()
        records: dict[bytes, SubscriberRecord] = {}
        changed: set[bytes] = set()
        campaign_of: dict[bytes, str] = {}
        partials: dict[str, Partial] = {}
        touched: set[str] = set()
        applied = 0
        for message_event in group:
            message = message_event.message
            where = {"topic": message.topic, "partition": partition, "offset": message.offset}
            code = TOPIC_CODES.get(message.topic)
            try:
                items = decode_message(message_event.value)
            except (orjson.JSONDecodeError, TypeError):
                rejected.append((message_event.value, "malformed_message", where))
                continue
            if code is None or len(items) > STAMP_SPAN:
                rejected.append((items, "message_too_large", where))
                continue
            # "future" is judged against the message's own time, so a replay decides the same
            produced_at = message.timestamp or now
            for index, item in enumerate(items):
                try:
                    event = validate_event(item, produced_at, settings.max_future_skew)
                except EventError as exc:
                    rejected.append((item, exc.reason, {**where, "index": index}))
                    continue
                rkey = record_key(event)
                record = records.get(rkey)
                if record is None:
                    raw = self.subscribers.get(rkey)
                    record = records[rkey] = (
                        SubscriberRecord.from_json(orjson.loads(raw)) if raw else SubscriberRecord()
                    )
                ckey = campaign_of[rkey] = campaign_key(event)
                partial = partials.get(ckey)
                if partial is None:
                    raw = self.partials.get(f"{partition}|{ckey}".encode())
                    partial = partials[ckey] = Partial.from_json(orjson.loads(raw)) if raw else Partial()
                before = partial.seq
                if apply_event(
                    event,
                    stamp_of(code, message.offset, index),
                    record,
                    partial,
                    now=now,
                    windows=settings.windows,
                    lateness=settings.allowed_lateness,
                ):
                    changed.add(rkey)
                if partial.seq != before:
                    touched.add(ckey)
                    applied += 1
        # records first, then partials: a partial never counts what its records lack
        for rkey in changed:
            record = records[rkey]
            record.prune(now, settings.dedupe_retention, partials[campaign_of[rkey]].evicted)
            self.subscribers[rkey] = orjson.dumps(record.to_json())
        for ckey in touched:
            partial = partials[ckey]
            partial.prune(settings.window_retention)
            snapshot = partial.to_json()
            self.partials[f"{partition}|{ckey}".encode()] = orjson.dumps(snapshot)
            pending.append(await self.send_snapshot(partition, ckey, snapshot))
        return applied

    async def send_snapshot(self, partition: int, ckey: str, snapshot: dict[str, Any]) -> asyncio.Future:
        return await self.partials_topic.send(
            key=ckey.encode(), value=orjson.dumps({"p": partition, "s": snapshot})
        )

    async def resend_all(self) -> int:
        """Send every partial this worker owns again: heals a snapshot lost in a crash."""
        sent = []
        for key, value in list(self.partials.items()):
            partition, ckey = key.decode().split("|", 1)
            sent.append(await self.send_snapshot(int(partition), ckey, orjson.loads(value)))
        for fut in sent:
            await fut
        return len(sent)
