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


def test_commits_go_through_commit_offsets_which_the_cap_wraps():
    consumer = faust.transport.consumer.Consumer
    # every commit of acknowledged offsets passes here; the wrapper caps raw partitions
    assert "self._commit_offsets(" in inspect.getsource(consumer._commit_tps)
    assert list(inspect.signature(consumer._commit_offsets).parameters) == [
        "self",
        "offsets",
        "start_new_transaction",
    ]
    assert getattr(consumer._commit_offsets, "_pipeline_patched", False) or not compat._installed


async def test_the_commit_cap_lowers_or_drops_offsets_before_faust_commits():
    seen = []

    async def original(self, offsets, start_new_transaction=True):
        seen.append(dict(offsets))
        return True

    wrapped = compat._capped_commit_offsets(original)

    class Owner:
        app = faust.App("compat-cap", autodiscover=False, web_enabled=False)

    owner = Owner()
    assert await wrapped(owner, {("t", 0): 10}) is True  # no cap registered: unchanged
    compat.cap_commits(owner.app, lambda offsets: {tp: min(o, 7) for tp, o in offsets.items() if tp[1] == 0})
    assert await wrapped(owner, {("t", 0): 10, ("t", 1): 5}) is True
    assert await wrapped(owner, {("t", 1): 5}) is False  # nothing left to commit: not called
    assert seen == [{("t", 0): 10}, {("t", 0): 7}]


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
    # _add_gap(self, tp, offset_from, offset_to), inclusive, as the drain loop calls it for skipped offsets
    assert list(inspect.signature(faust.transport.consumer.Consumer._add_gap).parameters) == [
        "self",
        "tp",
        "offset_from",
        "offset_to",
    ]
    assert "await self._add_gap(tp, r_offset + 1, offset)" in inspect.getsource(
        faust.transport.consumer.Consumer._drain_messages
    )


async def test_a_run_is_one_message_and_its_ack_commits_every_offset_of_it(app):
    """The run reaches the stream as one message (offset: its last record's; value: the run,
    which the raw codec passes through), and once Faust has the run's earlier offsets as a gap,
    acknowledging it makes every offset up to its last committable."""
    consumer = app.consumer
    tp = faust.types.TP("funnel.raw.click", 0)
    records = _records(tp.topic, 0, [0, 1, 2, 5, 6])  # 3-4: offsets the log does not hold
    message = consumer._to_message(tp, compat._as_run(records))
    run = app.serializers.loads_value(None, message.value, serializer="raw")
    assert isinstance(run, compat.RecordRun) and run.records == records
    assert (message.offset, run.first_offset, run.last_offset, run.size) == (6, 0, 6, 10)
    await consumer._add_gap(tp, 0, 5)  # what the wrapped _getmany registers for a run
    consumer._acked[tp].append(6)  # what acknowledging the run's message adds
    assert consumer._new_offset(tp) == 7
    # the next run of the partition: its gap and its ack commit up to its end
    await consumer._add_gap(tp, 7, 9)
    consumer._acked[tp].append(10)
    consumer._committed_offset[tp] = 7
    assert consumer._new_offset(tp) == 11
