"""Direct producers: events written straight to the raw topics by Kafka clients that are not
the project's own, beside the HTTP ingest and a provider webhook, counted exactly.

Any client may write one canonical event per record, with any key or none; the pipeline's rule
says where an event belongs (``partition_for(routing_key(event))``), and a record elsewhere
must be counted as if it were there. The clients (``tests/direct_producers.py``): Kafka's
console producer (Java, murmur2 of the key: the rule's placement when keyed by subscriber,
sticky when unkeyed), kcat and confluent-kafka (librdkafka: CRC32 of the key, random when
unkeyed). Each writes three campaigns of each channel, one per keying; half the redeliveries
come through ``POST /events`` instead (so on the rule's partition), some before their original
is written, some after it was applied, and every count, window and rate must equal the ground
truth. Then one e-mail campaign whose subscribers' events come through all three ways at once,
interleaved: confluent-kafka, ``POST /events`` (addresses, hashed at ingest) and SendGrid's
webhook (addresses, hashed by the adapter).

Lateness is out of these tests, by the dedupe stage's design: a moved event takes one more hop,
so two copies of one event on two partitions may be applied in either order, and lateness is
judged in the order applied (a copy applied first on its native partition can be late there
while its original, moved, would not have been). So no late events (``late_fraction=0``) and
an allowed lateness of 6 h, longer than any run's span: every event counts in its window, and
every window is compared. Counts, distinct counts and duplicates do not depend on that order.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from typing import Any

import pytest
from conftest import WorkerProcess
from direct_producers import (
    CLIENTS,
    KEYINGS,
    ConfluentWriter,
    assert_moves_reported,
    count_stored_copies,
    hashed_subscriber,
    placement,
    raw_records,
    wait_applied,
    write,
)
from helpers import assert_exact, campaign_doc, nonzero, wait_for_counts
from provider_helpers import SALT

from pipeline.ingest.identity import pseudonymise
from pipeline.simulation.traffic import Traffic, generate, send, send_native
from pipeline.simulation.truth import from_stream

pytestmark = pytest.mark.brokers("tansu", "kafka")

MISPLACED = "direct, misplaced"
# see the module's docstring: longer than any run's span, so nothing is late
WORKER_ENV = {"PIPELINE_ALLOWED_LATENESS": "6h"}


def start_worker(broker: Any, tmp_path: Any, workers: list[WorkerProcess]) -> WorkerProcess:
    worker = WorkerProcess(broker.address, tmp_path, env=WORKER_ENV).start()
    workers.append(worker)
    return worker


def pin_repeated_orders(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the events, every conversion of one order at the time of the order's first.

    A repeated order (the shop reports the same order again under a new event id, 30 s later)
    counts once, in the window of whichever of its events is applied first. Records on two
    partitions have no order between them, so only the same time for both keeps the truth
    (the first in sending order) independent of it; nothing else in the truth depends on order.
    """
    first: dict[tuple[str, str, str], float] = {}
    out = []
    for event in events:
        event = dict(event)
        if event.get("order_id"):
            key = (event["channel"], event["campaign_id"], event["order_id"])
            event["timestamp"] = first.setdefault(key, event["timestamp"])
        out.append(event)
    return out


def differences(url: str, traffic: Traffic, labels: dict[str, str]) -> str:
    """Every campaign's counts, duplicates and late events that differ from the truth."""
    lines = []
    for channel, campaign in traffic.campaigns:
        doc = campaign_doc([url], channel, campaign)
        want = traffic.truth.expected(channel, campaign)
        got = nonzero(doc["counts"]) if doc else {}
        wrong = {
            name: (want["counts"].get(name, 0), got.get(name, 0))
            for name in sorted(set(want["counts"]) | set(got))
            if want["counts"].get(name, 0) != got.get(name, 0)
        }
        for name, value in (("duplicates", "duplicates_dropped"), ("late", "late_events")):
            if doc is None or doc[value] != want[name]:
                wrong[name] = (want[name], doc[value] if doc else None)
        if wrong:
            shown = ", ".join(f"{name} expected {w} got {g}" for name, (w, g) in wrong.items())
            lines.append(f"{campaign} ({labels[campaign]}): {shown}")
    return "counts differ from the truth:\n" + "\n".join(lines)


