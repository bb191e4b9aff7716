"""Sustained capacity, end to end: HTTP in, ``/metrics`` out, through ``pipeline worker``.

What a team gets: a real ``pipeline worker`` (the command users run, with its default process
counts) on a broker given by address (the embedded Tansu or Apache Kafka), fed over HTTP at a
fixed offered rate per step, the steps rising by ``growth`` until a rate fails twice in a row
(once may be other work on a shared machine; a first rate that fails twice is halved, up to
:data:`MAX_LOWERINGS` times, so the search starts below the knee):

* the load is batches of 1,000 canonical events to ``POST /events`` plus signed SendGrid
  webhooks (``POST /webhooks/sendgrid``, ECDSA with a test key), sent open-loop on a
  schedule; a request answered 503 is retried as a provider would (a redelivery is dropped by
  the pipeline's dedupe, so counts stay exact);
* every ``probe_every`` seconds a probe webhook with a campaign of its own is posted, and
  ``/metrics`` is scraped every ``poll`` seconds until the probe's click shows: that is the
  webhook-to-``/metrics`` latency; the same scrapes sample ``pipeline_consumer_lag``;
* a step passes when every request was accepted, every probe was seen, the probes' p99 is at
  most :data:`P99_LIMIT_S` and the consumer lag did not grow over the step; the sustained
  capacity is the highest passing rate, and the curve is every step's figures;
* then one more step at half that capacity checks the latency goal there;
* at the end the worker drains and every campaign's counts on ``/metrics`` (totals, uniques,
  duplicates) and the ingest counters are compared with the ground truth of what was sent.

The workload is the topology bench's (clicks, Zipf campaigns and subscribers, 10 %
redeliveries), as a *lap* of pre-encoded bodies: every lap sends the same bodies with a lap
number put in front of every event id and subscriber, so each lap is new events of new
subscribers with exactly the counts of the first, and the truth is the lap's times the laps.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from pipeline.bench.common import client_env, kafka_version, open_broker, peak_rss_mib, progress
from pipeline.bench.data import expected_counts, generate
from pipeline.bench.ingest import percentile

P99_LIMIT_S = 2.0
MAX_LOWERINGS = 3  # a first step that fails is halved this many times at most
PLACEHOLDER = b"@@@@@@@@"  # replaced by the lap number (8 digits) in every id of a lap's bodies
LAP_DIGITS = len(PLACEHOLDER)
SALT = "bench-sustained-salt-0123456789abcdef"  # 32+ characters: a salt a worker accepts anywhere
SENDGRID_SIG = "x-twilio-email-event-webhook-signature"
SENDGRID_TS = "x-twilio-email-event-webhook-timestamp"
LAG_LINE = re.compile(rb"^pipeline_consumer_lag\{[^}]*\} ([0-9.eE+-]+)$", re.M)  # label order aside


@dataclass(frozen=True)
class Plan:
    hold_s: float  # seconds each step offers its rate
    start_rate: float  # events/s of the first step
    growth: float  # each next step offers this times the previous rate
    max_steps: int
    half_hold_s: float  # the step at half the capacity found
    probe_every_s: float
    poll_s: float  # /metrics scrape interval (probe detection and lag samples)
    batches_per_lap: int  # /events bodies of `batch` events in a lap
    batch: int
    webhooks_per_lap: int  # signed SendGrid bodies of `webhook_events` events in a lap
    webhook_events: int
    campaigns: int
    population: int  # subscribers in a lap
    drain_timeout_s: float


def plan_for(small: bool, start_rate: float | None = None) -> Plan:
    if small:
        return Plan(
            hold_s=4.0,
            start_rate=start_rate or 2_000.0,
            growth=1.5,
            max_steps=2,
            half_hold_s=3.0,
            probe_every_s=0.5,
            poll_s=0.25,
            batches_per_lap=2,
            batch=1000,
            webhooks_per_lap=1,
            webhook_events=200,
            campaigns=10,
            population=500,
            drain_timeout_s=120.0,
        )
    return Plan(
        hold_s=60.0,
        start_rate=start_rate or 8_000.0,
        growth=1.15,
        max_steps=12,
        half_hold_s=60.0,
        probe_every_s=0.5,
        poll_s=0.25,
        batches_per_lap=8,
        batch=1000,
        webhooks_per_lap=4,
        webhook_events=250,
        campaigns=100,
        population=4_000,
        drain_timeout_s=180.0,
    )


# --- the workload --------------------------------------------------------------------------


@dataclass
class Lap:
    """Pre-encoded bodies of one lap and the counts one lap must add, per campaign."""

    events_bodies: list[bytes]
    webhook_bodies: list[bytes]
    events_per_lap: int
    canonical_events: int  # of them through /events
    webhook_events: int  # of them through the SendGrid webhook
    expected: dict[str, dict[str, Any]]  # "channel|campaign" -> counts and duplicates


def build_lap(plan: Plan, now: float, seed: int = 31) -> Lap:
    canonical_total = plan.batches_per_lap * plan.batch
    webhook_total = plan.webhooks_per_lap * plan.webhook_events
    canonical = generate(canonical_total, campaigns=plan.campaigns, subscribers=plan.population, seed=seed)
    native = generate(webhook_total, campaigns=plan.campaigns, subscribers=plan.population, seed=seed + 1)
    prefix = PLACEHOLDER.decode()
    # event time within the last minute: nothing is late, whichever lap it is in
    events = []
    for n, event in enumerate(canonical.events):
        events.append(
            {
                **event,
                "event_id": prefix + event["event_id"],
                "subscriber_id": prefix + event["subscriber_id"],
                "timestamp": round(now - 60 + (n % 600) / 10, 3),
            }
        )
    events_bodies = [orjson.dumps(events[i : i + plan.batch]) for i in range(0, canonical_total, plan.batch)]
    # SendGrid's own form; what the adapter makes of it is what the truth model is given
    items, truth = [], []
    for n, event in enumerate(native.events):
        email = f"{prefix}{event['subscriber_id']}@example.com"
        timestamp = int(now - 60 + (n % 60))
        items.append(
            {
                "email": email,
                "timestamp": timestamp,
                "event": "click",
                "sg_event_id": prefix + event["event_id"],
                "sg_message_id": f"{prefix}{event['event_id']}.filter0001",
                "campaign_id": event["campaign_id"],
                "url": "https://shop.example.com/sale",
            }
        )
        truth.append(
            {
                "event_id": "sendgrid:" + prefix + event["event_id"],
                "channel": "email",
                "campaign_id": event["campaign_id"],
                "subscriber_id": email,
                "timestamp": float(timestamp),
                "type": "click",
            }
        )
    webhook_bodies = [
        orjson.dumps(items[i : i + plan.webhook_events]) + b"\r\n"
        for i in range(0, webhook_total, plan.webhook_events)
    ]
    expected = expected_counts(events + truth)
    for doc in expected.values():
        doc.pop("windows", None)
    return Lap(
        events_bodies,
        webhook_bodies,
        canonical_total + webhook_total,
        canonical_total,
        webhook_total,
        expected,
    )


def lap_body(template: bytes, lap: int) -> bytes:
    return template.replace(PLACEHOLDER, b"%0*d" % (LAP_DIGITS, lap))


class SendGridSigner:
    """Signs SendGrid bodies as SendGrid does (ECDSA P-256 over timestamp + body)."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        self._ec = ec
        self.key = ec.generate_private_key(ec.SECP256R1())
        der = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_key = base64.b64encode(der).decode("ascii")  # as SendGrid shows it

    def headers(self, body: bytes) -> dict[str, str]:
        from cryptography.hazmat.primitives import hashes

        timestamp = str(int(time.time()))
        signature = self.key.sign(timestamp.encode("ascii") + body, self._ec.ECDSA(hashes.SHA256()))
        return {
            "content-type": "application/json",
            SENDGRID_SIG: base64.b64encode(signature).decode("ascii"),
            SENDGRID_TS: timestamp,
        }


