"""Redelivery and uniqueness rules, free of I/O: what one event adds to the counts.

State lives in two kinds of records, both on the partition of the subscriber:

* a :class:`SubscriberRecord` per (channel, campaign, subscriber) holds the event ids seen
  (for redelivery), the order ids seen (a conversion counts once per order) and, per count and
  per window, *which event first made the subscriber unique*;
* a :class:`Partial` per (partition, channel, campaign) holds the cumulative counts of that
  partition and, per source topic, the position of the last event applied to it.

Exactness through crashes without broker transactions: every decision about an event is
written into the subscriber record together with the event's position (its *stamp*: topic,
offset, index in the message). Replaying an event after a crash finds its own stamp there and
recomputes exactly the same contribution; a redelivery finds another stamp and is a duplicate.
A partial skips events at or before its own position, so it never adds one twice. Records are
written before partials, so a partial never counts an event its subscriber record lacks.
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

Stamp = list[int]  # [topic code, offset * STAMP_SPAN + index within the message]
STAMP_SPAN = 1 << 16  # a message carries at most this many events


def stamp_of(topic_code: int, offset: int, index: int) -> Stamp:
    return [topic_code, offset * STAMP_SPAN + index]


def window_start(timestamp: float, size: int) -> int:
    return int(timestamp // size) * size


@dataclass
class SubscriberRecord:
    ids: dict[str, list[Any]] = field(default_factory=dict)  # event_id -> [t, s, late mask, seen_at]
    unique: dict[str, Stamp] = field(default_factory=dict)  # count -> stamp that made it unique
    windows: dict[str, dict[str, Stamp]] = field(default_factory=dict)  # "300:start" -> same
    orders: dict[str, Stamp] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"i": self.ids, "u": self.unique, "w": self.windows, "o": self.orders}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SubscriberRecord:
        return cls(doc.get("i", {}), doc.get("u", {}), doc.get("w", {}), doc.get("o", {}))

    def prune(self, now: float, retention: float, evicted: dict[str, int]) -> None:
        """Forget event ids past the redelivery horizon and flags of windows closed for good."""
        horizon = now - retention
        self.ids = {k: v for k, v in self.ids.items() if v[3] >= horizon}
        for key in list(self.windows):
            size, start = key.split(":")
            if int(start) <= evicted.get(size, -1):
                del self.windows[key]


@dataclass
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
        by_size: dict[int, list[int]] = {}
        for key in self.windows:
            size, start = (int(part) for part in key.split(":"))
            by_size.setdefault(size, []).append(start)
        for size, starts in by_size.items():
            starts.sort()
            for start in starts[:-retention]:
                del self.windows[f"{size}:{start}"]
                self.evicted[str(size)] = max(self.evicted.get(str(size), -1), start)


def _bump(counts: dict[str, int], name: str) -> None:
    counts[name] = counts.get(name, 0) + 1


def apply_event(
    event: dict[str, Any],
    stamp: Stamp,
    record: SubscriberRecord,
    partial: Partial,
    *,
    now: float,
    windows: Iterable[int],
    lateness: int,
) -> bool:
    """Apply one validated event; return whether the subscriber record changed.

    Idempotent for a given stamp: applying the same (event, stamp) again changes nothing.
    """
    topic, position = stamp
    if partial.positions.get(str(topic), -1) >= position:
        return False  # this partial already counted it (replay after a crash)
    partial.positions[str(topic)] = position
    partial.seq += 1
    timestamp = event["timestamp"]
    changed = False

    sizes = list(windows)
    entry = record.ids.get(event["event_id"])
    if entry is None:
        # Lateness is judged against the event time seen on the event's own topic partition:
        # the order within it is the order produced, while topics are consumed at their own
        # pace. Bit i set: too late for window sizes[i]; stored, so a replay decides the same.
        seen = partial.watermarks.get(str(topic), 0.0)
        late_mask = sum(
            1 << i
            for i, size in enumerate(sizes)
            if window_start(timestamp, size) + size + lateness <= seen
            or window_start(timestamp, size) <= partial.evicted.get(str(size), -1)
        )
        entry = record.ids[event["event_id"]] = [topic, position, late_mask, int(now)]
        changed = True
    if entry[0] != topic or entry[1] != position:
        partial.duplicates += 1  # a redelivery: first seen at another position
        return changed

    kind = event["type"]
    order_id = event.get("order_id")
    if kind == "conversion" and order_id:
        first = record.orders.setdefault(order_id, stamp)
        changed = changed or first is stamp
        if first != stamp:
            partial.duplicates += 1  # the same order again, under a new event id
            return changed

    late_mask = entry[2]
    _bump(partial.sources, event.get("source") or "canonical")
    partial.watermarks[str(topic)] = max(partial.watermarks.get(str(topic), 0.0), timestamp)
    if late_mask:
        partial.late += 1  # still counted in "all", and visible as late
    window_keys = [
        f"{size}:{window_start(timestamp, size)}" for i, size in enumerate(sizes) if not late_mask & (1 << i)
    ]

    names = [kind]
    if kind == "open" and event.get("machine"):
        names.append("machine_open")
    if kind == "click" and event.get("bot"):
        names.append("bot_click")
    for name in names:
        _bump(partial.totals, name)
        for key in window_keys:
            _bump(partial.windows.setdefault(key, {}), name)

    for name in unique_counts(event):
        first = record.unique.setdefault(name, stamp)
        changed = changed or first is stamp
        if first == stamp:
            _bump(partial.totals, f"unique_{name}")
        for key in window_keys:
            first = record.windows.setdefault(key, {}).setdefault(name, stamp)
            changed = changed or first is stamp
            if first == stamp:
                _bump(partial.windows.setdefault(key, {}), f"unique_{name}")
    return changed


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
