"""Events on another partition than their subscriber's, moved there before any decision.

The dedupe stage decides redelivery and uniqueness per partition, so every event of a
subscriber must be applied on one partition: the one Kafka's default partitioner (the Java
client's murmur2) gives its routing key (:func:`pipeline.events.routing_key`). The ingest writes
each event there. A producer writing to the raw topics directly may not: no key, a key by
campaign, librdkafka's or sarama's partitioner. Such an event is not applied where it arrived;
the stage collects it here and sends it, with the other events of its chunk bound for the same
partition, as one array to the same raw topic on the right partition. There it is applied like
the ingest's arrays, with the stamp of where it arrived (:func:`pipeline.rules.dedupe.moved_stamp_of`,
carried in the :data:`~pipeline.kafka.topics.MOVED_HEADER`), so:

* a copy moved twice (its origin replayed after a crash, before its offset was committed) finds
  its own stamp and adds nothing, as a replay does; a redelivery by the producer arrives at
  another position and is a duplicate;
* the origin's offsets are committed only once the moved copies are acknowledged (the chunk's
  tail awaits them), so a crash loses nothing;
* the moved copies of one origin partition reach the right partition in the origin's order,
  which is what lets a partial skip a copy at or before the last origin position it counted:
  one chunk's messages to one partition are sent one after the other, each once the one before
  is acknowledged, and only after the previous chunk's moves were (a chunk that failed stops
  the ones after it).

Events already on their partition (all the ingest's, and a direct producer's keyed by
subscriber with the Java client's partitioner) take no extra hop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson

from pipeline.kafka.topics import MOVED_HEADER, VALIDATED_HEADER, VALIDATED_VALUE, header

log = logging.getLogger(__name__)

MOVED_MESSAGE_BYTES = 900_000  # under the broker's default 1 MB message limit, as the ingest's


class Moves:
    """The misplaced events of one chunk: (topic, the partition each belongs on) -> events in
    the order read, each with the stamp of where it arrived (None: stamped where it lands)."""

    __slots__ = ("by_target", "example")

    def __init__(self) -> None:
        self.by_target: dict[tuple[str, int], list[tuple[dict[str, Any], int | None]]] = {}
        self.example: dict[str, tuple[int, int]] = {}  # topic -> (arrived on, belongs on), the first

    def add(self, topic: str, arrived: int, target: int, event: dict[str, Any], stamp: int | None) -> None:
        self.by_target.setdefault((topic, target), []).append((event, stamp))
        self.example.setdefault(topic, (arrived, target))

    def __bool__(self) -> bool:
        return bool(self.by_target)

    def counts(self) -> dict[str, int]:
        """Events moved, per topic."""
        out: dict[str, int] = {}
        for (topic, _), events in self.by_target.items():
            out[topic] = out.get(topic, 0) + len(events)
        return out


Headers = list[tuple[str, bytes]]


def moved_messages(events: list[tuple[dict[str, Any], int | None]]) -> list[tuple[bytes, Headers]]:
    """(value, headers) of the messages carrying these events, in order, each under
    :data:`MOVED_MESSAGE_BYTES`: a JSON array of the events (validated and normalised where
    they arrived, so marked as the ingest marks its own) and the stamps of where they arrived."""
    out: list[tuple[bytes, Headers]] = []
    encoded = [orjson.dumps(event) for event, _ in events]
    start, size = 0, 2
    for n, raw in enumerate(encoded):
        if n > start and size + len(raw) + 1 > MOVED_MESSAGE_BYTES:
            out.append(_message(encoded[start:n], events[start:n]))
            start, size = n, 2
        size += len(raw) + 1
    if start < len(encoded):
        out.append(_message(encoded[start:], events[start:]))
    return out


def _message(encoded: list[bytes], events: list[tuple[dict[str, Any], int | None]]) -> tuple[bytes, Headers]:
    value = b"[" + b",".join(encoded) + b"]"
    stamps = orjson.dumps([stamp for _, stamp in events])
    return value, [(VALIDATED_HEADER, VALIDATED_VALUE), (MOVED_HEADER, stamps)]


def moved_stamps(headers: object, count: int) -> list[int | None] | None:
    """The stamps of where the events of a moved array arrived, if its header holds one per
    event (anything else: None, and the events are stamped where they are)."""
    raw = header(headers, MOVED_HEADER)
    if raw is None:
        return None
    try:
        stamps = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(stamps, list) or len(stamps) != count:
        return None
    if not all(stamp is None or type(stamp) is int for stamp in stamps):
        return None
    return stamps


async def send_moves(producer: Any, moves: Moves) -> None:
    """Send every chunk's moved events and return once all are acknowledged. The messages to
    one partition go one after the other, each after the one before is acknowledged (see the
    module's docstring); different partitions are sent at once."""

    async def to_partition(topic: str, partition: int, messages: list[tuple[bytes, list]]) -> None:
        for value, headers in messages:
            batch = producer.create_batch()
            if batch.append(key=None, value=value, timestamp=None, headers=headers) is None:
                raise ValueError(f"a moved message of {len(value)} bytes does not fit a record batch")
            sent = await producer.send_batch(batch, topic, partition=partition)
            await sent

    await asyncio.gather(
        *(
            to_partition(topic, partition, moved_messages(events))
            for (topic, partition), events in moves.by_target.items()
        )
    )
