#!/usr/bin/env python3
"""Generate ``deploy/prometheus/rules/funnel.rules.yml``.

The recording rules are regular but long (8 rates x 2 channels x lifetime/windowed), so they are
written by this script from one table instead of by hand. Run ``python deploy/prometheus/generate_rules.py``
after editing; ``tests/deploy/test_deploy_rules.py`` checks the checked-in file is what this script writes.

Everything lives in ONE rule group, in dependency order, so every rule of an evaluation sees the
results of the rules above it from the same evaluation (Prometheus evaluates a group's rules in
order). Alert parameters (floors, minimum volumes) are in ``rules/funnel.params.yml``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
OUT = HERE / "rules" / "funnel.rules.yml"

# The window the drop alerts look at (the most recent complete event-time window).
ALERT_WINDOW = "5m"

EVENTS = "channel_campaign_event:funnel_events_total:sum"
UNIQUES = "channel_campaign_event:funnel_unique_events_total:sum"
WINDOW_EVENTS = "channel_campaign_window_event:funnel_window_events:sum"
DELIVERED = "channel_campaign:funnel_delivered:sum"
WINDOW_DELIVERED = "channel_campaign_window:funnel_delivered:sum"

# rate -> channel -> (numerator, denominator); a count is (kind, event) with kind
# "events" (total), "unique" (distinct subscribers) or "delivered" (delivery, else send).
RATES: dict[str, dict[str, tuple[tuple[str, str], tuple[str, str]]]] = {
    "ctr": {
        "ads": (("events", "click"), ("events", "impression")),
        "email": (("unique", "click"), ("delivered", "")),
    },
    "unique_ctr": {
        "ads": (("unique", "click"), ("events", "impression")),
        "email": (("unique", "click"), ("delivered", "")),
    },
    "total_ctr": {
        "ads": (("events", "click"), ("events", "impression")),
        "email": (("events", "click"), ("delivered", "")),
    },
    "open_rate": {"email": (("unique", "open"), ("delivered", ""))},
    "human_open_rate": {"email": (("unique", "human_open"), ("delivered", ""))},
    "ctor": {"email": (("unique", "click"), ("unique", "open"))},
    "human_ctor": {"email": (("unique", "click"), ("unique", "human_open"))},
    "cvr": {
        "ads": (("events", "conversion"), ("events", "click")),
        "email": (("events", "conversion"), ("events", "click")),
    },
}

# Rates with a drop alert: rate -> (alert name, min expected successes for the normal approximation)
ALERTED = {"ctr": "FunnelCTRDrop", "human_ctor": "FunnelCTORDrop"}
MIN_EXPECTED = 10


def count(kind: str, event: str, channel: str, windowed: bool) -> str:
    """PromQL for one summed count of one channel (lifetime or windowed)."""
    if kind == "delivered":
        return WINDOW_DELIVERED if windowed else DELIVERED
    if windowed:
        name = event if kind == "events" else f"unique_{event}"
        return f'{WINDOW_EVENTS}{{channel="{channel}",event="{name}"}}'
    metric = EVENTS if kind == "events" else UNIQUES
    return f'{metric}{{channel="{channel}",event="{event}"}}'


def ratio_expr(rate: str, windowed: bool) -> str:
    parts = []
    for channel, (num, den) in RATES[rate].items():
        n = count(*num, channel, windowed)
        d = count(*den, channel, windowed)
        # A zero numerator is a rate of 0 (the counter may not be exported yet); a zero
        # denominator is no sample at all, never NaN or Inf.
        parts.append(f"(\n  ({n}\n    or ignoring(event) ({d} * 0))\n  / ignoring(event)\n  ({d} > 0)\n)")
    return "\nor\n".join(parts) + "\n"


def denominator_expr(rate: str, windowed: bool) -> str:
    parts = []
    for channel, (_num, den) in RATES[rate].items():
        parts.append(f"max without(event) ({count(*den, channel, windowed)})")
    return "\nor\n".join(parts) + "\n"


def level(windowed: bool) -> str:
    return "channel_campaign_window" if windowed else "channel_campaign"


def rules() -> list[dict]:
    out: list[dict] = [
        {
            "record": EVENTS,
            "expr": "sum by (channel, campaign, event) (funnel_events_total)\n",
        },
        {
            "record": UNIQUES,
            "expr": "sum by (channel, campaign, event) (funnel_unique_events_total)\n",
        },
        {
            # Only the workers that show the newest complete window of a campaign count, so a
            # worker that lags (or a partition in mid-move) never mixes two different windows.
            "record": "channel_campaign_window:funnel_window_end_seconds:max",
            "expr": "max by (channel, campaign, window) (funnel_window_end_seconds)\n",
        },
        {
            "record": WINDOW_EVENTS,
            "expr": (
                "sum by (channel, campaign, window, event) (\n"
                "  funnel_window_events\n"
                "  and on(instance, job, channel, campaign, window)\n"
                "  (\n"
                "    funnel_window_end_seconds\n"
                "    == on(channel, campaign, window) group_left()\n"
                "    channel_campaign_window:funnel_window_end_seconds:max\n"
                "  )\n"
                ")\n"
            ),
        },
        {
            # E-mail denominator: deliveries, or sends for providers that report no delivery.
            "record": DELIVERED,
            "expr": (
                "max without(event) (\n"
                f'  ({EVENTS}{{channel="email",event="delivery"}} > 0)\n'
                f'  or ignoring(event) {EVENTS}{{channel="email",event="send"}}\n'
                ")\n"
            ),
        },
        {
            "record": WINDOW_DELIVERED,
            "expr": (
                "max without(event) (\n"
                f'  ({WINDOW_EVENTS}{{channel="email",event="delivery"}} > 0)\n'
                f'  or ignoring(event) {WINDOW_EVENTS}{{channel="email",event="send"}}\n'
                ")\n"
            ),
        },
    ]
    for windowed in (False, True):
        for rate in RATES:
            out.append(
                {"record": f"{level(windowed)}:funnel_{rate}:ratio", "expr": ratio_expr(rate, windowed)}
            )
            out.append(
                {
                    "record": f"{level(windowed)}:funnel_{rate}_denominator:sum",
                    "expr": denominator_expr(rate, windowed),
                }
            )
    for rate in ALERTED:
        lifetime = f"channel_campaign:funnel_{rate}:ratio"
        lifetime_n = f"channel_campaign:funnel_{rate}_denominator:sum"
        recent = f'channel_campaign_window:funnel_{rate}:ratio{{window="{ALERT_WINDOW}"}}'
        recent_n = f'channel_campaign_window:funnel_{rate}_denominator:sum{{window="{ALERT_WINDOW}"}}'
        baseline = f"channel_campaign:funnel_{rate}_baseline:ratio"
        out.append(
            {
                # The campaign's own lifetime rate once it has the volume to be one, otherwise
                # the configured per-channel floor. Kept strictly inside (0, 1) so the
                # binomial variance below is never 0.
                "record": baseline,
                "expr": (
                    "(\n"
                    "  (\n"
                    f"    {lifetime}\n"
                    "    and on(channel, campaign)\n"
                    f"    ({lifetime_n}\n"
                    "      >= on(channel) group_left() "
                    f"channel:funnel_{rate}_alert_baseline_min_volume:count)\n"
                    "  )\n"
                    "  or on(channel, campaign)\n"
                    f"  ({lifetime} * 0 + on(channel) group_left() channel:funnel_{rate}_alert_floor:ratio)\n"
                    ") > 0 < 1\n"
                ),
            }
        )
        out.append(
            {
                # One-sided test of H0 "recent rate = baseline": z = (p0 - p) / sqrt(p0 (1 - p0) / n).
                # Only where the recent window has the configured minimum volume and the normal
                # approximation holds (n * p0 >= MIN_EXPECTED expected successes).
                "record": f"channel_campaign:funnel_{rate}_drop:zscore",
                "expr": (
                    "(\n"
                    f"  ({baseline} - ignoring(window) {recent})\n"
                    "  / ignoring(window)\n"
                    f"  sqrt({baseline} * (1 - {baseline}) / ignoring(window) {recent_n})\n"
                    ")\n"
                    "and on(channel, campaign)\n"
                    f"({recent_n} >= on(channel) group_left() channel:funnel_{rate}_alert_min_volume:count)\n"
                    "and on(channel, campaign)\n"
                    f"({recent_n} * ignoring(window) {baseline} >= {MIN_EXPECTED})\n"
                ),
            }
        )
    return out


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, data: str):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def render() -> str:
    doc = {"groups": [{"name": "funnel_recording", "rules": rules()}]}
    header = (
        "# GENERATED by deploy/prometheus/generate_rules.py -- do not edit by hand.\n"
        "# Recording rules: sum numerators and denominators across workers, then divide.\n"
    )
    return header + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=200)


def main() -> int:
    OUT.write_text(render())
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