def check_exact(url: str, traffic: Traffic, labels: dict[str, str], timeout: float = 60.0) -> None:
    """Every count, window and rate equals the truth; if the counts never converge, say how
    every campaign differs."""
    try:
        docs = wait_for_counts([url], traffic, timeout)
    except AssertionError:
        raise AssertionError(differences(url, traffic, labels)) from None
    assert_exact(docs, traffic)


@pytest.mark.parametrize("client", CLIENTS)
def test_direct_producer_in_three_keyings(client, broker, broker_kind, tmp_path, workers):
    """Three e-mail and three ads campaigns, one of each per keying, all in one run of ``client``;
    half the redeliveries through ``POST /events``: half of those before the run, the other
    half once the run's records were applied."""
    worker = start_worker(broker, tmp_path, workers)
    seed = 41 + CLIENTS.index(client)
    generated = generate(
        seed=seed,
        subscribers=900,
        email_campaigns=3,
        ads_campaigns=3,
        campaign_tag=seed,
        redelivery=0.15,
        late_fraction=0.0,
    )
    events = pin_repeated_orders(generated.events)
    traffic = Traffic(events, from_stream(events, generated.truth.windows), generated.campaigns)
    names = list(KEYINGS)
    keying = {campaign: names[i % len(names)] for i, (_, campaign) in enumerate(traffic.campaigns)}
    labels = {campaign: f"{client}, {keying[campaign]}" for campaign in keying}

    direct, posted, seen, copies = [], [], set(), 0
    for event in events:
        if event["event_id"] in seen:  # a redelivery: every other one through POST /events
            copies += 1
            (posted if copies % 2 else direct).append(event)
        else:
            direct.append(event)
            seen.add(event["event_id"])
    assert len(posted) > 100
    # copies first: the original, native or moved, must be the duplicate
    first, last = posted[::2], posted[1::2]
    assert asyncio.run(send(worker.url, first, batch=250)) == len(first)
    keyed = [(event, KEYINGS[keying[event["campaign_id"]]](event)) for event in direct]
    write(client, broker.address, keyed, broker_kind)
    # the originals applied (moved, where misplaced) before the other copies come natively
    wait_applied(worker.admin_url, Counter((e["channel"], e["campaign_id"]) for e in direct + first))
    assert asyncio.run(send(worker.url, last, batch=250)) == len(last)

    records = raw_records(broker.address)
    stored_twice = count_stored_copies(records, traffic)  # a client's retry stores a copy
    where_of = placement(records)
    for channel, campaign in traffic.campaigns:
        where = where_of[(channel, campaign)]
        if client == "console-producer" and keying[campaign] == "keyed by subscriber_id":
            assert where[MISPLACED] == 0, (campaign, where)  # murmur2 of the routing key: the rule
        else:
            assert where[MISPLACED] > 0, (campaign, labels[campaign], where)
    misplaced = sum(where[MISPLACED] for where in where_of.values())

    check_exact(worker.admin_url, traffic, labels)
    moved = assert_moves_reported(worker.admin_url, worker.log_path, misplaced)
    figures = {
        "test": f"direct producer {client} ({broker_kind})",
        "events": len(events),
        "written_directly": len(direct),
        "posted_again": len(posted),
        "stored_twice": stored_twice,
        "misplaced_per_keying": {
            name: sum(where_of[key][MISPLACED] for key in traffic.campaigns if keying[key[1]] == name)
            for name in names
        },
        "records_moved_metric": moved,
        "moved_events_in_raw_topics": sum(where["moved"] for where in where_of.values()),
    }
    print(json.dumps(figures))


WEBHOOK = "sendgrid"
CHUNK = 25  # events, in sending order, before the next way gets its turn


def first_way(event: dict[str, Any], rng: random.Random) -> str:
    """Sends, deliveries and bounces: the webhook or ``POST /events``; opens, clicks and
    conversions: half directly, the rest the webhook (if SendGrid can say it) or ``/events``."""
    if event["type"] in ("send", "delivery", "bounce"):
        return "webhook" if rng.random() < 0.3 else "http"
    draw = rng.random()
    if draw < 0.5:
        return "direct"
    expressible = event["type"] == "open" or (event["type"] == "click" and not event.get("bot"))
    return "webhook" if expressible and draw < 0.75 else "http"


