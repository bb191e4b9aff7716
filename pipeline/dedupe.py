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
from dataclasses import dataclass, field
from typing import Any

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
UNIQUE_EVENTS = ("click", "open", "human_open", "conversion")
COUNT_NAMES = TOTAL_EVENTS + tuple(f"unique_{name}" for name in UNIQUE_EVENTS)

Stamp = int  # an event's position: offset * STAMP_SPAN + index, topic code, in one int
STAMP_SPAN = 1 << 16  # a message carries at most this many events
# stamp = position << 7 | 1 << 6 | topic code: one int (cheap to store, compare and encode),
# never 0, and ordered like positions within a topic
TOPIC_BITS = 6
STAMP_SHIFT = TOPIC_BITS + 1  # the next event of the same message: stamp + (1 << STAMP_SHIFT)
_STAMP_MARK = 1 << TOPIC_BITS
_TOPIC_MASK = _STAMP_MARK - 1


def stamp_of(topic_code: int, offset: int, index: int) -> Stamp:
    return _stamp(topic_code, offset * STAMP_SPAN + index)


def _stamp(topic_code: int, position: int) -> Stamp:
    return (position << STAMP_SHIFT) | _STAMP_MARK | topic_code


# Bit of each distinct-subscriber count in a record's flag words, in UNIQUE_EVENTS order.
NAME_BITS = {name: 1 << index for index, name in enumerate(UNIQUE_EVENTS)}
_NAME_SPAN = len(UNIQUE_EVENTS)  # the flags an event gained in window i: bits (i + 1) * _NAME_SPAN on


class SubscriberRecord:
    """What is known of one subscriber in one campaign; stored as a small orjson array.

    ``ids``: event id -> [stamp, decision word, seen at (wall-clock seconds), gained];
    ``unique``: flag word of the counts (:data:`NAME_BITS`) the subscriber is part of;
    ``windows``: "size:start" -> the same per window; ``orders``: order id -> stamp;
    ``delivered``: event time of the first delivery (bot-click heuristic).

    *gained* is the flag word of what the event made the subscriber part of: its lifetime
    flags in the low bits, then the flags of window size ``i`` (of the configured sizes) at
    ``(i + 1) * len(UNIQUE_EVENTS)``. A replay counts exactly those again. Flag words instead
    of a stamp per name and window keep a record at about a dozen objects: every event costs a
    decode, an encode and a free of its record, and that cost is per object.
    """

    __slots__ = ("delivered", "ids", "orders", "unique", "windows")

    def __init__(self) -> None:
        self.ids: dict[str, list[int]] = {}
        self.unique: int = 0
        self.windows: dict[str, int] = {}
        self.orders: dict[str, Stamp] = {}
        self.delivered: float | None = None

    def to_json(self) -> list[Any]:
        return [self.ids, self.unique, self.windows, self.orders, self.delivered]

    @classmethod
    def from_json(cls, doc: list[Any] | dict[str, Any], sizes: tuple[int, ...] = ()) -> SubscriberRecord:
        """Decode a stored record; ``sizes`` (the configured windows) upgrade an older format."""
        if type(doc) is not list:
            if not doc:
                return cls()
            doc = _upgrade_record(doc, sizes)
        record = cls.__new__(cls)  # no empty containers made only to be replaced: once per read
        record.ids, record.unique, record.windows, record.orders, record.delivered = doc
        return record

    def prune(self, now: float, retention: float, evicted: dict[str, int]) -> None:
        """Forget event ids past the redelivery horizon and flags of windows closed for good."""
        horizon = now - retention
        # ids are kept in the order they were first seen, so the oldest is the first (up to
        # clock differences between workers, which only keep an id a little longer)
        for entry in self.ids.values():
            if entry[2] < horizon:
                self.ids = {k: v for k, v in self.ids.items() if v[2] >= horizon}
            break
        if evicted and self.windows:
            for key in list(self.windows):
                size, start = _split_window_key(key)
                if start <= evicted.get(size, -1):
                    del self.windows[key]


def _upgrade_record(doc: dict[str, Any], sizes: tuple[int, ...]) -> list[Any]:
    """A record of an earlier format: a stamp per count and window instead of flag words.

    Two formats: stamps as [topic, position] pairs under "i", and int stamps under "e". An
    event's *gained* word is rebuilt from the stamps: it gained the flags that hold its stamp.
    """
    if "i" in doc:
        doc = {
            "e": {k: [_stamp(v[0], v[1]), v[2], v[3]] for k, v in doc.get("i", {}).items()},
            "u": {k: _stamp(*v) for k, v in doc.get("u", {}).items()},
            "w": {w: {k: _stamp(*v) for k, v in f.items()} for w, f in doc.get("w", {}).items()},
            "o": {k: _stamp(*v) for k, v in doc.get("o", {}).items()},
            "d": doc.get("d"),
        }
    unique: dict[str, Stamp] = doc.get("u", {})
    windows: dict[str, dict[str, Stamp]] = doc.get("w", {})
    index = {str(size): i for i, size in enumerate(sizes)}
    ids = {}
    for event_id, (stamp, decision, seen, *_) in doc.get("e", {}).items():
        gained = _flags(name for name, first in unique.items() if first == stamp)
        for key, flags in windows.items():
            i = index.get(_split_window_key(key)[0])
            if i is not None:
                names = (name for name, first in flags.items() if first == stamp)
                gained |= _flags(names) << (i + 1) * _NAME_SPAN
        ids[event_id] = [stamp, decision, seen, gained]
    return [
        ids,
        _flags(unique),
        {key: _flags(flags) for key, flags in windows.items()},
        dict(doc.get("o", {})),
        doc.get("d"),
    ]


