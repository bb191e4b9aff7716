"""The framework-free ceiling: aiokafka ``getmany`` + orjson + dicts doing the same job.

The job: drop redelivered event ids, count total and unique clickers per campaign, overall and
in 1-minute event-time windows. No validation, no durable state, no changelog: what a Python
consumer can do at best on this machine, so the real topology can be compared with it.
Run as ``python -m pipeline.bench.ceiling --broker B --topic T --expect N --status FILE``, connecting
as its environment's ``PIPELINE_KAFKA_*`` variables say (TLS, SASL), as a worker would.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from pipeline.bench.common import partitions_of, peak_rss_mib, write_json
from pipeline.bench.data import WINDOW


async def consume(
    broker: str, topic: str, expect: int, security: Mapping[str, str] | None = None
) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from pipeline.bench.common import kafka_options

    consumer = AIOKafkaConsumer(
        **kafka_options(security),
        bootstrap_servers=broker,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=16 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
        fetch_max_wait_ms=100,
    )
    await consumer.start()
    try:
        found = await partitions_of(broker, [topic], security=security)
        tps = [TopicPartition(topic, p) for p in found[topic]]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen: set[str] = set()
        totals: dict[str, int] = {}
        uniques: dict[str, set[str]] = {}
        wtotals: dict[tuple[str, int], int] = {}
        wuniques: dict[tuple[str, int], set[str]] = {}
        events = 0
        first = None
        loads = orjson.loads
        while events < expect:
            batch = await consumer.getmany(timeout_ms=200)
            if first is None and batch:
                first = time.perf_counter()
            for records in batch.values():
                for record in records:
                    doc = loads(record.value)
                    for event in doc if isinstance(doc, list) else (doc,):
                        events += 1
                        eid = event["event_id"]
                        if eid in seen:
                            continue
                        seen.add(eid)
                        if event["type"] != "click":
                            continue
                        campaign = event["channel"] + "|" + event["campaign_id"]
                        sub = event["subscriber_id"]
                        wkey = (campaign, int(event["timestamp"] // WINDOW) * WINDOW)
                        totals[campaign] = totals.get(campaign, 0) + 1
                        wtotals[wkey] = wtotals.get(wkey, 0) + 1
                        u = uniques.get(campaign)
                        if u is None:
                            u = uniques[campaign] = set()
                        u.add(sub)
                        u = wuniques.get(wkey)
                        if u is None:
                            u = wuniques[wkey] = set()
                        u.add(sub)
        elapsed = time.perf_counter() - (first or time.perf_counter())
    finally:
        await consumer.stop()
    counts: dict[str, Any] = {
        c: {"click": n, "unique_click": len(uniques[c]), "windows": {}} for c, n in totals.items()
    }
    for (c, start), n in sorted(wtotals.items()):
        counts[c]["windows"][f"{WINDOW}:{start}"] = [n, len(wuniques[(c, start)])]
    return {"events": events, "seconds": elapsed, "counts": counts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--status", required=True)
    args = parser.parse_args(argv)
    result = asyncio.run(consume(args.broker, args.topic, args.expect, os.environ))
    result["peak_rss_mib"] = peak_rss_mib()
    write_json(Path(args.status), result)
    return 0


def measure(
    broker: str,
    topic: str,
    workload,
    workdir: Path,
    label: str = "ceiling",
    *,
    security: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run the ceiling in its own process over ``topic`` (already holding the workload);
    ``security``: the ``PIPELINE_KAFKA_*`` variables it connects with."""
    import subprocess
    import sys

    from pipeline.bench.common import client_env, read_json
    from pipeline.bench.data import clicker_counts

    status = workdir / f"{label}.status.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.bench.ceiling",
            "--broker",
            broker,
            "--topic",
            topic,
            "--expect",
            str(workload.total),
            "--status",
            str(status),
        ],
        check=True,
        timeout=300,
        env=client_env(security),
    )
    doc = read_json(status)
    want = clicker_counts(workload.expected)
    return {
        "events": doc["events"],
        "seconds": doc["seconds"],
        "events_per_s": doc["events"] / doc["seconds"] if doc["seconds"] else 0.0,
        "peak_rss_mib": doc["peak_rss_mib"],
        "exact": doc["counts"] == want,
    }


if __name__ == "__main__":
    raise SystemExit(main())
