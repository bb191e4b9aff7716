"""Generated events with realistic distributions, and their exact expected counts.

Campaign popularity is Zipf-distributed over ``campaigns`` campaigns; subscriber activity is
Zipf-like over ``subscribers`` subscribers (a few click a lot, most click once or twice);
5 % of clicks come from link scanners (``bot``); ``redeliveries`` of the events are sent again
later with the same ``event_id`` (what providers do when a webhook answer is slow). Event time
advances through a 20-minute span with up to 20 s of jitter, so nothing is late for the
bench's 1-minute windows and all windows stay retained.
"""

from __future__ import annotations

import bisect
import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.simulation.truth import from_stream

WINDOW = 60  # the bench's event-time window (1 minute)
SPAN = 20 * 60  # event-time span of a run
JITTER = 20.0


def _cum_weights(n: int, s: float) -> list[float]:
    return list(itertools.accumulate(1.0 / (k**s) for k in range(1, n + 1)))


@dataclass
class Workload:
    events: list[dict[str, Any]]  # in the order they are sent (redeliveries included)
    distinct: int
    redelivered: int
    campaigns: int
    subscribers: int
    expected: dict[str, dict[str, Any]] = field(default_factory=dict)  # "channel|campaign" -> counts

    @property
    def total(self) -> int:
        return len(self.events)


def generate(
    events: int,
    *,
    campaigns: int = 100,
    subscribers: int = 20_000,
    redeliveries: float = 0.10,
    seed: int = 7,
    hot_campaign: str | None = None,
    start: float | None = None,
) -> Workload:
    """``events`` messages in total, of which about ``redeliveries`` are repeats."""
    rng = random.Random(seed)
    start = (time.time() - SPAN - 600) if start is None else start
    camp_cw = _cum_weights(campaigns, 1.1)
    sub_cw = _cum_weights(subscribers, 0.7)
    sub_ids = [f"s{n:07d}" for n in rng.sample(range(10 * subscribers), subscribers)]
    redelivered = round(events * redeliveries)
    distinct = events - redelivered
    originals: list[dict[str, Any]] = []
    for i in range(distinct):
        if hot_campaign is not None:
            campaign = hot_campaign
        else:
            campaign = f"camp-{bisect.bisect_left(camp_cw, rng.random() * camp_cw[-1]):03d}"
        sub = sub_ids[min(bisect.bisect_left(sub_cw, rng.random() * sub_cw[-1]), subscribers - 1)]
        event = {
            "event_id": f"ev-{seed}-{i:09d}",
            "type": "click",
            "channel": "email",
            "campaign_id": campaign,
            "subscriber_id": sub,
            "timestamp": round(start + SPAN * i / distinct + rng.random() * JITTER, 3),
            "url": "https://shop.example.com/sale",
        }
        if rng.random() < 0.05:
            event["bot"] = True
        originals.append(event)
    # a redelivery follows its original after a short delay (up to ~1000 events later)
    out: list[dict[str, Any]] = []
    repeats = sorted((rng.randrange(distinct), rng.randint(1, 1000)) for _ in range(redelivered))
    pending: list[tuple[int, int]] = []  # (due index, original index)
    r = 0
    for i, event in enumerate(originals):
        out.append(event)
        while r < len(repeats) and repeats[r][0] == i:
            bisect.insort(pending, (i + repeats[r][1], i))
            r += 1
        while pending and pending[0][0] <= i:
            out.append(originals[pending.pop(0)[1]])
    out.extend(originals[j] for _, j in pending)
    workload = Workload(out, distinct, redelivered, campaigns, subscribers)
    workload.expected = expected_counts(out)
    return workload


def expected_counts(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """What the pipeline must report per campaign (totals, uniques, duplicates, 1-minute
    windows), from the shared ground truth (:mod:`pipeline.simulation.truth`)."""
    truth = from_stream(events, (WINDOW,))
    out = {}
    for channel, campaign in truth.totals:
        expected = truth.expected(channel, campaign)
        out[f"{channel}|{campaign}"] = {
            "counts": expected["counts"],
            "windows": expected["windows"],
            "duplicates": expected["duplicates"],
        }
    return out


def clicker_counts(expected: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The simple job (total and unique clickers, overall and per window) from the full truth."""
    return {
        key: {
            "click": doc["counts"].get("click", 0),
            "unique_click": doc["counts"].get("unique_click", 0),
            "windows": {
                w: [c.get("click", 0), c.get("unique_click", 0)] for w, c in sorted(doc["windows"].items())
            },
        }
        for key, doc in expected.items()
    }
