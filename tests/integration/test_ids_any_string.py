"""Ids are any string the schema accepts, and counted by what they are, not by how they look.

Record keys were once ``channel|campaign|subscriber``: the ads click of subscriber ``b|c`` in
campaign ``zz`` and the click of ``c`` in campaign ``zz|b`` shared one record, and the second
clicker was taken for one already seen. Here ids full of separators, quotes, backslashes,
control characters, unicode and the longest length allowed go through ``POST /events`` on
the real broker, and every count and rate must equal the ground truth.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from helpers import assert_exact, scrape, wait_for_counts

from pipeline.events import EVENT_SCHEMA
from pipeline.simulation.traffic import Traffic, Truth, generate, send

MAX = EVENT_SCHEMA["properties"]["campaign_id"]["maxLength"]


def renamed(traffic: Traffic, campaigns: dict[str, str], subscriber: Any, event_id: Any) -> Traffic:
    """The same traffic under other ids (a bijection), with its truth keyed accordingly."""
    events = []
    for event in traffic.events:
        event = dict(event)
        old_campaign = event["campaign_id"]
        event["campaign_id"] = campaigns[old_campaign]
        if "subscriber_id" in event:
            event["subscriber_id"] = subscriber(old_campaign, event["subscriber_id"])
        event["event_id"] = event_id(event["event_id"])
        if "order_id" in event:
            event["order_id"] = event_id(event["order_id"])
        events.append(event)
    old = traffic.truth
    truth = Truth(old.windows)
    for (channel, campaign), counts in list(old.totals.items()):
        key = (channel, campaigns[campaign])
        truth.totals[key] = counts
        truth.window_counts[key] = old.window_counts[(channel, campaign)]
        truth.duplicates[key] = old.duplicates[(channel, campaign)]
        truth.late[key] = old.late[(channel, campaign)]
    return Traffic(events, truth, [(ch, campaigns[c]) for ch, c in traffic.campaigns])


@pytest.mark.brokers("tansu", "kafka")
def test_ids_with_separators_quotes_unicode_and_maximum_length(worker):
    traffic = generate(seed=23, subscribers=800, email_campaigns=2, ads_campaigns=2, campaign_tag=23)
    names = [campaign for _, campaign in traffic.campaigns]  # email 0, email 1, ads 0, ads 1
    long_name = ("é|☃\\" * MAX)[: MAX - 1] + '"'
    assert len(long_name) == MAX
    campaigns = {
        names[0]: 'q"u\\o|t:e\n☃',
        names[1]: long_name,
        names[2]: "zz",  # its subscribers are "b|" + a subscriber of "zz|b": the collision
        names[3]: "zz|b",
    }

    def clickers(campaign: str) -> list[str]:
        found = {
            e["subscriber_id"]
            for e in traffic.events
            if e["campaign_id"] == campaign and e["type"] == "click"
        }
        return sorted(found)

    # each clicker of "zz" is paired with one of "zz|b": "zz" + "b|x-" + name = "zz|b" + "x-" + name
    partner = dict(zip(clickers(names[2]), clickers(names[3]), strict=False))

    def subscriber(campaign: str, name: str) -> str:
        if campaign == names[2]:
            return f"b|x-{partner[name]}" if name in partner else f"b|y-{name}"
        if campaign == names[3]:
            return f"x-{name}"
        if campaign == names[1]:
            return (name + '|"\\\t𝄞') * 40 if len(name) < 6 else (name + "|\\'\"" * MAX)[:MAX]
        return f'{name}|"\\☃'

    traffic = renamed(traffic, campaigns, subscriber, lambda eid: f'{eid}|"\\☃'[:MAX])
    legacy = {
        f"{e['channel']}|{e['campaign_id']}|{e['subscriber_id']}"
        for e in traffic.events
        if e["campaign_id"] == "zz" and e["type"] == "click"
    } & {
        f"{e['channel']}|{e['campaign_id']}|{e['subscriber_id']}"
        for e in traffic.events
        if e["campaign_id"] == "zz|b" and e["type"] == "click"
    }
    assert legacy, "the traffic must contain clickers whose old record keys collide"
    assert max(len(e["subscriber_id"]) for e in traffic.events if "subscriber_id" in e) == MAX

    accepted = asyncio.run(send(worker.url, traffic.events, batch=250))
    assert accepted == len(traffic.events)
    docs = wait_for_counts([worker.url], traffic)
    assert_exact(docs, traffic)

    samples = scrape(worker.url)  # label values escaped and parsed back exactly
    for channel, campaign in traffic.campaigns:
        doc = docs[f"{channel}/{campaign}"]
        base = (("campaign", campaign), ("channel", channel))
        for event in ("click", "open", "human_open", "conversion"):
            key = ("funnel_unique_events_total", tuple(sorted((*base, ("event", event)))))
            assert samples[key] == doc["counts"][f"unique_{event}"], (campaign, event)
        key = ("funnel_events_total", tuple(sorted((*base, ("event", "click")))))
        assert samples[key] == doc["counts"]["click"]
        for rate, value in doc["rates"]["all"].items():
            key = ("funnel_rate", tuple(sorted((*base, ("rate", rate), ("window", "all")))))
            assert (key not in samples) if value is None else math.isclose(samples[key], value), key
