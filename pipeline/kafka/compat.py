"""Every reach into faust-streaming's and aiokafka's internals, in one place.

The pipeline relies on a few things the two libraries do not offer as public API. Each is
here, with why it is needed and which upstream behaviour it replaces; nothing else in the
package touches a private name of either library. :func:`install` applies the patches once,
where the app is made (``create_pipeline``), after :func:`check` has confirmed every
internal is where this module expects it: a missing one stops the start with
:class:`CompatError` instead of degrading quietly (without the RocksDB partition handle, for
one, the dedupe stage would fall back to per-key writes and lose most of its speed).
``tests/unit/test_faust_compat.py`` holds one test per assumption (the attribute exists, the
signature matches, the behaviour relied on still holds), so an upgrade fails in CI.

Written against the pinned faust-streaming 0.15.3 and aiokafka 0.14.0.
"""

from __future__ import annotations

import functools
import inspect
import logging
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import aiokafka
import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError
from aiokafka.structs import ConsumerRecord
from faust.transport.drivers import aiokafka as faust_aiokafka

log = logging.getLogger(__name__)

TESTED_VERSIONS = {"faust-streaming": "0.15.3", "aiokafka": "0.14.0"}
FETCH_MAX_WAIT_MS = 50


class CompatError(RuntimeError):
    """An internal of faust-streaming or aiokafka this package relies on is missing or changed."""


