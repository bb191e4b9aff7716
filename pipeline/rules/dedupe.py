"""Redelivery and uniqueness rules, free of I/O: what one event adds to the counts.

State lives in two kinds of records, both on the partition of the subscriber:

* a :class:`SubscriberRecord` per (channel, campaign, subscriber) holds the event ids seen
  (for redelivery) with *what each made the subscriber part of* (first clicker, first in
  this window...), the order ids seen (a conversion counts once per order) and the flags of
  the distinct-subscriber counts it is already part of, overall and per window;
* a :class:`Partial` per (partition, channel, campaign) holds the cumulative counts of that
  partition and, per source topic, the position of the last event applied to it.

Exactness through crashes without broker transactions: every decision about an event is
written into the subscriber record under its event id, together with the event's position
(its *stamp*: topic, offset, index in the message). Replaying an event after a crash finds its
own stamp there and recomputes exactly the same contribution from the stored decisions; a
redelivery finds another stamp and is a duplicate. A partial skips events at or before its own
position, so it never adds one twice. Records are written before partials, so a partial never
counts an event its subscriber record lacks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pipeline.state.codec import (
    HEURISTIC_BOT,
    LATE_BITS,
    NAME_BITS,
    NAME_SPAN,
    UNDECIDED_SHIFT,
    UNIQUE_EVENTS,
    Partial,
    Stamp,
    SubscriberRecord,
    flags_of,
    window_key,
    window_key_cache,
)

TOTAL_EVENTS = (
    "impression",
    "click",
    "send",
    "delivery",
    "bounce",
    "open",
    "machine_open",
    "conversion",
    "bot_click",
)
COUNT_NAMES = TOTAL_EVENTS + tuple(f"unique_{name}" for name in UNIQUE_EVENTS)

STAMP_SPAN = 1 << 16  # a message carries at most this many events
# stamp = position << 7 | 1 << 6 | topic code: one int (cheap to store, compare and encode),
# never 0, and ordered like positions within a topic
TOPIC_BITS = 6
STAMP_SHIFT = TOPIC_BITS + 1  # the next event of the same message: stamp + (1 << STAMP_SHIFT)
_STAMP_MARK = 1 << TOPIC_BITS
_TOPIC_MASK = _STAMP_MARK - 1


# An event moved from the partition it arrived on to its subscriber's (a direct producer
# that partitions otherwise) keeps the stamp of where it arrived: its topic code plus
# MOVED_CODE, and its origin partition in the low bits of its position. Its decisions are
# then those of its first arrival: a copy moved again (the origin replayed after a crash)
# finds its own stamp, as a replay does, while a redelivery arrives elsewhere and is a
# duplicate. Positions are compared per (topic, origin partition), the order the origin was
# read in, so a partial keeps one position per origin partition for moved events.
# A stamp is stored as a 64-bit integer, so the origin must fit: an offset below 2**40, an
# index in its record below 128 (direct producers write one event per record), a partition
# below 1,024 (:func:`moved_stamp_of` returns None otherwise, and the event is stamped where
# it lands: still counted once, a copy moved again is then dropped as a duplicate).
MOVED_CODE = 32  # topic codes 0-31 are the raw topics as read, 32-63 the same moved
MOVED_OFFSET_BITS, MOVED_INDEX_BITS, MOVED_PARTITION_BITS = 40, 7, 10
_PARTITION_MASK = (1 << MOVED_PARTITION_BITS) - 1


def stamp_of(topic_code: int, offset: int, index: int) -> Stamp:
    return _stamp(topic_code, offset * STAMP_SPAN + index)


def moved_stamp_of(topic_code: int, partition: int, offset: int, index: int) -> Stamp | None:
    """The stamp of an event read at (topic, partition, offset, index) and moved to another
    partition; None when the origin does not fit a stamp (see :data:`MOVED_CODE`)."""
    if offset >> MOVED_OFFSET_BITS or index >> MOVED_INDEX_BITS or partition >> MOVED_PARTITION_BITS:
        return None
    position = ((offset << MOVED_INDEX_BITS | index) << MOVED_PARTITION_BITS) | partition
    return _stamp(MOVED_CODE | topic_code, position)


def _stamp(topic_code: int, position: int) -> Stamp:
    return (position << STAMP_SHIFT) | _STAMP_MARK | topic_code


_MOVED_KEYS: dict[tuple[int, int], str] = {}


def _moved_key(code: int, position: int) -> str:
    """The positions key of a moved event: "<code>.<origin partition>"."""
    origin = (code, position & _PARTITION_MASK)
    key = _MOVED_KEYS.get(origin)
    if key is None:
        key = _MOVED_KEYS[origin] = f"{code}.{origin[1]}"
    return key


@dataclass(frozen=True, slots=True)
class Rules:
    """The settings the rules need: window sizes (seconds, ascending), allowed lateness
    (seconds) and the bot-click heuristic's delay after delivery (0: off)."""

    sizes: tuple[int, ...]
    lateness: int
    bot_click_seconds: float = 0.0


