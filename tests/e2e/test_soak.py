"""Soak: a steady load on loopback for PIPELINE_SOAK_SECONDS (600 for the documented run),
sampling the worker's RSS. Memory must be flat once the dedupe state is at its steady size.

Opt-in because of its length: ``PIPELINE_SOAK_SECONDS=600 pytest tests/e2e/test_soak.py -s``.
"""

from __future__ import annotations

import json
import os
import random
import time

import httpx
import pytest
from conftest import WorkerProcess

SECONDS = int(os.environ.get("PIPELINE_SOAK_SECONDS", "0"))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.skipif(not SECONDS, reason="opt-in: set PIPELINE_SOAK_SECONDS (600 for the documented run)")
@pytest.mark.timeout(SECONDS + 400)
def test_soak_memory_flat(broker, tmp_path, workers):
    worker = WorkerProcess(broker.address, tmp_path, env={"PIPELINE_WINDOWS": "1m,5m"}).start()
    workers.append(worker)
    rng = random.Random(9)
    subscribers = [f"soak-{i}" for i in range(20_000)]
    campaigns = [f"soak-campaign-{i}" for i in range(10)]
    client = httpx.Client(timeout=30)
    samples: list[tuple[float, float]] = []
    sent_clicks: dict[str, int] = {c: 0 for c in campaigns}
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < SECONDS:
        batch = []
        now = time.time()
        for _ in range(1000):
            n += 1
            campaign = campaigns[n % len(campaigns)]
            kind = "click" if n % 10 == 0 else "open"
            batch.append(
                {
                    "event_id": f"soak-{n}",
                    "type": kind,
                    "channel": "email",
                    "campaign_id": campaign,
                    "subscriber_id": rng.choice(subscribers),
                    "timestamp": now,
                }
            )
            if kind == "click":
                sent_clicks[campaign] += 1
        assert client.post(f"{worker.url}/events", json=batch).status_code == 202
        elapsed = time.monotonic() - start
        if not samples or elapsed - samples[-1][0] >= 10:
            samples.append((elapsed, rss_mib(worker.process.pid)))
            print(f"soak t={elapsed:.0f}s events={n} rss={samples[-1][1]:.1f} MiB", flush=True)
        time.sleep(max(0.0, 0.5 - (time.monotonic() - start - elapsed)))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        docs = {c["campaign_id"]: c for c in client.get(f"{worker.url}/campaigns").json()["campaigns"]}
        if all(docs.get(c, {}).get("counts", {}).get("click") == sent_clicks[c] for c in campaigns):
            break
        time.sleep(1)
    print(
        json.dumps(
            {"events": n, "seconds": SECONDS, "rss_mib": [(round(t), round(m, 1)) for t, m in samples]}
        )
    )
    for c in campaigns:
        assert docs[c]["counts"]["click"] == sent_clicks[c]
    third = [m for t, m in samples if t >= SECONDS / 3]
    assert max(third) <= third[0] * 1.25 + 20, f"memory kept growing: {samples}"
