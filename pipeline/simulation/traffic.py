"""``pipeline simulate``: realistic traffic whose exact expected counts are known.

The generator writes the story of each subscriber (sent, delivered or bounced, opened by a
human or by Apple's proxy, clicked with or without an open, scanned by a bot, converted) and
keeps the truth beside it: which events are originals and which are redeliveries, which orders
repeat, which events arrive too late for their window. Expected counts are derived from that
story directly, not by running the pipeline's own rules.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import orjson

from pipeline.simulation.truth import Truth

LATENESS = 300


@dataclass
class Traffic:
    events: list[dict[str, Any]]  # in sending order, redeliveries included
    truth: Truth
    campaigns: list[tuple[str, str]]


def _email_story(
    rng: random.Random, campaign: str, subscriber: str, t: float, n: int, drop: bool = False
) -> list[dict[str, Any]]:
    ids = iter(range(100))

    def ev(kind: str, at: float, **extra: Any) -> dict[str, Any]:
        return {
            "event_id": f"{campaign}-{subscriber}-{n}-{next(ids)}",
            "type": kind,
            "channel": "email",
            "campaign_id": campaign,
            "subscriber_id": subscriber,
            "timestamp": round(at, 3),
            "source": "simulate",
            **extra,
        }

    story = [ev("send", t)]
    if rng.random() < 0.05:
        return [*story, ev("bounce", t + 2)]
    story.append(ev("delivery", t + 3))
    click_p = 0.05 if drop else 0.25
    if rng.random() < 0.35:  # Apple MPP pre-fetches the images: a machine open, no reader
        story.append(ev("open", t + 5, machine=True))
    opened = rng.random() < 0.45
    if opened:
        for k in range(rng.choice((1, 1, 2, 3))):
            story.append(ev("open", t + 60 + 40 * k))
    if (opened and rng.random() < click_p * 2) or rng.random() < click_p / 4:  # some click without an open
        for k in range(rng.choice((1, 1, 2))):
            story.append(ev("click", t + 90 + 30 * k, url=f"https://shop.example/p{k}"))
        if rng.random() < 0.3:
            order = f"o-{campaign}-{subscriber}"
            story.append(ev("conversion", t + 200, order_id=order, value=42.5, currency="EUR"))
            if rng.random() < 0.3:  # the shop reports the same order again under a new id
                story.append(ev("conversion", t + 230, order_id=order, value=42.5, currency="EUR"))
    if rng.random() < 0.05:  # a link scanner follows every link within a second of delivery
        story.append(ev("click", t + 4, bot=True, url="https://shop.example/p0"))
    return story


def _ads_story(
    rng: random.Random, campaign: str, viewer: str, t: float, n: int, drop: bool = False
) -> list[dict[str, Any]]:
    ids = iter(range(100))

    def ev(kind: str, at: float, **extra: Any) -> dict[str, Any]:
        doc = {
            "event_id": f"{campaign}-{viewer}-{n}-{next(ids)}",
            "type": kind,
            "channel": "ads",
            "campaign_id": campaign,
            "timestamp": round(at, 3),
            "source": "simulate",
            **extra,
        }
        if kind != "impression" or rng.random() < 0.7:
            doc["subscriber_id"] = viewer
        return doc

    story = [ev("impression", t + k * 20) for k in range(rng.choice((1, 1, 2, 3)))]
    if rng.random() < (0.01 if drop else 0.05):
        story.append(ev("click", t + 70, url="https://shop.example/landing"))
        if rng.random() < 0.5:
            story.append(ev("click", t + 80, url="https://shop.example/landing"))
        if rng.random() < 0.2:
            story.append(
                ev("conversion", t + 300, order_id=f"o-{campaign}-{viewer}", value=19.0, currency="USD")
            )
    return story


def generate(
    seed: int = 1,
    subscribers: int = 600,
    email_campaigns: int = 2,
    ads_campaigns: int = 1,
    start: float | None = None,
    span: float = 100 * 60,
    windows: tuple[int, ...] = (300, 3600),
    redelivery: float = 0.1,
    late_fraction: float = 0.02,
    drop_after: float | None = None,
    campaign_tag: int | None = None,
) -> Traffic:
    """Build a traffic run; ``drop_after`` (fraction of span) makes CTR collapse from then on."""
    rng = random.Random(seed)
    start = start if start is not None else time.time() - span - 900
    truth = Truth(windows)
    tag = seed if campaign_tag is None else campaign_tag
    campaigns = [("email", f"newsletter-{tag}-{i}") for i in range(email_campaigns)]
    campaigns += [("ads", f"display-{tag}-{i}") for i in range(ads_campaigns)]
    stories: list[dict[str, Any]] = []
    last_seen: dict[tuple[str, str, str], float] = {}
    for n in range(subscribers):
        channel, campaign = campaigns[n % len(campaigns)]
        who = f"sub-{seed}-{n}"
        t = start + span * n / subscribers
        drop = drop_after is not None and n / subscribers >= drop_after
        story = (_email_story if channel == "email" else _ads_story)(rng, campaign, who, t, n, drop)
        stories.extend(story)
        last_seen[(channel, campaign, who)] = max(e["timestamp"] for e in story)
    # deliver in event-time order with jitter: out of order by up to two minutes, never late
    stories.sort(key=lambda e: e["timestamp"] + rng.uniform(0, 120))
    seen_orders: set[tuple[str, str]] = set()
    for event in stories:
        order = event.get("order_id")
        if order and (event["campaign_id"], order) in seen_orders:
            truth.duplicates[(event["channel"], event["campaign_id"])] += 1
            continue
        if order:
            seen_orders.add((event["campaign_id"], order))
        truth.count(event, late=False)
    # late events: far older than any window still open for their subscriber's partition
    late_events = []
    for event in rng.sample(stories, int(len(stories) * late_fraction)):
        if event["type"] not in ("open", "click", "impression") or "subscriber_id" not in event:
            continue
        late = {**event, "event_id": event["event_id"] + "-late", "timestamp": start - 3 * 3600}
        late_events.append(late)
        truth.count(late, late=True)
    events = stories + late_events
    # redeliveries: the same webhook again, later in the stream
    redelivered = []
    for index, event in enumerate(events):
        if rng.random() < redelivery:
            redelivered.append((min(len(events), index + rng.randint(1, 400)), dict(event)))
            truth.duplicates[(event["channel"], event["campaign_id"])] += 1
    for position, event in sorted(redelivered, key=lambda p: p[0], reverse=True):
        events.insert(position, event)
    return Traffic(events, truth, campaigns)


def expected_rates(
    channel: str, counts: dict[str, int], denominator: str = "delivery"
) -> dict[str, float | None]:
    """The contract's rate table written out longhand, as the acceptance check reads it."""
    c = counts.get

    def r(num: str, den: str) -> float | None:
        return c(num, 0) / c(den, 0) if c(den, 0) else None

    if channel == "ads":
        return {
            "ctr": r("click", "impression"),
            "unique_ctr": r("unique_click", "impression"),
            "total_ctr": r("click", "impression"),
            "cvr": r("conversion", "click"),
        }
    d = denominator
    return {
        "ctr": r("unique_click", d),
        "unique_ctr": r("unique_click", d),
        "total_ctr": r("click", d),
        "open_rate": r("unique_open", d),
        "human_open_rate": r("unique_human_open", d),
        "ctor": r("unique_click", "unique_open"),
        "human_ctor": r("unique_click", "unique_human_open"),
        "cvr": r("conversion", "click"),
    }


