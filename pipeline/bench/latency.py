"""Webhook to ``/metrics``: how long until a provider's event shows in the exported counts.

While background traffic runs at a fixed rate (half of what the worker sustains), a probe
SendGrid webhook with a campaign of its own is posted, and ``/metrics`` is polled until that
campaign's ``funnel_events_total`` appears; one probe at a time.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from pipeline.bench.common import progress
from pipeline.bench.ingest import Worker, percentile


async def background_load(
    session: Any, url: str, events: list[dict[str, Any]], rate: float, stop: asyncio.Event
) -> int:
    """POST batches of 1,000 events at ``rate`` events/s until ``stop``; return events sent."""
    size = 1000
    interval = size / rate
    sent = 0
    next_at = time.perf_counter()
    tasks: set[asyncio.Task] = set()

    async def post(body: bytes) -> None:
        async with session.post(
            f"{url}/events", data=body, headers={"content-type": "application/json"}
        ) as resp:
            await resp.read()

    offset = 0
    lap = 0
    while not stop.is_set():
        if offset + size > len(events):
            offset, lap = 0, lap + 1  # again, under new event ids: new events, not redeliveries
        chunk = events[offset : offset + size]
        if lap:
            chunk = [{**e, "event_id": f"{e['event_id']}~{lap}"} for e in chunk]
        body = orjson.dumps(chunk)
        offset += size
        task = asyncio.ensure_future(post(body))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        sent += size
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
    return sent


POLL = 0.2  # a scrape renders every campaign: polling much faster would load the worker itself


async def consumer_lag(session: Any, url: str) -> int:
    async with session.get(f"{url}/metrics") as resp:
        text = (await resp.read()).decode()
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith("pipeline_consumer_lag{")
    )


async def drain(session: Any, url: str, timeout: float = 90.0) -> float:
    """Wait until the worker consumed everything produced so far; return the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if await consumer_lag(session, url) == 0:
            break
        await asyncio.sleep(0.5)
    return time.perf_counter() - started


async def probe(session: Any, url: str, n: int, timeout: float = 10.0) -> float | None:
    campaign = f"probe-{int(time.time())}-{n}"
    body = orjson.dumps(
        [
            {
                "email": f"probe{n}@example.com",
                "timestamp": int(time.time()),
                "event": "click",
                "sg_event_id": f"{campaign}-ev",
                "sg_message_id": f"{campaign}.filter0001",
                "campaign_id": campaign,
                "url": "https://example.com/",
            }
        ]
    )
    needle = f'campaign="{campaign}"'.encode()
    started = time.perf_counter()
    async with session.post(
        f"{url}/webhooks/sendgrid", data=body, headers={"content-type": "application/json"}
    ) as resp:
        await resp.read()
        if resp.status >= 300:
            return None
    while time.perf_counter() - started < timeout:
        async with session.get(f"{url}/metrics") as resp:
            text = await resp.read()
        if needle in text:
            return time.perf_counter() - started
        await asyncio.sleep(POLL)
    return None


async def measure(
    session: Any, worker: Worker, events: list[dict[str, Any]], rate: float, probes: int
) -> dict:
    waited = await drain(session, worker.url)
    progress(f"latency: worker drained in {waited:.1f}s; {probes} webhook probes under {rate:,.0f} events/s")
    stop = asyncio.Event()
    load = asyncio.ensure_future(background_load(session, worker.url, events, rate, stop))
    await asyncio.sleep(1.0)
    latencies: list[float] = []
    lost = 0
    started = time.perf_counter()
    for n in range(probes):
        result = await probe(session, worker.url, n)
        if result is None:
            lost += 1
        else:
            latencies.append(result)
        await asyncio.sleep(0.2)
    stop.set()
    sent = await load
    seconds = time.perf_counter() - started + 1.0
    return {
        "target_rate": rate,
        "background_events": sent,
        "achieved_rate": sent / seconds,
        "probes": probes,
        "lost": lost,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies, default=0.0) * 1000,
        "poll_ms": POLL * 1000,
    }
