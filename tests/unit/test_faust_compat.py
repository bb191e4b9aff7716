"""One test per assumption ``pipeline.kafka.compat`` makes about faust-streaming and aiokafka.

An upgrade of either library that moves or changes one of these internals fails here, in CI,
and not silently in production. (The seek-back behaviour itself runs against a real broker in
``tests/integration/test_rewind.py``.)
"""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path

import aiokafka
import faust
import pytest
from faust.transport.drivers import aiokafka as faust_aiokafka

from pipeline.kafka import compat

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def app(tmp_path: Path) -> faust.App:
    return faust.App(
        "compat-test",
        broker="kafka://127.0.0.1:1,kafka://other:2",
        store="rocksdb://",
        datadir=str(tmp_path),
        autodiscover=False,
        web_enabled=False,
    )


def test_the_tested_versions_are_the_pinned_ones():
    pins = dict(
        re.fullmatch(r"([A-Za-z0-9_.-]+)==(.+)", dep).groups()  # type: ignore[union-attr]
        for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        if "==" in dep
    )
    assert {name: pins[name] for name in compat.TESTED_VERSIONS} == compat.TESTED_VERSIONS
    assert faust.__version__ == compat.TESTED_VERSIONS["faust-streaming"]
    assert aiokafka.__version__ == compat.TESTED_VERSIONS["aiokafka"]


def test_every_internal_is_where_it_is_expected():
    compat.check()  # raises CompatError naming what moved


def test_a_missing_internal_stops_the_start_loudly(monkeypatch):
    from faust.stores import rocksdb

    monkeypatch.delattr(rocksdb.Store, "_db_for_partition")
    with pytest.raises(compat.CompatError, match="_db_for_partition is gone"):
        compat.check()


def test_patched_methods_keep_their_signatures():
    thread = faust_aiokafka.AIOKafkaConsumerThread
    # _create_worker_consumer(self, transport) -> AIOKafkaConsumer, wrapped to shorten the wait
    assert list(inspect.signature(thread._create_worker_consumer).parameters)[:2] == ["self", "transport"]
    # seek_to_committed(self) -> offsets, replaced whole
    assert list(inspect.signature(thread.seek_to_committed).parameters) == ["self"]
    # Consumer.highwaters(self, *partitions), wrapped
    parameters = inspect.signature(faust_aiokafka.Consumer.highwaters).parameters
    assert [p.kind for p in parameters.values()] == [
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL,
    ]
    # aiokafka reads the wait from this attribute when the consumer starts
    assert "self._fetch_max_wait_ms" in inspect.getsource(aiokafka.AIOKafkaConsumer.__init__)
    assert "_fetch_max_wait_ms" in inspect.getsource(aiokafka.AIOKafkaConsumer.start)
    assert list(inspect.signature(faust_aiokafka.Producer._ensure_producer).parameters) == ["self"]


async def test_install_patches_once_and_the_consumer_gets_the_short_wait(app):
    compat.install()
    compat.install()  # twice: still one wrapper
    thread = faust_aiokafka.AIOKafkaConsumerThread(app.consumer)
    consumer = thread._create_worker_consumer(app.transport)
    assert consumer._fetch_max_wait_ms == compat.FETCH_MAX_WAIT_MS
    assert faust_aiokafka.AIOKafkaConsumerThread.seek_to_committed is compat._seek_to_committed


def test_a_table_access_goes_to_the_current_events_partition():
    class Event:  # anything Faust's streams would hold a weak reference to
        pass

    event = Event()
    with compat.on_partition_of(event):
        assert faust.streams.current_event() is event
    assert faust.streams.current_event() is None


def test_the_rocksdb_handle_of_a_partition_is_rocksdict(app):
    table = app.Table("t", partitions=2, key_type=bytes, value_type=bytes)
    db = compat.partition_db(table, 1)
    db.put(b"k", b"v")
    assert db.get([b"k"]) == [b"v"]  # multi-get, as the dedupe stage reads
    assert compat.partition_db(table, 1) is db
    memory = faust.App("compat-memory", store="memory://", autodiscover=False, web_enabled=False)
    assert compat.partition_db(memory.Table("m", partitions=1), 0) is None


def test_the_consumer_keeps_read_offsets_and_the_app_a_leader_topic_and_recovery(app):
    assert compat.read_offset(app.consumer, ("t", 0)) is None
    assert compat.leader_topic(app).get_topic_name() == "compat-test-__assignor-__leader"
    assert compat.recovery_completed(app) is False
    assert [(u.host, u.port) for u in app.conf.broker] == [("127.0.0.1", 1), ("other", 2)]