def apply_event(
    event: dict[str, Any],
    stamp: Stamp,
    record: SubscriberRecord,
    partial: Partial,
    *,
    now: float,
    windows: Iterable[int],
    lateness: int,
    bot_click_seconds: float = 0.0,
) -> bool:
    """:func:`apply` with the rules' settings as keywords."""
    return apply(event, stamp, record, partial, Rules(tuple(windows), lateness, bot_click_seconds), now)


# The fields of an event id's entry in a record (a list, as stored): its stamp, the decision
# word (lateness per window size, heuristic bot, sizes not decided yet), when it was first
# seen (wall clock, for the redelivery horizon) and what it gained (a flag word).
STAMP, DECISION, SEEN, GAINED = range(4)

_TOPIC_KEYS = tuple(str(code) for code in range(1 << TOPIC_BITS))  # str(topic code), without formatting
_WINDOW_KEYS = window_key_cache()  # (size, start) -> "size:start", looked up inline


def apply(
    event: dict[str, Any], stamp: Stamp, record: SubscriberRecord, partial: Partial, rules: Rules, now: float
) -> bool:
    """Apply one validated event; return whether the subscriber record changed.

    Idempotent for a given stamp: applying the same (event, stamp) again changes nothing,
    and applying it to an older partial (a replay after a crash) adds exactly what it added
    the first time, from what the record remembers.
    """
    code = stamp & _TOPIC_MASK
    position = stamp >> STAMP_SHIFT
    tkey = _TOPIC_KEYS[code] if code < MOVED_CODE else _moved_key(code, position)
    positions = partial.positions
    if positions.get(tkey, -1) >= position:
        return False  # this partial already counted it (replay after a crash)
    positions[tkey] = position
    partial.seq += 1

    kind = event["type"]
    entry = record.ids.get(event["event_id"])
    fresh = entry is None
    if fresh:
        entry = record.ids[event["event_id"]] = _first_sight(event, stamp, record, partial, tkey, rules, now)
        decided_now = LATE_BITS  # every size
    elif entry[STAMP] != stamp:
        partial.duplicates += 1  # a redelivery: first seen at another position
        return False
    elif entry[DECISION] >> UNDECIDED_SHIFT:
        decided_now = _decide_added_sizes(event, entry, partial, tkey, rules)
    else:
        decided_now = 0  # a replay: everything was decided when first seen
    changed = decided_now != 0

    if kind == "conversion" and event.get("order_id"):
        first = record.orders.setdefault(event["order_id"], stamp)
        changed = changed or first is stamp
        if first != stamp:
            partial.duplicates += 1  # the same order again, under a new event id
            return changed
    if kind == "delivery" and _note_delivery(event["timestamp"], record):
        changed = True
    window_counts, extra = _count_totals(event, kind, entry[DECISION], partial, tkey, rules.sizes)
    _count_uniques(event, kind, extra, entry, record, partial.totals, window_counts, fresh, decided_now)
    return changed


