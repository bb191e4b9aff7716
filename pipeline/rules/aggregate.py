"""Combine the per-partition partial counts of a campaign into its funnel, free of I/O.

The aggregating agent keeps, per campaign, the latest snapshot of each partition's
:class:`~pipeline.rules.dedupe.Partial`. Snapshots are cumulative, so keeping the newest one per
partition (by ``seq``) is idempotent: a resent or replayed snapshot changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pipeline.rules.dedupe import COUNT_NAMES
from pipeline.rules.rates import compute_rates
from pipeline.state.codec import Partial, split_window_key


def merge_snapshot(stored: dict[int, Partial], partition: int, snapshot: Partial) -> bool:
    """Keep ``snapshot`` for ``partition`` if it is newer; return whether it was kept.

    A snapshot of the same ``seq`` is the same partial (a resend, or a replay after a crash,
    which recomputes it identically), so it changes nothing: the resend of every partial each
    30 s does not rewrite every campaign.
    """
    current = stored.get(partition)
    if current is not None and current.seq >= snapshot.seq:
        return False
    stored[partition] = snapshot
    return True


def _add(into: dict[str, int], counts: Mapping[str, int]) -> None:
    for name, value in counts.items():
        into[name] = into.get(name, 0) + value


@dataclass
class WindowView:
    size: int
    start: int
    counts: dict[str, int]

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass
class CampaignView:
    channel: str
    campaign: str
    totals: dict[str, int] = field(default_factory=dict)
    windows: dict[int, dict[int, dict[str, int]]] = field(default_factory=dict)  # size -> start ->
    watermark: float = 0.0
    duplicates: int = 0
    late: int = 0
    sources: dict[str, int] = field(default_factory=dict)

    def complete_window(self, size: int, lateness: int) -> WindowView | None:
        """The most recent window that can no longer change (its end plus lateness has passed)."""
        if self.watermark <= 0:
            return None
        start = int((self.watermark - lateness) // size) * size - size
        if start < 0:
            return None
        return WindowView(size, start, dict(self.windows.get(size, {}).get(start, {})))

    def complete_windows(self, labels: Mapping[int, str], lateness: int) -> list[tuple[str, WindowView]]:
        """``(label, window)`` for each window size that has a complete window to show."""
        shown = ((label, self.complete_window(size, lateness)) for size, label in labels.items())
        return [(label, window) for label, window in shown if window is not None]

    def rates(self, counts: Mapping[str, int], denominator: str, unsupported: frozenset[str]) -> dict:
        return compute_rates(self.channel, counts, denominator, unsupported)


def combine(channel: str, campaign: str, partials: Iterable[Partial]) -> CampaignView:
    view = CampaignView(channel, campaign)
    for partial in partials:
        _add(view.totals, partial.totals)
        for key, counts in partial.windows.items():
            size, start = split_window_key(key)
            _add(view.windows.setdefault(int(size), {}).setdefault(start, {}), counts)
        view.watermark = max(view.watermark, partial.watermark)
        view.duplicates += partial.duplicates
        view.late += partial.late
        _add(view.sources, partial.sources)
    for name in COUNT_NAMES:
        view.totals.setdefault(name, 0)
    return view
