"""The dedupe stage applies each raw partition's records in offset order, with none left out.

Why the stage checks this itself: the dedupe rules skip an event at or before the position a
partial has already counted (that is how a replay after a crash adds nothing twice), so a
record that reaches the stage *after* a later record of its partition is skipped for good, and
one that never reaches it is lost. Faust does not promise gap-free, in-order hand-over. Around
rebalances it drops records without seeking back: a record fetched in the previous generation
is skipped by the stream *and acknowledged* (so its offset gets committed), the rest of a fetch
is dropped when a rebalance starts while it is handed out, and queued records are cleared while
the read offset has moved past them. Against Apache Kafka, where a restarted worker meets
several rebalances as the dead memberships expire, this lost acknowledged events in about one
fault-test run in three.

:class:`Sequencer` is the stage's own account, per raw partition, of the next offset it must
apply (``expected``):

* a record below it is a replay (after a seek back) and goes through: the rules recognise it;
* the record at it is applied and moves it on;
* a record beyond it follows a hole: it and the rest of its partition's records are left out
  of the batch, unacknowledged, and the consumer is sought back to ``expected`` (once; again
  only if the record does not come back within :data:`RESEEK_AFTER` seconds);
* a partition whose ``expected`` stays below the broker's end with nothing arriving is sought
  back too (:meth:`stalled`): the tail case, where no later record reveals the hole.

Offsets are committed at what the stage made durable (:meth:`commit_offset`), whatever Faust
acknowledged on its own, so a crash in the middle never leaves a committed hole. After each
assignment the account restarts from the committed offsets the consumer sought to
(:meth:`reset`). Pure: the stage does the seeking and the committing.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

RESEEK_AFTER = 2.0  # seconds: a sought-back record that has not come back is sought again
STALL_AFTER = 2.0  # seconds without progress below the end offset before a partition is sought back


@dataclass
class Admission:
    """What to do with a batch: the records to apply, in order, and the seeks to make."""

    admitted: list[Any] = field(default_factory=list)
    seeks: dict[Hashable, int] = field(default_factory=dict)
    left_out: int = 0
    unassigned: set[Hashable] = field(default_factory=set)  # partitions with no start offset


class Sequencer:
    """Per raw partition: the next offset to apply, the offset safe to commit, pending seeks."""

    def __init__(self) -> None:
        self.expected: dict[Hashable, int] = {}  # next offset the stage must apply
        self.durable: dict[Hashable, int] = {}  # every offset below is applied and durable
        self._seeking: dict[Hashable, tuple[int, float]] = {}  # tp -> (offset, when sought)
        self._progress: dict[Hashable, tuple[int, float]] = {}  # tp -> (expected, since when)

    def reset(self, starts: Mapping[Hashable, int]) -> None:
        """A new assignment: the consumer was sought to these offsets (committed, or the log's
        start where nothing is committed). Partitions not listed are no longer ours."""
        self.expected = dict(starts)
        self.durable = dict(starts)
        self._seeking.clear()
        self._progress.clear()

    def admit(self, records: Iterable[tuple[Hashable, int, int, Any]], now: float) -> Admission:
        """Sort a batch of ``(tp, first offset, last offset, item)`` into items to apply and
        seeks to make. An item is a run of records, in offset order, as one fetch returned them
        (:class:`pipeline.kafka.compat.RecordRun`; a single record has first == last): offsets
        missing between them are none the log holds (transaction markers), not holes."""
        out = Admission()
        holed: set[Hashable] = set()
        expected = self.expected
        for tp, first, last, item in records:
            if tp in holed:
                out.left_out += 1
                continue
            want = expected.get(tp)
            if want is None:
                # not assigned to us (any more): applying it could only be a replay or a
                # record its owner also applies; nothing commits it here (see commit_offset)
                out.left_out += 1
                out.unassigned.add(tp)
                continue
            if last < want:
                out.admitted.append(item)  # a replay: the rules add nothing twice
                continue
            if first <= want:  # what it holds below ``want`` is a replay, the rest is next
                out.admitted.append(item)
                expected[tp] = last + 1
                self._seeking.pop(tp, None)
                continue
            holed.add(tp)
            out.left_out += 1
            sought = self._seeking.get(tp)
            if sought is None or sought[0] != want or now - sought[1] >= RESEEK_AFTER:
                self._seeking[tp] = (want, now)
                out.seeks[tp] = want
        return out

    def applied(self, tps: Iterable[Hashable]) -> None:
        """The batch admitted last is durable: its partitions may be committed up to ``expected``."""
        for tp in tps:
            if tp in self.expected:
                self.durable[tp] = self.expected[tp]

    def failed(self, tps: Iterable[Hashable]) -> dict[Hashable, int]:
        """The batch was not made durable: read its partitions again from what was. Returns
        the seeks to make."""
        seeks = {}
        for tp in tps:
            if tp in self.durable:
                self.expected[tp] = seeks[tp] = self.durable[tp]
        return seeks

    def commit_offset(self, tp: Hashable) -> int | None:
        """Where a raw partition is committed: every offset below is applied and durable. None
        for a partition the stage has no account of (not assigned): not committed from here."""
        return self.durable.get(tp)

    def stalled(self, ends: Mapping[Hashable, int | None], now: float) -> dict[Hashable, int]:
        """Partitions whose end lies beyond ``expected`` with no progress for
        :data:`STALL_AFTER` seconds: the seeks to make."""
        seeks = {}
        for tp, want in self.expected.items():
            end = ends.get(tp)
            if end is None or end <= want:
                self._progress.pop(tp, None)
                continue
            seen = self._progress.get(tp)
            if seen is None or seen[0] != want:
                self._progress[tp] = (want, now)
            elif now - seen[1] >= STALL_AFTER:
                self._progress[tp] = (want, now)
                self._seeking[tp] = (want, now)
                seeks[tp] = want
        return seeks
