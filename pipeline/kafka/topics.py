"""Topic names and the partitioner shared by ingest and direct producers.

Raw events arrive on one topic per event type. A message is one canonical event (what a
producer writing to Kafka directly sends, keyed by subscriber) or a JSON array of events
that all belong on that partition (what the HTTP ingest sends, to spare the stream
processor its per-message cost). The partition an event belongs on is Kafka's default
partitioner (the Java client's murmur2) of its routing key; the ingest writes it there, and
the dedupe stage moves an event a direct producer wrote elsewhere (any key, none, another
client's partitioner) there before deciding anything about it.
"""

from __future__ import annotations

from murmurhash2 import murmurhash2

from pipeline.events import EVENT_TYPES

RAW_PREFIX = "funnel.raw."
RAW_TOPICS: tuple[str, ...] = tuple(RAW_PREFIX + kind for kind in EVENT_TYPES)
TOPIC_CODES: dict[str, int] = {name: code for code, name in enumerate(RAW_TOPICS)}
PARTIALS_TOPIC = "funnel.partials"
DEAD_LETTER_TOPIC = "funnel.deadletter"


RAW_TOPIC_OF: dict[str, str] = {kind: RAW_PREFIX + kind for kind in EVENT_TYPES}
MURMUR2_SEED = 0x9747B28C  # the Java client's Utils.murmur2


def raw_topic(event_type: str) -> str:
    return RAW_PREFIX + event_type


def partition_for(key: str, partitions: int) -> int:
    """Kafka's default partitioner (the Java client's murmur2 of the key's UTF-8 bytes).

    The same function as aiokafka's pure-Python ``murmur2`` (a test compares them), in C:
    the ingest runs it once per event.
    """
    return partition_of_key(key.encode("utf-8", "surrogatepass"), partitions)


def partition_of_key(key: bytes, partitions: int) -> int:
    """:func:`partition_for` of a key already in bytes: where a keyed send of aiokafka's (and
    so Faust's) default partitioner puts it."""
    return (murmurhash2(key, MURMUR2_SEED) & 0x7FFFFFFF) % partitions


VALIDATED_HEADER = "funnel-validated"  # set by the ingest on arrays of events it validated
VALIDATED_VALUE = b"1"


# set by the dedupe stage on the arrays of events it moved to their partition: the stamps
# of where each arrived (a JSON array, see pipeline.stages.placement)
MOVED_HEADER = "funnel-moved"


def header(headers: object, wanted: str) -> bytes | None:
    """A header's value (the first of that name), or None."""
    if not headers:
        return None
    if isinstance(headers, dict):
        return headers.get(wanted)
    for name, value in headers:  # type: ignore[attr-defined]
        if name == wanted:
            return bytes(value)
    return None


def is_validated(headers: object) -> bool:
    """Whether a message carries the ingest's mark (its events need no second validation)."""
    return header(headers, VALIDATED_HEADER) == VALIDATED_VALUE
