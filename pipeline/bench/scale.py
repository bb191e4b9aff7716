"""Scaling out: two workers of the real topology on one hot campaign both do the work.

Stage 1 is keyed by subscriber, so one campaign's events spread over every partition: with two
workers in one consumer group each owns half the raw partitions and deduplicates its share;
only the small cumulative partials meet on the campaign's aggregate partition. Both workers
are started and joined before the events are produced, then each reports how many events
its dedupe stage applied.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.bench.common import produce_batched, progress, read_json, run_async
from pipeline.bench.topology import compare, start_worker, stop_worker
from pipeline.kafka.topics import raw_topic


def measure(
    broker: str, workload, workdir: Path, timeout: float = 180.0, *, security: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """``security``: the ``PIPELINE_KAFKA_*`` variables the workers and the producer connect with."""
    workers = [
        start_worker(broker, workdir, "bench-scale", f"scale-{n}", workload.total, security=security)
        for n in range(2)
    ]
    topic = raw_topic("click")
    try:
        deadline = time.monotonic() + 90
        while True:  # both joined, each owning some of the raw partitions
            docs = [read_json(status) for _, status in workers]
            owned = [{p for t, p in (doc or {}).get("assigned", []) if t == topic} for doc in docs]
            if all(owned) and not owned[0] & owned[1] and len(owned[0] | owned[1]) == 4:
                break
            for proc, _ in workers:
                if proc.poll() is not None:
                    raise RuntimeError(f"scale worker exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers did not share the partitions in time: {owned}")
            time.sleep(0.3)
        progress(
            f"scale: partitions split {sorted(owned[0])} / {sorted(owned[1])}; "
            f"producing {workload.total} events of one campaign"
        )
        run_async(produce_batched(broker, workload.events, security=security))
        deadline = time.monotonic() + timeout
        while True:
            docs = [read_json(status) or {} for _, status in workers]
            if sum(doc.get("dedupe_events", 0) for doc in docs) >= workload.total and any(
                d.get("done") for d in docs
            ):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("scale run did not finish in time")
            time.sleep(0.2)
    finally:
        for proc, _ in workers:
            stop_worker(proc)
    owner = next(doc for doc in docs if doc.get("done"))
    firsts = [doc["first"] for doc in docs if doc.get("first")]
    seconds = owner["done"] - min(firsts)
    problems = compare(workload.expected, owner["campaigns"])
    return {
        "events": workload.total,
        "seconds": seconds,
        "events_per_s": workload.total / seconds if seconds else 0.0,
        "per_worker": [
            {
                "raw_partitions": sorted(o),
                "events": doc.get("dedupe_events", 0),
                "peak_rss_mib": doc.get("peak_rss_mib"),
            }
            for o, doc in zip(owned, docs, strict=True)
        ],
        "exact": not problems,
        "problems": problems[:5],
    }
