"""Run table reads and writes on behalf of one partition.

Faust routes a table access to the store and changelog partition of the *current event*.
A batch taken from a stream mixes partitions, so each partition's group of events is handled
inside :func:`on_partition_of`, which makes one of its events current.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from faust.streams import _current_event
from faust.types import EventT


@contextmanager
def on_partition_of(event: EventT) -> Iterator[None]:
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


def group_by_partition(events: list[EventT]) -> dict[int, list[EventT]]:
    """Events per partition, each group in the order the stream delivered it."""
    groups: dict[int, list[EventT]] = {}
    for event in events:
        groups.setdefault(event.message.partition, []).append(event)
    return groups
