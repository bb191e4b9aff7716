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
from dataclasses import dataclass, replace
from typing import Any

import orjson

from pipeline.simulation.truth import Truth

LATENESS = 300


@dataclass
class Traffic:
    events: list[dict[str, Any]]  # in sending order, redeliveries included
    truth: Truth
    campaigns: list[tuple[str, str]]


@dataclass(frozen=True)
class Funnel:
    """The chances in one recipient's or viewer's story."""

    bounce: float = 0.05
    machine_open: float = 0.35  # Apple MPP pre-fetches the images: an open without a reader
    human_open: float = 0.45
    click_if_opened: float = 0.5
    # a click the provider saw no open for (images blocked), drawn for every recipient not
    # already clicking: proof of an open all the same
    click_without_open: float = 0.0625
    bot: float = 0.05  # a link scanner follows every link within a second of delivery
    ads_click: float = 0.05


# The generator's default story, and what ``drop_after`` switches it to when no other is given:
# clicks collapse for openers and non-openers alike, so CTR and CTOR both drop.
DEFAULT_FUNNEL = Funnel()
CLICKS_COLLAPSE = Funnel(click_if_opened=0.1, click_without_open=0.0125, ads_click=0.01)


def _email_story(
    rng: random.Random, campaign: str, subscriber: str, t: float, n: int, funnel: Funnel = DEFAULT_FUNNEL
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
    if rng.random() < funnel.bounce:
        return [*story, ev("bounce", t + 2)]
    story.append(ev("delivery", t + 3))
    if rng.random() < funnel.machine_open:
        story.append(ev("open", t + 5, machine=True))
    opened = rng.random() < funnel.human_open
    if opened:
        for k in range(rng.choice((1, 1, 2, 3))):
            story.append(ev("open", t + 60 + 40 * k))
    if (opened and rng.random() < funnel.click_if_opened) or rng.random() < funnel.click_without_open:
        for k in range(rng.choice((1, 1, 2))):
            story.append(ev("click", t + 90 + 30 * k, url=f"https://shop.example/p{k}"))
        if rng.random() < 0.3:
            order = f"o-{campaign}-{subscriber}"
            story.append(ev("conversion", t + 200, order_id=order, value=42.5, currency="EUR"))
            if rng.random() < 0.3:  # the shop reports the same order again under a new id
                story.append(ev("conversion", t + 230, order_id=order, value=42.5, currency="EUR"))
    if rng.random() < funnel.bot:
        story.append(ev("click", t + 4, bot=True, url="https://shop.example/p0"))
    return story


def _ads_story(
    rng: random.Random, campaign: str, viewer: str, t: float, n: int, funnel: Funnel = DEFAULT_FUNNEL
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
    if rng.random() < funnel.ads_click:
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
    funnel: Funnel = DEFAULT_FUNNEL,
    dropped: Funnel = CLICKS_COLLAPSE,
) -> Traffic:
    """Build a traffic run: stories told with ``funnel``, and from ``drop_after`` (a fraction of
    the span) on with ``dropped``."""
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
        teller = _email_story if channel == "email" else _ads_story
        story = teller(rng, campaign, who, t, n, dropped if drop else funnel)
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
    p.add_argument(
        "--subscribers",
        type=int,
        default=None,
        help="recipients and viewers (default: the scenario's, "
        + ", ".join(f"{name} {chosen.subscribers:,}" for name, chosen in SCENARIOS.items())
        + ")",
    )
    p.add_argument(
        "--scenario",
        choices=tuple(SCENARIOS),
        default="basic",
        help="; ".join(f"{name}: {chosen.summary}" for name, chosen in SCENARIOS.items()),
    )
    p.add_argument(
        "--start",
        type=float,
        default=None,
        help="event time of the first story, epoch seconds (default: on a 5-minute boundary, so "
        "that the run ends 15 to 20 minutes ago). Give a second run a start after the first run's end: "
        "lateness is judged per partition, so events older than what a partition already saw "
        "count as late",
    )
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


# Rates inside the default benchmark ranges (pipeline/diagnosis/benchmarks.py, e-mail "all":
# human open rate 18.1-24.5 %, CTOR 10-14 %; search ads CTR 3.2-6.4 %), so the diagnosis of a
# drop scenario names the lever that moved: human open rate 24 %, human CTOR about 12 %
# (scanner clicks count as clickers, never as openers), e-mail CTR about 2.9 %, ads CTR about 4.4 %.
HEALTHY = Funnel(human_open=0.24, click_if_opened=0.11, click_without_open=0.001, bot=0.001, ads_click=0.05)


@dataclass(frozen=True)
class Scenario:
    """A ``pipeline simulate --scenario``: campaigns, their stories before and after the drop."""

    summary: str
    subscribers: int  # the default: enough volume per 5-minute window for the drop alerts
    email_campaigns: int = 2
    ads_campaigns: int = 1
    funnel: Funnel = DEFAULT_FUNNEL
    dropped: Funnel = CLICKS_COLLAPSE
    drop_after: float | None = None
    span: float = 100 * 60
    late_fraction: float = 0.02


SCENARIOS = {
    "basic": Scenario(
        "two newsletters and a display campaign; every story the pipeline must count right "
        "(redeliveries, machine opens, scanner clicks, clicks without opens, late events, repeated orders)",
        subscribers=600,
    ),
    "ctr-drop": Scenario(
        "a newsletter whose opens collapse (subject line, sender or deliverability) while clicks per "
        "open hold, and a display campaign whose clicks collapse, for the second half of the run: "
        "FunnelCTRDrop on both, diagnosed open_rate (e-mail) and ctr (ads)",
        subscribers=24_000,
        email_campaigns=1,
        funnel=HEALTHY,
        dropped=replace(HEALTHY, human_open=0.01, ads_click=0.005),
        drop_after=0.5,
        span=25 * 60,
        late_fraction=0.0,
    ),
    "ctor-drop": Scenario(
        "a newsletter still opened as before whose openers stop clicking (content, call to action) "
        "for the second half of the run: FunnelCTORDrop, diagnosed ctor",
        subscribers=10_000,
        email_campaigns=1,
        ads_campaigns=0,
        funnel=HEALTHY,
        dropped=replace(HEALTHY, click_if_opened=0.01),
        drop_after=0.5,
        span=25 * 60,
        late_fraction=0.0,
    ),
}


def scenario(name: str, seed: int = 1, subscribers: int | None = None, start: float | None = None) -> Traffic:
    """The traffic of ``SCENARIOS[name]``; ``start``: event time of the first story (default:
    on the 5-minute boundary that makes the span end 15 to 20 minutes ago, so the alerts' 5m
    windows fall the same way on every run)."""
    chosen = SCENARIOS[name]
    if start is None:
        start = (int(time.time() - chosen.span - 900) // 300) * 300
    return generate(
        seed=seed,
        subscribers=subscribers or chosen.subscribers,
        email_campaigns=chosen.email_campaigns,
        ads_campaigns=chosen.ads_campaigns,
        start=start,
        span=chosen.span,
        late_fraction=chosen.late_fraction,
        drop_after=chosen.drop_after,
        funnel=chosen.funnel,
        dropped=chosen.dropped,
    )


def main(args: argparse.Namespace) -> int:
    async def run() -> int:
        if args.wait_ready:
            await wait_ready(args.url, args.wait_ready)
        traffic = scenario(args.scenario, args.seed, args.subscribers, args.start)
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