def _first_sight(
    event: dict[str, Any],
    stamp: Stamp,
    record: SubscriberRecord,
    partial: Partial,
    tkey: str,
    rules: Rules,
    now: float,
) -> list[int]:
    """A new entry for an event seen for the first time, with the decisions a replay reuses."""
    timestamp = event["timestamp"]
    seen, evicted = partial.watermarks.get(tkey, 0.0), partial.evicted
    decision = 0
    if seen > timestamp + rules.lateness or evicted:  # else no window of it can be closed
        decision = _late_mask(timestamp, rules.sizes, LATE_BITS, seen, rules.lateness, evicted)
    # Heuristic: an e-mail click within seconds of its delivery is a link scanner's (a human
    # needs longer to open and read). Decided once, when the delivery is already known, and
    # stored like lateness, so a replay decides the same.
    delivered = record.delivered
    if (
        delivered is not None
        and rules.bot_click_seconds
        and event["type"] == "click"
        and event["channel"] == "email"
        and not event.get("bot")
        and 0 <= timestamp - delivered <= rules.bot_click_seconds
    ):
        decision |= HEURISTIC_BOT
    return [stamp, decision, int(now), 0]


def _decide_added_sizes(
    event: dict[str, Any], entry: list[int], partial: Partial, tkey: str, rules: Rules
) -> int:
    """A replay of an event first applied before window sizes were added: decide their
    lateness now and store it; return the sizes decided (their unique flags follow)."""
    undecided = entry[DECISION] >> UNDECIDED_SHIFT
    seen = partial.watermarks.get(tkey, 0.0)
    late = _late_mask(event["timestamp"], rules.sizes, undecided, seen, rules.lateness, partial.evicted)
    entry[DECISION] = (entry[DECISION] & ~(undecided << UNDECIDED_SHIFT)) | late
    return undecided