def test_the_offset_committed_per_partition_comes_from_new_offset():
    consumer = faust.transport.consumer.Consumer
    # every commit asks _new_offset(tp) per partition with acknowledgements, then commits those
    assert "self._new_offset(tp)" in inspect.getsource(consumer._filter_committable_offsets)
    assert "for tp in self._acked\n" in inspect.getsource(consumer._filter_tps_with_pending_acks)
    assert list(inspect.signature(consumer._new_offset).parameters) == ["self", "tp"]
    # the bookkeeping the wrapper drops for partitions committed from an account
    init = inspect.getsource(consumer.__init__)
    for name in ("self._acked = ", "self._acked_index = ", "self._gap = "):
        assert name in init
    assert getattr(consumer._new_offset, "_pipeline_patched", False) or not compat._installed


async def test_partitions_with_an_account_are_committed_at_it_whatever_was_acknowledged(app):
    """Faust's own count of a run's partition would stick (its gaps count the offset of the
    next, undelivered message as done); the account decides, and the count is dropped."""
    compat.install()
    consumer = app.consumer
    raw, other = faust.types.TP("funnel.raw.click", 0), faust.types.TP("funnel.partials", 0)
    durable = {raw: 40}
    compat.commit_from_account(app, ["funnel.raw.click"], durable.get)
    consumer._acked[raw].extend([12, 30, 55])
    await consumer._add_gap(raw, 13, 29)
    consumer._acked[other].extend([0, 1, 2])
    assert consumer._new_offset(raw) == 40
    assert not consumer._acked[raw] and not consumer._gap[raw]
    assert consumer._new_offset(other) == 3  # Faust's own count for the rest
    durable.clear()
    assert consumer._new_offset(raw) is None  # no account: not committed from here


def test_a_stale_generations_record_is_skipped_and_acknowledged_by_faust():
    """The behaviour the dedupe stage's sequencer guards against (pipeline.stages.sequence):
    if Faust stops acknowledging skipped records, the guard is still right, only unneeded."""
    source = inspect.getsource(faust.streams.Stream._py_aiter)
    assert "message.generation_id != self.app.consumer_generation_id" in source
    assert "do_ack or value is skipped_value" in source


def test_seek_and_highwater_keep_their_signatures():
    consumer = faust.transport.consumer.Consumer
    assert list(inspect.signature(consumer.seek).parameters) == ["self", "partition", "offset"]
    assert list(inspect.signature(faust_aiokafka.Consumer.highwater).parameters) == ["self", "tp"]
    # the assignment's start offsets come from the thread's seek, which the patch replaces
    assert "seek_to_committed" in inspect.getsource(consumer.perform_seek)


def _records(topic: str, partition: int, offsets: list[int]) -> list[aiokafka.structs.ConsumerRecord]:
    return [
        aiokafka.structs.ConsumerRecord(
            topic, partition, offset, 1_700_000_000_000 + offset, 0, None, b"{}", None, -1, 2, ()
        )
        for offset in offsets
    ]


def test_the_fetch_is_where_runs_are_made():
    # Consumer._getmany(self, active_partitions, timeout) -> {tp: [records]}, wrapped
    assert list(inspect.signature(faust_aiokafka.Consumer._getmany).parameters) == [
        "self",
        "active_partitions",
        "timeout",
    ]
    assert "self._getmany(" in inspect.getsource(faust.transport.consumer.Consumer._wait_next_records)


async def test_a_run_is_one_message_whose_value_the_raw_codec_passes_through(app):
    """The run reaches the stream as one message (offset: its last record's; value: the run)."""
    consumer = app.consumer
    tp = faust.types.TP("funnel.raw.click", 0)
    records = _records(tp.topic, 0, [0, 1, 2, 5, 6])  # 3-4: offsets the log does not hold
    message = consumer._to_message(tp, compat._as_run(records))
    run = app.serializers.loads_value(None, message.value, serializer="raw")
    assert isinstance(run, compat.RecordRun) and run.records == records
    assert (message.offset, run.first_offset, run.last_offset, run.size) == (6, 0, 6, 10)


def test_a_seek_is_what_faust_does_made_on_the_consumer_thread():
    """compat.seek replaces Faust's Consumer.seek (driver seek from the main thread) by the same
    aiokafka seek run with call_thread, and sets the read offset as Faust's does."""
    source = inspect.getsource(faust.transport.consumer.Consumer.seek)
    assert "self._read_offset[ensure_TP(partition)] = offset if offset else None" in source
    assert "self._ensure_consumer().seek(partition, offset)" in inspect.getsource(
        faust_aiokafka.AIOKafkaConsumerThread.seek
    )
    assert list(inspect.signature(faust_aiokafka.AIOKafkaConsumerThread.call_thread).parameters)[:2] == [
        "self",
        "fun",
    ]
