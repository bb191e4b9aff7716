"""Ground truth through the real broker: redeliveries, repeat clicks, machine opens, clicks
without opens, out-of-order and late events, repeated orders; every count and rate exact."""

from __future__ import annotations

import asyncio
import math

import pytest
from helpers import assert_exact, scrape, wait_for_counts

from pipeline.simulation.traffic import expected_rates, generate, send

pytestmark = pytest.mark.brokers("tansu", "kafka", "kafka-3.9.1")


def test_ground_truth_end_to_end(worker):
    traffic = generate(seed=11, subscribers=900)
    accepted = asyncio.run(send(worker.url, traffic.events, batch=250))
    assert accepted == len(traffic.events)
    docs = wait_for_counts([worker.url], traffic)
    assert_exact(docs, traffic)

    # /metrics says the same as /campaigns, for every counter and every rate in every window
    samples = scrape(worker.url)
    for channel, campaign in traffic.campaigns:
        doc = docs[f"{channel}/{campaign}"]
        base = (("campaign", campaign), ("channel", channel))
        for event in (
            "impression",
            "click",
            "send",
            "delivery",
            "bounce",
            "open",
            "machine_open",
            "conversion",
        ):
            key = ("funnel_events_total", tuple(sorted((*base, ("event", event)))))
            assert samples[key] == doc["counts"][event], (campaign, event)
        for event in ("click", "open", "human_open", "conversion"):
            key = ("funnel_unique_events_total", tuple(sorted((*base, ("event", event)))))
            assert samples[key] == doc["counts"][f"unique_{event}"]
        for window, rates in doc["rates"].items():
            for rate, value in rates.items():
                key = ("funnel_rate", tuple(sorted((*base, ("rate", rate), ("window", window)))))
                if value is None:
                    assert key not in samples, key  # no sample: absent, never NaN
                else:
                    assert math.isclose(samples[key], value, rel_tol=1e-9), key
        if channel == "email":
            # a CTOR is unique clickers over unique openers, never derived from CTR numbers
            counts = doc["counts"]
            assert doc["rates"]["all"]["ctor"] == counts["unique_click"] / counts["unique_open"]
            assert doc["rates"]["all"]["ctor"] == expected_rates(channel, counts)["ctor"]
        else:
            counts = doc["counts"]
            rates = doc["rates"]["all"]
            # identity on lifetime counts: conversions = impressions x CTR x CVR
            assert math.isclose(counts["impression"] * rates["ctr"] * rates["cvr"], counts["conversion"])
    assert not any(math.isnan(v) or math.isinf(v) for v in samples.values())
