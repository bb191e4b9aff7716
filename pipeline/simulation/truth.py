"""The ground truth: what the pipeline must report for a stream of events, counted by sets.

One oracle for everything that checks numbers: the simulator keeps it beside the traffic it
writes, ``pipeline bench`` checks its runs against it, and the tests compare every count,
window and rate with it. It follows the contract's definitions directly and shares no code
with the pipeline's rules.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Truth:
    """Expected counts per (channel, campaign): lifetime and per window."""

    windows: tuple[int, ...]
    totals: dict[tuple[str, str], dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    window_counts: dict[tuple[str, str], dict[str, dict[str, int]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(dict))
    )
    duplicates: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    late: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    _unique: set[tuple[Any, ...]] = field(default_factory=set)

    def _bump(self, counts: dict[str, int], name: str) -> None:
        counts[name] = counts.get(name, 0) + 1

    def count(self, event: dict[str, Any], late: bool) -> None:
        """Record one original (not redelivered, not a repeated order) event."""
        key = (event["channel"], event["campaign_id"])
        kind = event["type"]
        names = [kind]
        if kind == "open" and event.get("machine"):
            names.append("machine_open")
        if kind == "click" and event.get("bot"):
            names.append("bot_click")
        uniques = {
            "click": ["click"]
            if event["channel"] == "ads"
            else ["click", "open"] + ([] if event.get("bot") else ["human_open"]),
            "open": ["open"] + ([] if event.get("machine") else ["human_open"]),
            "conversion": ["conversion"],
        }.get(kind, [])
        if late:
            self.late[key] += 1
        buckets = [("all", self.totals[key])]
        if not late:
            for size in self.windows:
                start = int(event["timestamp"] // size) * size
                buckets.append((f"{size}:{start}", self.window_counts[key][f"{size}:{start}"]))
        for bucket, counts in buckets:
            for name in names:
                self._bump(counts, name)
            for name in uniques:
                marker = (key, bucket, name, event["subscriber_id"])
                if marker not in self._unique:
                    self._unique.add(marker)
                    self._bump(counts, f"unique_{name}")

    def expected(self, channel: str, campaign: str) -> dict[str, Any]:
        key = (channel, campaign)
        return {
            "counts": dict(self.totals[key]),
            "windows": {k: dict(v) for k, v in self.window_counts[key].items()},
            "duplicates": self.duplicates[key],
            "late": self.late[key],
        }


def from_stream(
    events: Iterable[dict[str, Any]], windows: tuple[int, ...], late_ids: Iterable[str] = ()
) -> Truth:
    """The truth of a stream in the order it was sent: an event id seen before, or an order
    already counted for the campaign, is a duplicate; events in ``late_ids`` are late."""
    truth = Truth(tuple(windows))
    late = set(late_ids)
    seen: set[str] = set()
    orders: set[tuple[str, str, str]] = set()
    for event in events:
        campaign = (event["channel"], event["campaign_id"])
        if event["event_id"] in seen:
            truth.duplicates[campaign] += 1
            continue
        seen.add(event["event_id"])
        order = event.get("order_id")
        if order:
            if (*campaign, order) in orders:
                truth.duplicates[campaign] += 1
                continue
            orders.add((*campaign, order))
        truth.count(event, late=event["event_id"] in late)
    return truth
