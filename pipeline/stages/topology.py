"""Build the Faust application: topics, tables, the two agents and their wiring.

raw topics (one per event type, keyed by subscriber)
    -> dedupe agent  [tables: subscribers, partials]
    -> funnel.partials (keyed by campaign)
    -> aggregate agent [table: campaigns] -> /metrics, /campaigns
"""

from __future__ import annotations

import gc
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faust
import orjson

from pipeline.kafka import compat
from pipeline.kafka.security import faust_credentials
from pipeline.kafka.topics import DEAD_LETTER_TOPIC, PARTIALS_TOPIC, RAW_TOPICS
from pipeline.settings import Settings
from pipeline.stages.aggregate import AggregateStage
from pipeline.stages.batches import take_ready
from pipeline.stages.dedupe import DedupeStage

log = logging.getLogger(__name__)

MiB = 1024 * 1024
STREAM_BUFFER_MESSAGES = 64
# per partition database; the subscriber records are the large state (10 M subscribers)
ROCKSDB_LARGE = {
    "write_buffer_size": 16 * MiB,
    "max_write_buffer_number": 2,
    "target_file_size_base": 32 * MiB,
    "block_cache_size": 16 * MiB,
    "block_cache_compressed_size": 0,
}
ROCKSDB_SMALL = {
    "write_buffer_size": 4 * MiB,
    "max_write_buffer_number": 2,
    "target_file_size_base": 8 * MiB,
    "block_cache_size": 4 * MiB,
    "block_cache_compressed_size": 0,
}


@dataclass
class Pipeline:
    settings: Settings
    app: faust.App
    dedupe: DedupeStage
    aggregate: AggregateStage
    dead_letter_topic: faust.TopicT
    # every topic the worker reads or writes, created before it subscribes (pipeline.kafka.declare)
    topics: list[faust.TopicT] = field(default_factory=list)
    # told (reason, events) after the stages dead-lettered events (the worker counts them)
    dead_lettered: Callable[[str, int], None] | None = None

    def consuming(self) -> bool:
        app = self.app
        return compat.recovery_completed(app) and not app.rebalancing


def tune_gc() -> None:
    """Fewer cyclic-GC passes: a batch allocates many short-lived dicts and no cycles, and the
    default thresholds (700 allocations) made the collector a third of the dedupe stage's time."""
    gc.collect()
    gc.freeze()  # what was built at start (modules, the app) is never scanned again
    gc.set_threshold(100_000, 50, 100)


def create_pipeline(settings: Settings) -> Pipeline:
    compat.install()
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{host}" for host in (settings.broker or "").split(",") if host],
        store=settings.store,
        datadir=str(data_dir),
        autodiscover=False,
        web_enabled=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication,
        consumer_auto_offset_reset="earliest",
        table_standby_replicas=0,
        producer_acks=-1,
        broker_commit_every=10_000,
        broker_commit_interval=1.0,
        # messages queued per stream: a raw topic's are runs of records, up to a fetch of a
        # partition each (compat.deliver_in_runs), so a few dozen are tens of MiB under a backlog
        stream_buffer_maxsize=STREAM_BUFFER_MESSAGES,
        consumer_max_fetch_size=4 * 1024 * 1024,  # ~25,000 ingest-batched events per partition
        producer_max_batch_size=1024 * 1024,
        # a revoked partition is handed over only after the batch in progress is acknowledged:
        # otherwise its late changelog writes interleave with the new owner's
        stream_wait_empty=True,
        producer_max_request_size=4 * 1024 * 1024,
        producer_linger_ms=5,
        table_cleanup_interval=3600,
        # a lost worker's partitions move within seconds, not a minute
        broker_session_timeout=10.0,
        broker_heartbeat_interval=2.0,
        broker_rebalance_timeout=10.0,
        logging_config=None,
        broker_credentials=faust_credentials(settings),  # TLS, SASL: pipeline.kafka.security
    )
    raw = app.topic(*RAW_TOPICS, key_serializer="raw", value_serializer="raw")
    compat.deliver_in_runs(app, RAW_TOPICS)  # a fetch's records of a partition: one stream event
    partials_topic = app.topic(
        PARTIALS_TOPIC, key_serializer="raw", value_serializer="raw", partitions=settings.partitions
    )
    dead_letter_topic = app.topic(
        DEAD_LETTER_TOPIC, key_serializer="raw", value_serializer="raw", partitions=settings.partitions
    )
    # bytes in, bytes out: records are encoded once with orjson, not by Faust's codecs
    table_args: dict[str, Any] = {"partitions": settings.partitions, "key_type": bytes, "value_type": bytes}
    # bounded memory: Faust's RocksDB defaults are a 2 GiB block cache and 3 x 64 MiB memtables
    # per database, and every table has one database per partition
    subscribers = app.Table("subscribers", options=ROCKSDB_LARGE, **table_args)
    partials = app.Table("partials", options=ROCKSDB_SMALL, **table_args)
    campaigns = app.Table("campaigns", options=ROCKSDB_SMALL, **table_args)

    async def dead_letter(rejected: list[tuple[Any, str, dict[str, Any]]]) -> None:
        futures = [
            await dead_letter_topic.send(
                value=orjson.dumps({"reason": reason, "where": where, "event": _jsonable(item)})
            )
            for item, reason, where in rejected
        ]
        for fut in futures:
            await fut
        if pipeline.dead_lettered is not None:
            for reason, count in Counter(reason for _, reason, _ in rejected).items():
                pipeline.dead_lettered(reason, count)

    dedupe = DedupeStage(settings, subscribers, partials, partials_topic, dead_letter)
    dedupe.seek = lambda tp, offset: compat.seek(app, tp, offset)
    compat.on_assignment_start(app, dedupe.reset_offsets)
    compat.commit_from_account(app, RAW_TOPICS, lambda tp: dedupe.sequencer.commit_offset(tp))
    aggregate = AggregateStage(campaigns)
    pipeline = Pipeline(settings, app, dedupe, aggregate, dead_letter_topic)
    pipeline.topics = [
        raw,
        partials_topic,
        dead_letter_topic,
        *(table.changelog_topic for table in (subscribers, partials, campaigns)),
        compat.leader_topic(app),
    ]
    tune_gc()

    @app.agent(raw, name="dedupe")
    async def dedupe_agent(stream: faust.StreamT) -> None:
        async for events in take_ready(stream, settings.batch_max, settings.batch_within):
            # in offset order, in chunks (bounds the events held at once); what it leaves out
            # of ``events`` is not acknowledged
            await dedupe.process_in_order(events)

    @app.agent(partials_topic, name="aggregate")
    async def aggregate_agent(stream: faust.StreamT) -> None:
        async for events in take_ready(stream, settings.batch_max, settings.batch_within):
            await aggregate.process(events)

    @app.task
    async def declare_dead_letter_topic() -> None:
        # no agent consumes it, so Faust would not create it on its own
        await dead_letter_topic.maybe_declare()

    @app.timer(interval=1.0)
    async def seek_stalled_partitions() -> None:
        if pipeline.consuming():
            sequencer = dedupe.sequencer
            await dedupe.seek_stalled({tp: compat.end_offset(app, tp) for tp in list(sequencer.expected)})

    @app.timer(interval=30.0)
    async def resend_partials() -> None:
        if pipeline.consuming():
            await dedupe.resend_all()

    return pipeline


def _jsonable(item: Any) -> Any:
    if isinstance(item, bytes | bytearray):
        return item.decode("utf-8", "replace")
    return item
