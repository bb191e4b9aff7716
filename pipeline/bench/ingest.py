"""HTTP ingest: ``POST /events`` to a real worker (``pipeline worker``), in batches of 1,000 and
100 and as single events, with request latency percentiles.

The worker is the product as deployed: it validates, pseudonymises, groups by partition,
produces, and answers 202 only after the broker acknowledged; meanwhile its own stream stages
consume what it produced, on the same two cores. The client sends pre-encoded bodies with a few
requests in flight, so the client's own cost stays small.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from pipeline.bench.common import client_env, median_of, peak_rss_mib, progress


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class Worker:
    """A ``pipeline worker`` process with its HTTP port; ``security``: the ``PIPELINE_KAFKA_*``
    variables it connects to the broker with (TLS, SASL), in its environment as a deployment sets them."""

    def __init__(
        self, broker: str, workdir: Path, name: str = "ingest", security: Mapping[str, str] | None = None
    ) -> None:
        from pipeline.kafka.tansu import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"{name}.log"
        env = {
            **client_env(security),
            "PIPELINE_BROKER": broker,
            "PIPELINE_PORT": str(self.port),
            "PIPELINE_DATA_DIR": str(workdir / f"{name}-state"),
            "PIPELINE_APP_ID": f"bench-{name}",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "worker", "--loglevel", "warning"],
            env=env,
            stdout=open(self.log_path, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    async def wait_healthy(self, session: Any, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}")
            try:
                async with session.get(f"{self.url}/health") as resp:
                    if resp.status == 200:
                        return
            except Exception:
                pass
            await asyncio.sleep(0.3)
        raise RuntimeError("worker not healthy in time")

    def peak_rss_mib(self) -> float:
        return peak_rss_mib(self.proc.pid)

    def failure(self, wait: float = 0.0) -> str | None:
        """Why the worker is no longer sound, or None: it exited, or one of its services crashed
        (its log says so a moment before it exits; its ingest processes may still answer 202
        meanwhile). ``wait``: seconds to wait for it to exit first (after a failed request)."""
        if wait:
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            text = ""
        crashed = re.findall(r"Crashed reason=(.*?)\s*$", text, re.MULTILINE)
        code = self.proc.poll()
        if code is None and not crashed:
            return None
        state = "still running" if code is None else f"exited with {code}"
        reason = f"crashed: {crashed[-1]}" if crashed else "no crash in its log"
        return f"the pipeline worker {state}, {reason} (see {self.log_path})"

    def stop(self) -> None:
        from pipeline.bench.topology import stop_worker

        stop_worker(self.proc)


async def post_batches(
    session: Any, url: str, bodies: list[bytes], concurrency: int
) -> tuple[float, list[float], int]:
    """Send every body with ``concurrency`` requests in flight; (seconds, latencies, failures)."""
    latencies: list[float] = []
    failures = 0
    queue = list(reversed(bodies))

    async def client() -> None:
        nonlocal failures
        while queue:
            body = queue.pop()
            started = time.perf_counter()
            async with session.post(
                f"{url}/events", data=body, headers={"content-type": "application/json"}
            ) as resp:
                await resp.read()
                if resp.status != 202:
                    failures += 1
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies, failures


async def measure(
    session: Any, worker: Worker, events: list[dict[str, Any]], plan: list[tuple[int, int]], runs: int = 1
) -> list[dict]:
    """``plan``: (events per request, number of requests) rows, each measured in turn, ``runs``
    times with new events each time (a row lasts seconds, and on a shared machine one burst
    of other work moves it a lot): the run of median rate is reported, every run's rate beside it.
    """
    rows = []
    offset = 0
    for size, requests in plan:
        # whole batches keep several ingest requests in flight, as many ad servers posting at once
        # would; each waits for the broker's acknowledgement, so 4 in flight measured the wait
        concurrency = 16 if size >= 1000 else 4 if size >= 100 else 8
        measured = []
        for run in range(runs):
            bodies = []
            for _ in range(requests):
                chunk = events[offset : offset + size]
                offset += size
                bodies.append(orjson.dumps(chunk if size > 1 else chunk[0]))
            progress(
                f"ingest: {requests} requests of {size} event(s), {concurrency} in flight, "
                f"run {run + 1} of {runs}"
            )
            seconds, latencies, failures = await post_batches(session, worker.url, bodies, concurrency)
            sent = size * requests
            measured.append(
                {
                    "batch": size,
                    "requests": requests,
                    "events": sent,
                    "seconds": seconds,
                    "events_per_s": sent / seconds,
                    "requests_per_s": requests / seconds,
                    "p50_ms": percentile(latencies, 50) * 1000,
                    "p99_ms": percentile(latencies, 99) * 1000,
                    "failures": failures,
                }
            )
        rows.append({**median_of(measured), "failures": sum(row["failures"] for row in measured)})
    return rows