# --- the worker ----------------------------------------------------------------------------


class WorkerUnderTest:
    """``pipeline worker`` as users start it, with an admin port for /metrics."""

    def __init__(self, broker: str, workdir: Path, signer: SendGridSigner, extra_env: dict[str, str]) -> None:
        from pipeline.kafka.tansu import free_port

        self.port = free_port()
        self.admin_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.log_path = workdir / "sustained-worker.log"
        env = {
            **client_env(),  # without PIPELINE_KAFKA_* connection variables but those of extra_env
            "PIPELINE_BROKER": broker,
            "PIPELINE_PORT": str(self.port),
            "PIPELINE_ADMIN_PORT": str(self.admin_port),
            "PIPELINE_DATA_DIR": str(workdir / "sustained-state"),
            "PIPELINE_APP_ID": "bench-sustained",
            "PIPELINE_ID_SALT": SALT,
            "SENDGRID_WEBHOOK_PUBLIC_KEY": signer.public_key,
            # every probe is a campaign of its own, a thousand and more in a full run: the
            # default export limit would drop the least recently active campaigns (the load's)
            "PIPELINE_MAX_CAMPAIGNS": "100000",
            **extra_env,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "worker", "--loglevel", "warning"],
            env=env,
            stdout=open(self.log_path, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    async def wait_healthy(self, session: Any, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}; see {self.log_path}")
            try:
                async with session.get(f"{self.admin_url}/health") as resp:
                    if resp.status == 200:
                        async with session.get(f"{self.url}/livez") as live:
                            if live.status == 200:
                                return
            except Exception:
                pass
            await asyncio.sleep(0.3)
        raise RuntimeError(f"worker not healthy within {timeout}s; see {self.log_path}")

    def process_tree(self) -> list[int]:
        """The worker and every process it started (its ingest processes)."""
        pids = [self.proc.pid]
        for pid in pids:
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            pids += [int(child) for child in children]
        return pids

    def cpu_seconds(self) -> float:
        total = 0.0
        ticks = os.sysconf("SC_CLK_TCK")
        for pid in self.process_tree():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
        return total

    def peak_rss_mib(self) -> float:
        return sum(peak_rss_mib(pid) for pid in self.process_tree())

    def stop(self) -> None:
        from pipeline.bench.topology import stop_worker

        stop_worker(self.proc)


# --- one step ------------------------------------------------------------------------------


@dataclass
class StepResult:
    target_rate: float
    achieved_rate: float
    seconds: float
    events: int
    requests: int
    failed_requests: int  # gave up after the retries
    retried_requests: int
    probes: int
    probes_seen: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    lag_first: float  # mean consumer lag (messages) in the step's first third
    lag_last: float  # and in its last third
    lag_max: float
    lag_grows: bool
    behind: bool  # the client could not keep the schedule (too many requests in flight)
    worker_cpu_s: float
    passed: bool
    kind: str = "step"
    load: float = 0.0  # the machine's 1-minute load average at the step's end (others' work too)
    # (seconds into the step when posted, latency ms) of every probe seen: where the slow ones were
    probe_series: list[tuple[float, float]] = field(default_factory=list)


class Load:
    """Sends laps on a schedule and keeps the totals the ground truth needs."""

    MAX_IN_FLIGHT = 64
    RETRIES = 8

    def __init__(self, session: Any, worker: WorkerUnderTest, lap: Lap, signer: SendGridSigner) -> None:
        self.session = session
        self.worker = worker
        self.lap = lap
        self.signer = signer
        self.laps_sent = 0
        self.failed = 0
        self.retried = 0
        self.in_flight = 0

    async def _post(self, path: str, body: bytes, signed: bool) -> None:
        self.in_flight += 1
        try:
            for attempt in range(self.RETRIES + 1):
                headers = self.signer.headers(body) if signed else {"content-type": "application/json"}
                try:
                    async with self.session.post(f"{self.worker.url}{path}", data=body, headers=headers) as r:
                        await r.read()
                        if r.status in (200, 202):
                            return
                        retry = r.status == 503
                except Exception:
                    retry = True
                if not retry or attempt == self.RETRIES:
                    break
                self.retried += 1 if attempt == 0 else 0
                await asyncio.sleep(0.2 * (attempt + 1))
            self.failed += 1
        finally:
            self.in_flight -= 1

    def requests_of_lap(self, lap: int) -> list[tuple[str, bytes, bool]]:
        """A lap's requests, webhooks spread evenly among the /events batches."""
        out: list[tuple[str, bytes, bool]] = []
        events, hooks = self.lap.events_bodies, self.lap.webhook_bodies
        every = max(1, len(events) // max(1, len(hooks)))
        hook = 0
        for n, body in enumerate(events):
            out.append(("/events", lap_body(body, lap), False))
            if hook < len(hooks) and (n + 1) % every == 0:
                out.append(("/webhooks/sendgrid", lap_body(hooks[hook], lap), True))
                hook += 1
        out += [("/webhooks/sendgrid", lap_body(h, lap), True) for h in hooks[hook:]]
        return out

    async def offer(self, rate: float, seconds: float) -> tuple[int, int, bool]:
        """Whole laps at ``rate`` events/s for about ``seconds``; (events, requests, behind)."""
        tasks: set[asyncio.Task] = set()
        started = time.perf_counter()
        sent_events = requests = 0
        behind = False
        while True:
            # a lap always completes, so the truth is whole laps
            if time.perf_counter() - started >= seconds and sent_events:
                break
            self.laps_sent += 1
            for path, body, signed in self.requests_of_lap(self.laps_sent):
                due = started + sent_events / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                while self.in_flight >= self.MAX_IN_FLIGHT:
                    behind = True  # open loop no more: the worker is not answering fast enough
                    await asyncio.sleep(0.01)
                task = asyncio.ensure_future(self._post(path, body, signed))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                requests += 1
                sent_events += (
                    self.lap.webhook_events // len(self.lap.webhook_bodies)
                    if signed
                    else (self.lap.canonical_events // len(self.lap.events_bodies))
                )
        if tasks:
            await asyncio.gather(*tasks)
        return sent_events, requests, behind


class Watcher:
    """Scrapes /metrics: probe arrivals and consumer lag samples."""

    def __init__(self, session: Any, worker: WorkerUnderTest, plan: Plan, signer: SendGridSigner) -> None:
        self.session = session
        self.worker = worker
        self.plan = plan
        self.signer = signer
        self.pending: dict[bytes, float] = {}  # needle -> posted at
        self.series: list[tuple[float, float]] = []  # (posted at, latency) of every probe seen
        self.lags: list[tuple[float, float]] = []
        self.probes = 0
        self.failed_probes = 0
        self.probe_number = 0
        self.accepted_probes = 0  # over every step: each shows as one campaign in the end
        self.scrapes = 0

    @property
    def latencies(self) -> list[float]:
        """Seconds from post to showing on ``/metrics``, of every probe seen."""
        return [latency for _, latency in self.series]

    async def scrape(self) -> bytes:
        async with self.session.get(f"{self.worker.admin_url}/metrics") as resp:
            return await resp.read()

    async def poll_once(self) -> None:
        text = await self.scrape()
        now = time.perf_counter()
        self.scrapes += 1
        for needle, posted in list(self.pending.items()):
            if needle in text:
                self.series.append((posted, now - posted))
                del self.pending[needle]
        self.lags.append((now, sum(float(value) for value in LAG_LINE.findall(text))))

    async def probe(self, label: str) -> None:
        self.probe_number += 1
        campaign = f"probe-{label}-{self.probe_number}"
        body = (
            orjson.dumps(
                [
                    {
                        "email": f"probe-{label}-{self.probe_number}@example.com",
                        "timestamp": int(time.time()),
                        "event": "click",
                        "sg_event_id": f"{campaign}-ev",
                        "sg_message_id": f"{campaign}.filter0001",
                        "campaign_id": campaign,
                        "url": "https://example.com/",
                    }
                ]
            )
            + b"\r\n"
        )
        # a campaign shows on /metrics once its first snapshot is aggregated: with the click
        needle = f'campaign="{campaign}"'.encode()
        posted = time.perf_counter()
        self.probes += 1
        try:
            async with self.session.post(
                f"{self.worker.url}/webhooks/sendgrid", data=body, headers=self.signer.headers(body)
            ) as resp:
                await resp.read()
                ok = resp.status == 200
        except Exception:
            ok = False
        if ok:
            self.accepted_probes += 1
            self.pending[needle] = posted
        else:
            self.failed_probes += 1

    async def run(self, stop: asyncio.Event, label: str) -> None:
        """Probe every ``probe_every_s`` and scrape every ``poll_s`` until ``stop``."""
        next_probe = time.perf_counter()
        probes: set[asyncio.Task] = set()
        while not stop.is_set():
            if time.perf_counter() >= next_probe:
                task = asyncio.ensure_future(self.probe(label))
                probes.add(task)
                task.add_done_callback(probes.discard)
                next_probe += self.plan.probe_every_s
            try:
                await self.poll_once()
            except Exception:
                pass
            await asyncio.sleep(self.plan.poll_s)
        await asyncio.gather(*probes)

    async def settle(self, timeout: float) -> None:
        """Give probes still pending up to ``timeout`` seconds more (they count as slow, not lost)."""
        deadline = time.perf_counter() + timeout
        while self.pending and time.perf_counter() < deadline:
            await asyncio.sleep(self.plan.poll_s)
            await self.poll_once()

    def reset(self) -> None:
        self.pending.clear()
        self.series = []
        self.lags = []
        self.probes = 0
        self.failed_probes = 0


LAG_FLOOR = 200  # messages: a few seconds of input at these rates, well above the sampling jitter


def lag_trend(samples: list[tuple[float, float]]) -> tuple[float, float, float, bool]:
    """(first-third mean, last-third mean, max, grows) of the step's lag samples (messages).

    The lag grows when the last third's mean is above the first third's by more than half of
    it and more than :data:`LAG_FLOOR`: a queue that keeps up wobbles around a level (a scrape
    may land just before or after a batch is taken), one that does not climbs all step.
    """
    values = [lag for _, lag in samples]
    if len(values) < 6:
        return 0.0, 0.0, max(values, default=0.0), False
    third = len(values) // 3
    first, last = sum(values[:third]) / third, sum(values[-third:]) / third
    grows = last - first > max(LAG_FLOOR, 0.5 * first)
    return first, last, max(values), grows


async def run_step(
    load: Load, watcher: Watcher, worker: WorkerUnderTest, rate: float, hold: float, label: str, kind: str
) -> StepResult:
    watcher.reset()
    stop = asyncio.Event()
    cpu_before = worker.cpu_seconds()
    watching = asyncio.ensure_future(watcher.run(stop, label))
    started = time.perf_counter()
    failed_before, retried_before = load.failed, load.retried
    events, requests, behind = await load.offer(rate, hold)
    seconds = time.perf_counter() - started
    stop.set()
    await watching
    await watcher.settle(timeout=10.0)
    cpu = worker.cpu_seconds() - cpu_before
    lost = len(watcher.pending) + watcher.failed_probes
    latencies = watcher.latencies
    first, last, lag_max, grows = lag_trend(watcher.lags)
    p99 = percentile(latencies, 99)
    failed = load.failed - failed_before
    step = StepResult(
        target_rate=rate,
        achieved_rate=events / seconds,
        seconds=seconds,
        events=events,
        requests=requests,
        failed_requests=failed,
        retried_requests=load.retried - retried_before,
        probes=watcher.probes,
        probes_seen=watcher.probes - lost,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=p99 * 1000,
        max_ms=max(latencies, default=0.0) * 1000,
        lag_first=first,
        lag_last=last,
        lag_max=lag_max,
        lag_grows=grows,
        behind=behind,
        worker_cpu_s=cpu,
        passed=bool(latencies) and not (failed or lost or grows or behind) and p99 <= P99_LIMIT_S,
        kind=kind,
        load=os.getloadavg()[0],
        probe_series=[(round(at - started, 2), round(latency * 1000)) for at, latency in watcher.series],
    )
    progress(
        f"sustained {label}: {step.achieved_rate:,.0f} events/s offered (target {rate:,.0f}), "
        f"p50 {step.p50_ms:,.0f} ms, p99 {step.p99_ms:,.0f} ms, {step.probes_seen}/{step.probes} probes, "
        f"lag {first:,.0f} -> {last:,.0f} (max {lag_max:,.0f}), {failed} failed, worker CPU "
        f"{cpu / seconds:.2f} cores, load {step.load:.1f}: {'PASS' if step.passed else 'FAIL'}"
    )
    return step


async def drain(watcher: Watcher, timeout: float) -> float:
    """Wait until the worker's consumer lag is 0; return the seconds it took."""
    started = time.perf_counter()
    zero_in_a_row = 0
    while time.perf_counter() - started < timeout:
        try:
            await watcher.poll_once()
            zero_in_a_row = zero_in_a_row + 1 if watcher.lags[-1][1] == 0 else 0
        except Exception:
            zero_in_a_row = 0
        if zero_in_a_row >= 3:
            break
        await asyncio.sleep(0.5)
    return time.perf_counter() - started


# --- ground truth --------------------------------------------------------------------------

SAMPLE_LINE = re.compile(rb"^([a-z_]+)\{([^}]*)\} ([0-9.eE+-]+)$", re.M)
LABEL = re.compile(r'(\w+)="([^"]*)"')


def samples(text: bytes, names: set[str]) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample of the named metrics in an exposition text."""
    out = []
    for name, labels, value in SAMPLE_LINE.findall(text):
        if name.decode() in names:
            out.append((name.decode(), dict(LABEL.findall(labels.decode())), float(value)))
    return out


def exported_counts(text: bytes) -> dict[str, dict[str, int]]:
    """Per "channel|campaign": the exported totals and uniques (unique ones as unique_<event>)."""
    out: dict[str, dict[str, int]] = {}
    for name, labels, value in samples(text, {"funnel_events_total", "funnel_unique_events_total"}):
        key = f"{labels['channel']}|{labels['campaign']}"
        event = labels["event"] if name == "funnel_events_total" else f"unique_{labels['event']}"
        if round(value):
            out.setdefault(key, {})[event] = round(value)
    return out


def check_truth(text: bytes, lap: Lap, laps: int, probes: int) -> list[str]:
    """Differences between what /metrics exports and what was sent (empty: exact); the totals
    first, then campaign by campaign."""
    problems = []
    overflow = sum(v for _, _, v in samples(text, {"pipeline_campaigns_overflow"}))
    if overflow:
        problems.append(f"{overflow:.0f} campaigns not exported (PIPELINE_MAX_CAMPAIGNS)")
    ingested = {
        labels["source"]: round(v) for _, labels, v in samples(text, {"pipeline_events_ingested_total"})
    }
    want_ingested = {"canonical": lap.canonical_events * laps, "sendgrid": lap.webhook_events * laps + probes}
    if ingested != want_ingested:
        problems.append(f"pipeline_events_ingested_total {ingested} != {want_ingested}")
    want_dups = laps * sum(doc["duplicates"] for doc in lap.expected.values())
    dups = sum(round(v) for _, _, v in samples(text, {"pipeline_duplicates_dropped_total"}))
    if dups != want_dups:
        problems.append(f"duplicates dropped {dups} != {want_dups} sent")
    got = exported_counts(text)
    for key, doc in lap.expected.items():
        want = {name: n * laps for name, n in doc["counts"].items() if n and name != "bot_click"}
        have = got.pop(key, {})
        if have != want:
            problems.append(f"{key}: exported {have} != sent {want}")
    probe_campaigns = [key for key in got if key.startswith("email|probe-")]
    for key in probe_campaigns:
        if got.pop(key) != {"click": 1, "unique_click": 1, "unique_open": 1, "unique_human_open": 1}:
            problems.append(f"{key}: a probe is not exactly one click")
    if len(probe_campaigns) != probes:
        problems.append(f"{len(probe_campaigns)} probe campaigns exported, {probes} probes accepted")
    for key in got:
        problems.append(f"{key}: exported but never sent")
    return problems


# --- the mechanism -------------------------------------------------------------------------


async def _measure(
    broker: str, broker_kind: str, workdir: Path, plan: Plan, extra_env: dict[str, str]
) -> dict[str, Any]:
    import aiohttp

    signer = SendGridSigner()
    lap = build_lap(plan, time.time())
    worker = WorkerUnderTest(broker, workdir, signer, extra_env)
    result: dict[str, Any] = {"broker": broker_kind, "plan": asdict(plan), "cpus": os.cpu_count()}
    connector = aiohttp.TCPConnector(limit=Load.MAX_IN_FLIGHT + 16)
    try:
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=60)
        ) as session:
            progress(f"sustained on {broker_kind}: starting `pipeline worker`")
            await worker.wait_healthy(session)
            load = Load(session, worker, lap, signer)
            watcher = Watcher(session, worker, plan, signer)
            steps: list[StepResult] = []
            rate = plan.start_rate
            lowered = 0
            retried = False
            for n in range(plan.max_steps):
                step = await run_step(load, watcher, worker, rate, plan.hold_s, f"step{n + 1}", "step")
                steps.append(step)
                waited = await drain(watcher, plan.drain_timeout_s)
                progress(f"sustained: drained in {waited:.1f}s")
                if step.passed:
                    rate *= plan.growth
                    retried = False
                elif not retried:
                    # once more at the same rate: on a shared machine a burst of other work can
                    # fail one step; what fails twice in a row is taken as the knee
                    retried = True
                elif not any(s.passed for s in steps) and lowered < MAX_LOWERINGS:
                    lowered += 1  # the first rate was already too high: look below it
                    rate /= 2
                    retried = False
                else:
                    break
            passing = [s.achieved_rate for s in steps if s.passed]
            capacity = max(passing, default=0.0)
            result["capacity_events_per_s"] = capacity
            if capacity:
                half = await run_step(
                    load, watcher, worker, capacity / 2, plan.half_hold_s, "half", "half capacity"
                )
                steps.append(half)
                result["half"] = asdict(half)
            result["steps"] = [asdict(s) for s in steps]
            waited = await drain(watcher, plan.drain_timeout_s)
            text = await watcher.scrape()
            (workdir / "sustained-final-metrics.txt").write_bytes(text)
            result["drain_seconds"] = waited
            result["laps"] = load.laps_sent
            result["events_sent"] = load.laps_sent * lap.events_per_lap
            result["failed_requests"] = load.failed
            result["retried_requests"] = load.retried
            if load.failed:
                result["problems"] = [f"{load.failed} requests failed: the truth is unknown"]
            else:
                # a probe seen late (or after its step) still counts once on /metrics
                result["problems"] = check_truth(text, lap, load.laps_sent, watcher.accepted_probes)[:20]
            result["exact"] = not result["problems"]
            result["worker_peak_rss_mib"] = worker.peak_rss_mib()
            result["worker_processes"] = len(worker.process_tree())
    finally:
        worker.stop()
    return result


def measure(
    broker: str,
    broker_kind: str,
    workdir: Path,
    *,
    small: bool = False,
    start_rate: float | None = None,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The sustained capacity of ``pipeline worker`` on the broker at ``broker``.

    ``broker_kind`` names it in the results (``tansu``, ``kafka``); ``start_rate`` is the
    first step's offered rate (events/s).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(_measure(broker, broker_kind, workdir, plan_for(small, start_rate), extra_env or {}))


def measure_on(
    kinds: list[str], workdir: Path, *, small: bool = False, start_rate: float | None = None
) -> dict[str, dict[str, Any]]:
    """:func:`measure` on a fresh broker of each kind: ``tansu`` (embedded), ``kafka`` or
    ``kafka-<version>`` (one Apache Kafka node from its jars, see :mod:`pipeline.kafka`),
    ``kafka-sasl`` (the same serving SASL_SSL, the worker connecting with SCRAM-SHA-512), one
    after the other (:func:`~pipeline.bench.common.open_broker`)."""
    for kind in kinds:
        kafka_version(kind)  # an unknown kind stops the run before any work

    results: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        rundir = Path(workdir) / f"sustained-{kind}"
        rundir.mkdir(parents=True, exist_ok=True)
        if kind != "tansu":
            progress(f"sustained: starting Apache Kafka {kafka_version(kind)} (one node, {kind})")
        with open_broker(kind, rundir, "kafka" if kind != "tansu" else "broker") as broker:
            security = dict(broker.security)  # the worker's PIPELINE_KAFKA_* (none: plain TCP)
            results[kind] = measure(
                broker.address, kind, rundir, small=small, start_rate=start_rate, extra_env=security
            )
    return results


def render(results: dict[str, dict[str, Any]]) -> list[str]:
    """The latency curve of every broker kind, one row a step."""
    lines = []
    for kind, doc in results.items():
        plan = doc.get("plan", {})
        lines.append(
            f"sustained, end to end on {kind}: `pipeline worker` ({doc.get('worker_processes', '?')} "
            f"processes), HTTP batches of {plan.get('batch', 0):,} + signed SendGrid webhooks, "
            f"steps of {plan.get('hold_s', 0):.0f} s, probes every {plan.get('probe_every_s', 0)} s"
        )
        lines.append(
            f"  {'step':<14} {'events/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'probes':>8} "
            f"{'lag first->last (max)':>22} {'CPU cores':>9} {'load':>5}  result"
        )
        for step in doc.get("steps", []):
            lag = f"{step['lag_first']:,.0f}->{step['lag_last']:,.0f} ({step['lag_max']:,.0f})"
            why = []
            if step["failed_requests"]:
                why.append(f"{step['failed_requests']} requests failed")
            if step["behind"]:
                why.append("client fell behind")
            if step["lag_grows"]:
                why.append("lag grows")
            if step["probes_seen"] < step["probes"]:
                why.append(f"{step['probes'] - step['probes_seen']} probes not seen")
            if step["p99_ms"] > P99_LIMIT_S * 1000:
                why.append("p99 > 2 s")
            verdict = "pass" if step["passed"] else "FAIL: " + ", ".join(why)
            lines.append(
                f"  {step['kind']:<14} {step['achieved_rate']:>9,.0f} {step['p50_ms']:>8,.0f} "
                f"{step['p99_ms']:>8,.0f} {step['max_ms']:>8,.0f} "
                f"{step['probes_seen']:>3}/{step['probes']:<4} {lag:>22} "
                f"{step['worker_cpu_s'] / step['seconds']:>9.2f} {step.get('load', 0):>5.1f}  {verdict}"
            )
        lines.append(
            f"  sustained capacity (p99 <= 2 s, lag not growing): "
            f"{doc.get('capacity_events_per_s', 0):,.0f} events/s; {doc.get('events_sent', 0):,} events "
            f"sent, counts on /metrics exact: {'yes' if doc.get('exact') else 'NO'}"
        )
        lines += [f"  {problem}" for problem in doc.get("problems", [])]
    return lines