def as_ingested(way: str, event: dict[str, Any]) -> dict[str, Any]:
    """The event as it reaches a topic: the subscriber's address hashed, and from the webhook
    SendGrid's id (``sendgrid:`` + ``sg_event_id``) and whole-second time."""
    out = {**event, "subscriber_id": hashed_subscriber(f"{event['subscriber_id']}@example.com", SALT)}
    if way == "webhook":
        out["event_id"] = f"{WEBHOOK}:{event['event_id']}"
        out["timestamp"] = int(event["timestamp"])
    return out


def test_direct_producer_beside_http_ingest_and_a_webhook(broker, broker_kind, tmp_path, workers):
    """One e-mail campaign: half its opens, clicks and conversions written by confluent-kafka
    keyed by the subscriber's hashed id, the rest and the sends and deliveries through
    ``POST /events`` and SendGrid's unsigned webhook (loopback), the same subscribers on every
    way; a redelivery of a direct or posted event comes either way, a webhook's again as the
    same webhook."""
    address = "sub-44-0@example.com"  # the direct producer's ids are the ingest's: one subscriber
    assert hashed_subscriber(address, SALT) == pseudonymise(address, SALT), "ids differ between ways"
    seed = 44
    generated = generate(
        seed=seed, subscribers=800, email_campaigns=1, ads_campaigns=0, campaign_tag=seed, late_fraction=0.0
    )
    events = pin_repeated_orders(generated.events)
    rng = random.Random(seed)
    way_of: dict[str, str] = {}
    plan: list[tuple[str, dict[str, Any]]] = []
    for event in events:
        first = way_of.get(event["event_id"])
        if first is None:
            way = way_of[event["event_id"]] = first_way(event, rng)
        else:  # a redelivery: the same event id, so the same event whichever way it comes
            way = first if first == "webhook" else rng.choice(("direct", "http"))
        plan.append((way, event))
    ingested = [as_ingested(way, event) for way, event in plan]
    traffic = Traffic(ingested, from_stream(ingested, generated.truth.windows), generated.campaigns)
    ways_of_subscriber: dict[str, set[str]] = {}
    for way, event in plan:
        ways_of_subscriber.setdefault(event["subscriber_id"], set()).add(way)
    assert sum(ways == {"direct", "http", "webhook"} for ways in ways_of_subscriber.values()) > 50
    assert Counter(way for way, _ in plan)["direct"] > 300

    worker = start_worker(broker, tmp_path, workers)
    accepted = 0
    with ConfluentWriter(broker.address) as writer:
        for start in range(0, len(plan), CHUNK):
            part = plan[start : start + CHUNK]
            direct = [as_ingested(way, event) for way, event in part if way == "direct"]
            writer.write([(event, event["subscriber_id"]) for event in direct])
            posted = [
                {**event, "subscriber_id": f"{event['subscriber_id']}@example.com"}
                for way, event in part
                if way == "http"
            ]
            if posted:
                accepted += asyncio.run(send(worker.url, posted, batch=500))
            hooks = [event for way, event in part if way == "webhook"]
            if hooks:
                asyncio.run(send_native(worker.url, WEBHOOK, hooks, {}))
    assert accepted == sum(way == "http" for way, _ in plan)

    records = raw_records(broker.address)
    stored_twice = count_stored_copies(records, traffic)
    (campaign_key,) = traffic.campaigns
    where = placement(records)[campaign_key]
    assert where[MISPLACED] > 0 and where["ingest"] > 0, where
    labels = {campaign_key[1]: "confluent-kafka keyed by subscriber_id + POST /events + SendGrid webhook"}
    check_exact(worker.admin_url, traffic, labels)
    moved = assert_moves_reported(worker.admin_url, worker.log_path, where[MISPLACED])
    figures = {
        "test": f"direct producer beside /events and {WEBHOOK} ({broker_kind})",
        "events": len(plan),
        "ways": dict(Counter(way for way, _ in plan)),
        "placement": dict(where),
        "stored_twice": stored_twice,
        "records_moved_metric": moved,
    }
    print(json.dumps(figures))