async def post_until_accepted(
    session: Any, url: str, body: bytes, headers: dict[str, str], accepted_status: int, timeout: float
) -> dict[str, Any]:
    """POST one request, retrying on 503 or a dropped connection (retrying is always safe:
    the pipeline drops redeliveries by event id); any other refusal is an error."""
    import aiohttp

    deadline = time.monotonic() + timeout
    while True:
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                if resp.status == accepted_status:
                    return await resp.json()
                if resp.status != 503:
                    raise RuntimeError(f"{url} answered {resp.status}: {await resp.text()}")
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} kept refusing: gave up")
        await asyncio.sleep(0.5)


async def send(
    url: str, events: list[dict[str, Any]], batch: int = 500, token: str | None = None, timeout: float = 120.0
) -> int:
    """POST canonical events to ``/events`` in order, ``batch`` at a time; return how many were accepted."""
    import aiohttp

    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    accepted = 0
    async with aiohttp.ClientSession() as session:
        for i in range(0, len(events), batch):
            body = orjson.dumps(events[i : i + batch])
            doc = await post_until_accepted(session, f"{url}/events", body, headers, 202, timeout)
            accepted += doc["accepted"]
    return accepted


async def send_native(
    url: str, provider: str, events: list[dict[str, Any]], env: dict[str, str], timeout: float = 120.0
) -> int:
    """POST e-mail events in the provider's own webhook format, signed with the keys in ``env``.

    Subscribers get a clear address (``<subscriber>@example.com``) here, as a provider would
    send it: the adapter replaces it with the keyed hash before anything reaches a topic.
    """
    import aiohttp

    from pipeline.ingest.providers import ADAPTERS

    adapter = ADAPTERS[provider]
    native = [{**e, "email": f"{e['subscriber_id']}@example.com"} for e in events if e["channel"] == "email"]
    size = max(1, min(adapter.max_batch, 500))
    requests = 0
    async with aiohttp.ClientSession() as session:
        for i in range(0, len(native), size):
            try:
                headers, body = adapter.build_request(native[i : i + size], env, time.time(), url)
            except ValueError:
                continue  # an event type this provider cannot express (e.g. a conversion)
            await post_until_accepted(session, f"{url}/webhooks/{provider}", body, headers, 200, timeout)
            requests += 1
    return requests