def _flags(names: Iterable[str]) -> int:
    word = 0
    for name in names:
        word |= NAME_BITS.get(name, 0)
    return word


_SPLIT_KEYS: dict[str, tuple[str, int]] = {}


def _split_window_key(key: str) -> tuple[str, int]:
    """ "size:start" -> ("size", start): the size stays a string, as in ``Partial.evicted``."""
    parts = _SPLIT_KEYS.get(key)
    if parts is None:
        if len(_SPLIT_KEYS) > 100_000:
            _SPLIT_KEYS.clear()
        size, start = key.split(":")
        parts = _SPLIT_KEYS[key] = (size, int(start))
    return parts


@dataclass(slots=True)
class Partial:
    """Cumulative counts of one campaign on one partition; sent whole, so resending is harmless."""

    positions: dict[str, int] = field(default_factory=dict)  # topic code -> last stamp applied
    seq: int = 0  # events applied; a newer snapshot of the same partial has a larger seq
    watermarks: dict[str, float] = field(default_factory=dict)  # topic code -> highest event time
    totals: dict[str, int] = field(default_factory=dict)
    windows: dict[str, dict[str, int]] = field(default_factory=dict)  # "300:start" -> counts
    duplicates: int = 0
    late: int = 0
    sources: dict[str, int] = field(default_factory=dict)  # adapter -> events counted
    evicted: dict[str, int] = field(default_factory=dict)  # window size -> newest start dropped

    def to_json(self) -> dict[str, Any]:
        return {
            "v": self.positions,
            "q": self.seq,
            "wm": self.watermarks,
            "t": self.totals,
            "w": self.windows,
            "d": self.duplicates,
            "l": self.late,
            "s": self.sources,
            "x": self.evicted,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Partial:
        return cls(doc["v"], doc["q"], doc["wm"], doc["t"], doc["w"], doc["d"], doc["l"], doc["s"], doc["x"])

    @property
    def watermark(self) -> float:
        return max(self.watermarks.values(), default=0.0)

    def prune(self, retention: int) -> None:
        """Keep the newest ``retention`` windows of each size; older ones are closed for good."""
        if len(self.windows) <= retention:
            return  # no size can have more than that
        by_size: dict[int, list[int]] = {}
        for key in self.windows:
            size, start = (int(part) for part in key.split(":"))
            by_size.setdefault(size, []).append(start)
        for size, starts in by_size.items():
            starts.sort()
            for start in starts[:-retention]:
                del self.windows[f"{size}:{start}"]
                self.evicted[str(size)] = max(self.evicted.get(str(size), -1), start)


_TOPIC_KEYS = tuple(str(code) for code in range(1 << TOPIC_BITS))  # str(topic code), without formatting
_WINDOW_KEYS: dict[tuple[int, int], str] = {}  # (size, start) -> "size:start"


def _window_key(size: int, start: int) -> str:
    key = _WINDOW_KEYS.get((size, start))
    if key is None:
        if len(_WINDOW_KEYS) > 100_000:
            _WINDOW_KEYS.clear()
        key = _WINDOW_KEYS[(size, start)] = f"{size}:{start}"
    return key


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
    """Apply one validated event; return whether the subscriber record changed.

    Idempotent for a given stamp: applying the same (event, stamp) again changes nothing.
    """
    return apply(
        event,
        stamp,
        record,
        partial,
        now,
        windows if type(windows) is tuple else tuple(windows),
        lateness,
        bot_click_seconds,
    )


# Bit of the stored decision word (ids entry [1]) that marks a click judged to be a link
# scanner's by the heuristic; the low bits are the per-window lateness mask.
HEURISTIC_BOT = 1 << 30
_LATE_BITS = HEURISTIC_BOT - 1


def apply(
    event: dict[str, Any],
    stamp: Stamp,
    record: SubscriberRecord,
    partial: Partial,
    now: float,
    sizes: tuple[int, ...],
    lateness: int,
    bot_click_seconds: float = 0.0,
) -> bool:
    """:func:`apply_event` with positional arguments and ``windows`` as a tuple (the hot path)."""
    tkey = _TOPIC_KEYS[stamp & _TOPIC_MASK]
    position = stamp >> STAMP_SHIFT
    positions = partial.positions
    if positions.get(tkey, -1) >= position:
        return False  # this partial already counted it (replay after a crash)
    positions[tkey] = position
    partial.seq += 1
    timestamp = event["timestamp"]
    kind = event["type"]
    changed = False

    ids = record.ids
    event_id = event["event_id"]
    entry = ids.get(event_id)
    fresh = False
    if entry is None:
        # Lateness is judged against the event time seen on the event's own topic partition:
        # the order within it is the order produced, while topics are consumed at their own
        # pace. Bit i set: too late for window sizes[i]; stored, so a replay decides the same.
        seen = partial.watermarks.get(tkey, 0.0)
        evicted = partial.evicted
        late_mask = 0
        if seen > timestamp + lateness or evicted:  # else no window of it can be closed
            for i, size in enumerate(sizes):
                start = int(timestamp // size) * size
                if start + size + lateness <= seen or (evicted and start <= evicted.get(str(size), -1)):
                    late_mask |= 1 << i
        # Heuristic: an e-mail click within seconds of its delivery is a link scanner's (a
        # human needs longer to open and read). Decided once, when the delivery is already
        # known, and stored with the event like lateness, so a replay decides the same.
        delivered = record.delivered
        if (
            delivered is not None
            and bot_click_seconds
            and kind == "click"
            and event["channel"] == "email"
            and not event.get("bot")
            and 0 <= timestamp - delivered <= bot_click_seconds
        ):
            late_mask |= HEURISTIC_BOT
        entry = ids[event_id] = [stamp, late_mask, int(now), 0]
        changed = fresh = True
    elif entry[0] != stamp:
        partial.duplicates += 1  # a redelivery: first seen at another position
        return changed

    if kind == "conversion":
        order_id = event.get("order_id")
        if order_id:
            first = record.orders.setdefault(order_id, stamp)
            changed = changed or first is stamp
            if first != stamp:
                partial.duplicates += 1  # the same order again, under a new event id
                return changed

    decision = entry[1]
    if kind == "delivery" and (record.delivered is None or timestamp < record.delivered):
        record.delivered = timestamp
        changed = True
    sources = partial.sources
    source = event.get("source") or "canonical"
    sources[source] = sources.get(source, 0) + 1
    watermarks = partial.watermarks
    if timestamp > watermarks.get(tkey, 0.0):
        watermarks[tkey] = timestamp
    elif tkey not in watermarks:
        watermarks[tkey] = 0.0
    late_mask = decision & _LATE_BITS
    if late_mask:
        partial.late += 1  # still counted in "all", and visible as late
    pwindows = partial.windows
    window_counts: list[tuple[int, str, dict[str, int]]] = []  # (size index, key, counts)
    for i, size in enumerate(sizes):
        if not late_mask & (1 << i):
            start = int(timestamp // size) * size
            key = _WINDOW_KEYS.get((size, start)) or _window_key(size, start)
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

    kind_key = (kind, event["channel"], extra)
    want = _UNIQUE_BY_KIND.get(kind_key)
    if want is None:
        want = _UNIQUE_BY_KIND[kind_key] = _unique_flags(*kind_key)
    if want:
        if fresh:
            # the flags this event sets first: lifetime, then each window it is counted in
            gained = want & ~record.unique
            record.unique |= gained
            rwindows = record.windows
            for i, key, _ in window_counts:
                have = rwindows.get(key, 0)
                flags = want & ~have
                if flags:
                    rwindows[key] = have | flags
                    gained |= flags << (i + 1) * _NAME_SPAN
            entry[3] = gained
        else:
            # a replay: what the event gained when first applied (of what it can gain: a
            # record upgraded from stamps per flag knows only which flags hold its stamp)
            gained = entry[3]
        if gained:
            for uname in _UNIQUE_NAMES[gained & want]:
                totals[uname] = totals.get(uname, 0) + 1
            for i, _, counts in window_counts:
                for uname in _UNIQUE_NAMES[(gained >> (i + 1) * _NAME_SPAN) & want]:
                    counts[uname] = counts.get(uname, 0) + 1
    return changed


# flag word (of one count set) -> the "unique_*" counts it bumps
_UNIQUE_NAMES = tuple(
    tuple(f"unique_{name}" for name, bit in NAME_BITS.items() if word & bit)
    for word in range(1 << _NAME_SPAN)
)

# unique_counts() as a flag word by (type, channel, extra count), filled as kinds are met: the
# types and channels are validated, so it stays a few dozen entries
_UNIQUE_BY_KIND: dict[tuple[str, str, str | None], int] = {}


def _unique_flags(kind: str, channel: str, extra: str | None) -> int:
    bot, machine = extra == "bot_click", extra == "machine_open"
    return _flags(unique_counts({"type": kind, "channel": channel, "bot": bot, "machine": machine}))


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
