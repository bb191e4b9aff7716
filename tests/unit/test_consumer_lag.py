"""``pipeline_consumer_lag`` counts every message not yet processed: for a raw partition, from
what the dedupe stage made durable, so what Faust fetched and holds in its buffers counts too."""

from __future__ import annotations

from types import SimpleNamespace

from faust.types import TP

from pipeline.worker import consumer_lag

RAW = TP("funnel.raw.click", 0)
RAW_NOT_YET_SEEN = TP("funnel.raw.open", 1)
PARTIALS = TP("funnel.partials", 2)
OTHER = TP("bench-sustained-subscribers-changelog", 0)


class Consumer:
    def __init__(self, highwaters: dict[TP, int | None], read: dict[TP, int]) -> None:
        self.highwaters = highwaters
        self._read_offset = read  # Faust's: the last offset handed to a stream

    def assignment(self) -> set[TP]:
        return set(self.highwaters)

    def highwater(self, tp: TP) -> int | None:
        return self.highwaters[tp]


def test_fetched_but_unprocessed_messages_count_as_lag() -> None:
    consumer = Consumer(
        {RAW: 1_000, RAW_NOT_YET_SEEN: 40, PARTIALS: 500, OTHER: 70},
        {RAW: 899, PARTIALS: 479},  # Faust read RAW up to 899: 900 buffered or in the batch
    )
    app = SimpleNamespace(consumer=consumer)
    lags = consumer_lag(app, {RAW: 100})  # type: ignore[arg-type]
    assert lags == {
        ("funnel.raw.click", 0): 900,  # 1,000 - 100 durable, not 1,000 - 900 read
        ("funnel.raw.open", 1): 40,  # nothing durable or read yet: the whole log
        ("funnel.partials", 2): 20,  # not a raw topic: what the aggregate's stream read
    }


def test_a_partition_without_a_known_end_is_left_out() -> None:
    app = SimpleNamespace(consumer=Consumer({RAW: None}, {}))
    assert consumer_lag(app, {RAW: 5}) == {}  # type: ignore[arg-type]