async def wait_ready(url: str, timeout: float) -> None:
    """Until ``/health`` answers 200; on a public port without it (an admin listener holds it),
    until ``/livez`` does: ingest needs the broker, not the consumer."""
    import aiohttp

    deadline = time.monotonic() + timeout
    path = "/health"
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"{url}{path}") as resp:
                    if resp.status == 200:
                        return
                    if resp.status == 404 and path == "/health":
                        path = "/livez"
                        continue
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout}s")


def default_token() -> str | None:
    """The token a worker started from this environment requires, if any."""
    import os

    token = os.environ.get("PIPELINE_INGEST_TOKEN", "")
    path = os.environ.get("PIPELINE_INGEST_TOKEN_FILE", "")
    if not token and path:
        with open(path, encoding="utf-8") as secret:
            token = secret.read().strip()
    return token or None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8080", help="the worker's base URL")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--subscribers", type=int, default=600)
    p.add_argument("--scenario", choices=("basic", "ctr-drop"), default="basic")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument(
        "--token",
        default=None,
        help="bearer token of the target's /events (default: $PIPELINE_INGEST_TOKEN or the content "
        "of $PIPELINE_INGEST_TOKEN_FILE)",
    )
    p.add_argument("--wait-ready", type=float, default=0, help="wait this long for /health first")
    p.add_argument("--continuous", action="store_true", help="keep sending live traffic (demo)")
    p.add_argument("--expect", default=None, help="write the expected counts to this JSON file")
    p.add_argument(
        "--provider",
        default=None,
        choices=("sendgrid", "mailgun", "postmark", "ses", "mandrill", "sparkpost", "brevo"),
        help="send the e-mail events as this provider's signed native webhooks "
        "(keys from the provider's environment variables, see README.md, Providers)",
    )


def scenario(name: str, seed: int = 1, subscribers: int = 600) -> Traffic:
    """``basic``: two newsletters and a display campaign. ``ctr-drop``: one newsletter and one
    display campaign whose click-through collapses for the last 30 % of the run (event time),
    with enough volume per 5-minute window for the drop alerts' statistics."""
    if name == "ctr-drop":
        return generate(
            seed=seed,
            subscribers=subscribers,
            email_campaigns=1,
            ads_campaigns=1,
            drop_after=0.7,
            late_fraction=0.0,
        )
    return generate(seed=seed, subscribers=subscribers)


def main(args: argparse.Namespace) -> int:
    async def run() -> int:
        if args.wait_ready:
            await wait_ready(args.url, args.wait_ready)
        traffic = scenario(args.scenario, args.seed, args.subscribers)
        if args.provider:
            import os

            requests = await send_native(args.url, args.provider, traffic.events, dict(os.environ))
            print(
                f"sent {requests} signed {args.provider} webhooks (e-mail events only; the expected "
                "counts follow that provider's semantics, so --expect is not written)"
            )
            return 0
        token = args.token or default_token()
        accepted = await send(args.url, traffic.events, args.batch, token)
        print(
            f"sent {len(traffic.events)} events ({accepted} accepted) for {len(traffic.campaigns)} campaigns"
        )
        if args.expect:
            doc = {f"{ch}/{camp}": traffic.truth.expected(ch, camp) for ch, camp in traffic.campaigns}
            with open(args.expect, "wb") as out:
                out.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        round_no = 0
        while args.continuous:
            round_no += 1
            # the demo's campaigns again, with fresh subscribers, in real time
            live = generate(
                seed=args.seed * 1000 + round_no,
                subscribers=60,
                start=time.time() - 60,
                span=50,
                campaign_tag=args.seed,
            )
            await send(args.url, live.events, args.batch, token)
            await asyncio.sleep(5)
        return 0

    try:
        return asyncio.run(run())
    except (RuntimeError, OSError) as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 1