def _late_mask(
    timestamp: float, sizes: tuple[int, ...], which: int, seen: float, lateness: int, evicted: dict[str, int]
) -> int:
    """Bit i set for each size i in ``which`` whose window of ``timestamp`` is already closed.

    Lateness is judged against the event time seen on the event's own topic partition: the
    order within it is the order produced, while topics are consumed at their own pace.
    """
    mask = 0
    for i, size in enumerate(sizes):
        if which >> i & 1:
            start = int(timestamp // size) * size
            if start + size + lateness <= seen or (evicted and start <= evicted.get(str(size), -1)):
                mask |= 1 << i
    return mask


def _note_delivery(timestamp: float, record: SubscriberRecord) -> bool:
    """Keep the first delivery's time (the bot-click heuristic measures from it)."""
    if record.delivered is None or timestamp < record.delivered:
        record.delivered = timestamp
        return True
    return False


def _count_totals(
    event: dict[str, Any], kind: str, decision: int, partial: Partial, tkey: str, sizes: tuple[int, ...]
) -> tuple[list[tuple[int, str, dict[str, int]]], str | None]:
    """Count the event in the totals, its source, the watermark and every window it is not
    late for; return those windows as (size index, key, counts) and its extra count name."""
    timestamp = event["timestamp"]
    sources = partial.sources
    source = event.get("source") or "canonical"
    sources[source] = sources.get(source, 0) + 1
    watermarks = partial.watermarks
    if timestamp > watermarks.get(tkey, 0.0):
        watermarks[tkey] = timestamp
    elif tkey not in watermarks:
        watermarks[tkey] = 0.0
    late_mask = decision & ((1 << len(sizes)) - 1)  # the configured sizes' bits, not a removed one's
    if late_mask:
        partial.late += 1  # still counted in "all", and visible as late
    pwindows = partial.windows
    window_counts: list[tuple[int, str, dict[str, int]]] = []
    for i, size in enumerate(sizes):
        if not late_mask & (1 << i):
            start = int(timestamp // size) * size
            key = _WINDOW_KEYS.get((size, start)) or window_key(size, start)
            counts = pwindows.get(key)
            if counts is None:
                counts = pwindows[key] = {}
            window_counts.append((i, key, counts))

    if kind == "open":
        extra = "machine_open" if event.get("machine") else None
    elif kind == "click":
        extra = "bot_click" if event.get("bot") or decision & HEURISTIC_BOT else None
    else:
        extra = None
    totals = partial.totals
    totals[kind] = totals.get(kind, 0) + 1
    for _, _, counts in window_counts:
        counts[kind] = counts.get(kind, 0) + 1
    if extra is not None:
        totals[extra] = totals.get(extra, 0) + 1
        for _, _, counts in window_counts:
            counts[extra] = counts.get(extra, 0) + 1
    return window_counts, extra


def _count_uniques(
    event: dict[str, Any],
    kind: str,
    extra: str | None,
    entry: list[int],
    record: SubscriberRecord,
    totals: dict[str, int],
    window_counts: list[tuple[int, str, dict[str, int]]],
    fresh: bool,
    decided_now: int,
) -> None:
    """Count the distinct-subscriber counts the event made its subscriber part of.

    First seen: the flags the record lacked, lifetime and per window, are set and stored as
    what the event gained. Replayed: what it gained then (of what it can gain: a record
    upgraded from stamps per flag knows only which flags hold its stamp), plus, in sizes
    added since, what it gains now.
    """
    kind_key = (kind, event["channel"], extra)
    want = _UNIQUE_BY_KIND.get(kind_key)
    if want is None:
        want = _UNIQUE_BY_KIND[kind_key] = _unique_flags(*kind_key)
    if not want:
        return
    gained = entry[GAINED]
    if fresh:
        gained = want & ~record.unique
        record.unique |= gained
    if decided_now:
        # the flags of ``want`` the record lacks in each window (of the sizes decided now)
        # the event is counted in; inline, as this runs for nearly every event
        rwindows = record.windows
        for i, key, _ in window_counts:
            if decided_now >> i & 1:
                have = rwindows.get(key, 0)
                flags = want & ~have
                if flags:
                    rwindows[key] = have | flags
                    gained |= flags << (i + 1) * NAME_SPAN
        entry[GAINED] = gained
    if gained:
        for uname in _UNIQUE_NAMES[gained & want]:
            totals[uname] = totals.get(uname, 0) + 1
        for i, _, counts in window_counts:
            for uname in _UNIQUE_NAMES[(gained >> (i + 1) * NAME_SPAN) & want]:
                counts[uname] = counts.get(uname, 0) + 1


# flag word (of one count set) -> the "unique_*" counts it bumps
_UNIQUE_NAMES = tuple(
    tuple(f"unique_{name}" for name, bit in NAME_BITS.items() if word & bit) for word in range(1 << NAME_SPAN)
)

# unique_counts() as a flag word by (type, channel, extra count), filled as kinds are met: the
# types and channels are validated, so it stays a few dozen entries
_UNIQUE_BY_KIND: dict[tuple[str, str, str | None], int] = {}


def _unique_flags(kind: str, channel: str, extra: str | None) -> int:
    bot, machine = extra == "bot_click", extra == "machine_open"
    return flags_of(unique_counts({"type": kind, "channel": channel, "bot": bot, "machine": machine}))


def unique_counts(event: dict[str, Any]) -> tuple[str, ...]:
    """Which distinct-subscriber counts an event can make its subscriber part of.

    A click proves the mail was opened (image-blocking clients send no open); a machine open
    or a scanner's click proves nothing about a human reader.
    """
    kind = event["type"]
    if kind == "click" and event["channel"] == "ads":
        return ("click",)  # an ad click says nothing about opening a mail
    if kind == "click":
        return ("click", "open") if event.get("bot") else ("click", "open", "human_open")
    if kind == "open":
        return ("open",) if event.get("machine") else ("open", "human_open")
    if kind == "conversion":
        return ("conversion",)
    return ()
