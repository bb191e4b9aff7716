"""The drop scenarios of `pipeline simulate` do what they promise, judged on their own ground
truth: the pipeline's diagnosis of the lifetime counts names the lever that moved, and the
5-minute window the alerts test (the most recent complete one, as the worker exports it)
passes the drop alert's test with the parameters of deploy/prometheus/rules/funnel.params.yml
for the rate that dropped, and not for the rate that held. The test is written out here as
deploy/README.md (Alerts) states it; Prometheus itself runs the rules on this traffic in
tests/e2e/test_stack.py."""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import pytest
import yaml

from pipeline.diagnosis.diagnose import diagnose
from pipeline.rules.aggregate import CampaignView
from pipeline.settings import Settings
from pipeline.simulation.traffic import SCENARIOS, expected_rates, scenario

PARAMS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules" / "funnel.params.yml"
START = 1_800_000_000 - 1_800_000_000 % 300  # on a 5-minute boundary, as every run starts
WINDOW, LATENESS = 300, 300


@functools.cache
def alert_params() -> dict[tuple[str, str, str], float]:
    """(rate, parameter, channel) -> value, e.g. ("ctr", "floor", "email") -> 0.01."""
    out = {}
    for group in yaml.safe_load(PARAMS.read_text())["groups"]:
        for rule in group["rules"]:
            match = re.fullmatch(
                r"channel:funnel_(\w+?)_alert_(floor|baseline_min_volume|min_volume)\W.*", rule["record"]
            )
            value = re.fullmatch(r"vector\(([\d.]+)\)", rule["expr"])
            assert match and value, rule
            out[(match.group(1), match.group(2), rule["labels"]["channel"])] = float(value.group(1))
    return out


def denominator(channel: str, rate: str, counts: dict[str, int]) -> int:
    if rate == "ctr":
        return counts.get("impression" if channel == "ads" else "delivery", 0)
    return counts.get("unique_human_open", 0)  # human_ctor


def alert_fires(channel: str, rate: str, lifetime: dict[str, int], window: dict[str, int]) -> bool:
    params = alert_params()
    n0 = denominator(channel, rate, lifetime)
    if n0 >= params[(rate, "baseline_min_volume", channel)]:
        p0 = expected_rates(channel, lifetime)[rate]
    else:
        p0 = params[(rate, "floor", channel)]
    n, p = denominator(channel, rate, window), expected_rates(channel, window)[rate]
    if p is None or p0 is None or n < params[(rate, "min_volume", channel)] or n * p0 < 10:
        return False
    z = (p0 - p) / math.sqrt(p0 * (1 - p0) / n)
    return z > 3 and p < 0.8 * p0


# scenario -> campaign prefix -> (diagnosis, {rate: fires})
PROMISED = {
    "ctr-drop": {
        "newsletter": ("open_rate", {"ctr": True, "human_ctor": False}),
        "display": ("ctr", {"ctr": True}),
    },
    "ctor-drop": {
        "newsletter": ("ctor", {"human_ctor": True, "ctr": True}),  # CTR = open rate x CTOR
    },
}


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(PROMISED))
def test_drop_scenario_is_diagnosed_and_alerted_as_promised(name: str, seed: int) -> None:
    traffic = scenario(name, seed, start=START)
    settings = Settings.from_env({})
    assert {campaign.split("-")[0] for _, campaign in traffic.campaigns} == set(PROMISED[name])
    for channel, campaign in traffic.campaigns:
        bottleneck, alerts = PROMISED[name][campaign.split("-")[0]]
        truth = traffic.truth.expected(channel, campaign)
        lifetime = truth["counts"]
        assert (
            diagnose(CampaignView(channel, campaign, totals=dict(lifetime)), settings)["bottleneck"]
            == bottleneck
        )
        watermark = max(e["timestamp"] for e in traffic.events if e["campaign_id"] == campaign)
        windows = {
            int(key.split(":")[1]): counts
            for key, counts in truth["windows"].items()
            if key.startswith(f"{WINDOW}:")
        }
        view = CampaignView(channel, campaign, windows={WINDOW: windows}, watermark=watermark)
        shown = view.complete_window(WINDOW, LATENESS)
        assert shown is not None
        # the window tested lies wholly in the second half, after the drop
        assert shown.start >= START + SCENARIOS[name].span / 2
        fired = {rate: alert_fires(channel, rate, lifetime, shown.counts) for rate in alerts}
        assert fired == alerts, (campaign, fired)