def check() -> None:
    """Every internal used below exists with the shape expected, or :class:`CompatError`."""
    from faust import streams
    from faust.stores import rocksdb

    problems = []
    thread = faust_aiokafka.AIOKafkaConsumerThread
    for owner, name in (
        (thread, "_create_worker_consumer"),
        (thread, "seek_to_committed"),
        (thread, "call_thread"),
        (thread, "_ensure_consumer"),
        (faust_aiokafka.Consumer, "highwaters"),
        (faust_aiokafka.Consumer, "_getmany"),
        (faust_aiokafka.Producer, "_ensure_producer"),
        (rocksdb.Store, "_db_for_partition"),
        (rocksdb.Store, "set_persisted_offset"),
        (faust.App, "_leader_assignor"),
        (faust.transport.consumer.Consumer, "_new_offset"),
        (faust.transport.consumer.Consumer, "seek"),
        (faust.transport.consumer.Consumer, "highwater"),
    ):
        if not hasattr(owner, name):
            problems.append(f"{owner.__module__}.{owner.__qualname__}.{name} is gone")
    if not isinstance(getattr(streams, "_current_event", None), ContextVar):
        problems.append("faust.streams._current_event is no longer a ContextVar")
    if "_read_offset" not in inspect.getsource(faust.transport.consumer.Consumer.__init__):
        problems.append("faust's Consumer no longer keeps _read_offset")
    if problems:
        raise CompatError(
            "faust-streaming/aiokafka internals changed (tested with "
            + ", ".join(f"{k} {v}" for k, v in TESTED_VERSIONS.items())
            + "):\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    installed = {"faust-streaming": faust.__version__, "aiokafka": aiokafka.__version__}
    if installed != TESTED_VERSIONS:
        log.warning("faust-streaming/aiokafka %s, tested with %s", installed, TESTED_VERSIONS)


_installed = False


def install() -> None:
    """Check the internals, then apply the patches (once per process)."""
    global _installed
    if _installed:
        return
    check()
    _shorten_fetch_wait()
    faust_aiokafka.AIOKafkaConsumerThread.seek_to_committed = _seek_to_committed  # type: ignore[method-assign]
    consumer = faust.transport.consumer.Consumer
    consumer._new_offset = _offset_from_account(consumer._new_offset)  # type: ignore[method-assign]
    _read_true_highwaters()
    _hand_over_in_runs()
    _installed = True


# --- fetch wait ------------------------------------------------------------------------------


def _shorten_fetch_wait() -> None:
    """Faust hard-codes ``fetch_max_wait_ms=1500`` for its consumer (no setting reaches it).
    The embedded broker (Tansu) holds a fetch that finds no new data for the whole wait instead
    of answering when data arrives, so every hop (raw topic, partials topic) could add up to
    1.5 s of latency. Replaces: the consumer aiokafka is given, with a 50 ms wait."""
    create = faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer

    def create_worker_consumer(self: Any, transport: Any) -> Any:
        consumer = create(self, transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # aiokafka reads it when it starts
        return consumer

    faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer = create_worker_consumer  # type: ignore[method-assign]


# --- records handed over in runs -------------------------------------------------------------
# Faust hands every record to a stream as a message of its own: per record a Message, an Event,
# a queue put, a task racing the flow-control wait, the processors, an acknowledgement. That is
# some 100 us of the stream worker's time per record, about eight times what the dedupe stage
# itself spends on an event, so a producer that writes one event per record (every direct
# producer does) was counted at a tenth of the rate of the ingest's arrays. For the topics
# named by :func:`deliver_in_runs`, the records of one partition that one fetch returns are
# handed over as one message, a :class:`RecordRun`, whose offset is its last record's. What is
# committed for these partitions is not Faust's count of acknowledged messages but the stage's
# own account (:func:`commit_from_account`). Replaces: one message per record.

_run_topics: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class RecordRun:
    """Consecutive records of one partition (aiokafka ``ConsumerRecord``s, in offset order),
    handed to a stream as one message: the message's value."""

    __slots__ = ("records", "size")

    def __init__(self, records: list[Any]) -> None:
        self.records = records
        self.size = sum(max(record.serialized_value_size, 0) for record in records)

    @property
    def first_offset(self) -> int:
        return int(self.records[0].offset)

    @property
    def last_offset(self) -> int:
        return int(self.records[-1].offset)

    @property
    def offsets(self) -> tuple[int, int]:
        """(first, last) offset of the run."""
        return self.first_offset, self.last_offset


def deliver_in_runs(app: faust.App, topics: Iterable[str]) -> None:
    """Hand the records of these topics to their streams in runs (:class:`RecordRun`)."""
    _run_topics[app] = frozenset(topics)


def _as_run(records: list[Any]) -> Any:
    last = records[-1]
    run = RecordRun(records)
    return ConsumerRecord(
        topic=last.topic,
        partition=last.partition,
        offset=last.offset,
        timestamp=last.timestamp,
        timestamp_type=last.timestamp_type,
        key=None,
        value=run,
        checksum=None,
        serialized_key_size=-1,
        serialized_value_size=run.size,
        headers=(),
    )


def _hand_over_in_runs() -> None:
    original = faust_aiokafka.Consumer._getmany

    async def _getmany(self: Any, active_partitions: Any, timeout: float) -> Any:
        records = await original(self, active_partitions, timeout)
        topics = _run_topics.get(self.app)
        if not records or not topics:
            return records
        for tp, batch in records.items():
            if tp.topic in topics and batch:
                records[tp] = [_as_run(batch)]
        return records

    faust_aiokafka.Consumer._getmany = _getmany  # type: ignore[method-assign]


# --- seeking back after a rebalance ----------------------------------------------------------


async def seek_to_committed(
    consumer: AIOKafkaConsumer,
) -> tuple[dict[TopicPartition, int | None], dict[TopicPartition, int]]:
    """Seek every assigned partition back to its committed offset, or to the beginning; return
    the committed offsets (None where nothing is committed) and where each partition now starts
    (the log's start offset where nothing is committed).

    Faust throws away the records a fetch returns while its flow is stopped (a rebalance, a
    table recovery), then seeks back with aiokafka's ``seek_to_committed``, which (0.14) skips
    a partition with no committed offset and raises at the first partition no longer
    assigned, leaving the rest where they were: either way the records just thrown away are
    lost for good, silently. This seeks every partition still assigned (with nothing
    committed, from the beginning: at worst a replay, which the dedupe stage recomputes
    exactly) and skips one that moved away (its new owner starts from the committed offset).
    """
    committed_offsets: dict[TopicPartition, int | None] = {}
    starts: dict[TopicPartition, int] = {}
    from_start: list[TopicPartition] = []
    for tp in sorted(consumer.assignment()):
        committed = await consumer.committed(tp)
        try:
            if committed:
                consumer.seek(tp, committed)
                starts[tp] = committed
            else:
                await consumer.seek_to_beginning(tp)
                from_start.append(tp)
        except IllegalStateError:
            continue  # no longer ours
        committed_offsets[tp] = committed
    if from_start:  # one request for every partition read from its log's start
        starts.update(await consumer.beginning_offsets(from_start))
    return committed_offsets, starts


async def _seek_to_committed(self: Any) -> dict[TopicPartition, int | None]:
    committed, starts = await self.call_thread(seek_to_committed, self._ensure_consumer())
    listener = _assignment_listeners.get(self.app)
    if listener is not None:
        listener(starts)
    return committed


# --- the dedupe stage's own account of offsets (pipeline.stages.sequence) ------------------
# Faust can hand a stream record out of order or not at all around rebalances, and can count
# an offset as done that never reached an agent (a stale-generation record is skipped *and
# acknowledged*). The dedupe stage keeps its own account of what it applied and made durable;
# the consumer tells it where each assignment starts, and commits its partitions exactly at
# that account. Faust's own count (acknowledged offsets, plus "gaps" for offsets it never
# delivered) is not used for them: a run of records is one message (see above), so most
# offsets are never acknowledged one by one, and Faust's gap bookkeeping, which counts the
# offset of the next undelivered message as done, once left a partition's commits stuck for
# good after a commit lower than its count. Replaces: Faust's commit offset of these
# partitions (``Consumer._new_offset``), whose acknowledgements and gaps are dropped instead.

_assignment_listeners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_commit_accounts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def on_assignment_start(app: faust.App, listener: Any) -> None:
    """Call ``listener({tp: offset})`` each time the consumer has sought its partitions back
    (the committed offset, or the log's start where nothing is committed)."""
    _assignment_listeners[app] = listener


def commit_from_account(app: faust.App, topics: Iterable[str], account: Callable[[Any], int | None]) -> None:
    """Commit the partitions of ``topics`` at ``account(tp)`` (None: not at all), whatever
    Faust counts as acknowledged."""
    _commit_accounts[app] = (frozenset(topics), account)


def _offset_from_account(original: Any) -> Any:
    @functools.wraps(original)
    def _new_offset(self: Any, tp: Any) -> int | None:
        entry = _commit_accounts.get(self.app)
        if entry is None or tp.topic not in entry[0]:
            return original(self, tp)
        # what Faust kept to count this partition's offsets is not used: dropped, not hoarded
        self._acked[tp].clear()
        self._acked_index[tp].clear()
        self._gap[tp].clear()
        return entry[1](tp)

    _new_offset._pipeline_patched = True  # type: ignore[attr-defined]
    return _new_offset


async def seek(app: faust.App, tp: Any, offset: int) -> bool:
    """Seek one partition back and move Faust's read offset with it, as Faust's consumer seek
    does; False when the partition is no longer assigned (its next owner starts from the commit).

    The seek runs on the consumer's own thread. Faust's ``Consumer.seek`` calls aiokafka's
    consumer from the main thread while aiokafka's fetcher works on the consumer thread's loop:
    both changed the fetcher's buffered records at once, and ``Fetcher.fetched_records`` raised
    ``KeyError`` (``del self._records[tp]``), which stopped the worker (seen right after a
    seek back, in 4 of 8 bench runs over SASL_SSL under load). Replaces: Faust's seek."""
    consumer = app.consumer
    thread = consumer._thread
    try:
        await thread.call_thread(_seek_on_consumer_thread, thread, tp, offset)
    except (IllegalStateError, AssertionError, KeyError):
        return False
    consumer._read_offset[tp] = offset if offset else None  # what Faust's seek sets
    return True


async def _seek_on_consumer_thread(thread: Any, tp: Any, offset: int) -> None:
    thread._ensure_consumer().seek(tp, offset)


def end_offset(app: faust.App, tp: Any) -> int | None:
    """The partition's end offset as the consumer last saw it (None before its first fetch)."""
    try:
        return app.consumer.highwater(tp)
    except (IllegalStateError, AssertionError, KeyError):
        return None


# --- end offsets (Tansu) -----------------------------------------------------------------------


def _read_true_highwaters() -> None:
    """Faust's changelog recovery reads end offsets with ListOffsets, which Tansu answers
    short (:func:`pipeline.kafka.tansu.true_end_offsets`); the consumer's ``highwaters`` is made to
    read the real end from the log. On Apache Kafka it reads nothing new."""
    from pipeline.kafka.tansu import true_end_offsets

    original = faust_aiokafka.Consumer.highwaters

    async def highwaters(self: Any, *partitions: Any) -> dict:
        bootstrap = ",".join(f"{url.host}:{url.port}" for url in self.app.conf.broker)
        reported = dict(await original(self, *partitions))
        return await true_end_offsets(bootstrap, reported, options=client_options_of(self.app))

    faust_aiokafka.Consumer.highwaters = highwaters  # type: ignore[method-assign]


# --- tables: the current event's partition, the RocksDB handle, the changelog producer -------


@contextmanager
def on_partition_of(event: Any) -> Iterator[None]:
    """Faust routes a table access to the store and changelog partition of the *current
    event* (a context variable its streams set per event); a batch mixes partitions, so each
    partition's group is handled with one of its events made current."""
    from faust.streams import _current_event

    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


def partition_db(table: Any, partition: int) -> Any | None:
    """The rocksdict database of one partition of a RocksDB table (None for other stores),
    for multi-gets and write batches instead of Faust's per-key path."""
    store = table.data
    if not getattr(store, "use_rocksdict", False):
        return None
    return store._db_for_partition(partition)


def app_producer(app: faust.App) -> aiokafka.AIOKafkaProducer:
    """The app's own aiokafka producer (started with the app), for changelog record batches
    sent whole (``create_batch``/``send_batch``, public aiokafka API)."""
    return app.producer._ensure_producer()


# --- secured connections (pipeline.kafka.security) -------------------------------------------


async def connect_once(host: str, port: int, options: dict[str, Any]) -> None:
    """Open one connection as a client with these options would (TLS handshake, SASL
    authentication), then close it. aiokafka's clients only log why a bootstrap server failed
    and go on to the next; this raises the error itself (an ``ssl`` error, aiokafka's SASL
    errors), so the worker can say which it is."""
    from aiokafka.conn import create_conn

    conn = await create_conn(host, port, request_timeout_ms=10_000, **options)
    conn.close()


def client_options_of(app: faust.App) -> dict[str, Any]:
    """The aiokafka options of the app's own clients (from its ``broker_credentials``)."""
    return dict(
        faust_aiokafka.credentials_to_aiokafka_auth(app.conf.broker_credentials, app.conf.ssl_context)
    )


# --- introspection ---------------------------------------------------------------------------


def read_offset(consumer: Any, tp: Any) -> int | None:
    """The last offset the consumer handed to a stream (for consumer lag)."""
    return consumer._read_offset.get(tp)


def leader_topic(app: faust.App) -> Any:
    """The topic Faust's leader assignor uses (declared with the others before start)."""
    return app._leader_assignor._leader_topic  # type: ignore[attr-defined]


def recovery_completed(app: faust.App) -> bool:
    """Whether table recovery finished (``/health`` answers 200 only then)."""
    return app.tables.recovery.completed.is_set()
