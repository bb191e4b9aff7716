"""The natural Faust baseline: ``async for`` per event, Table writes per event, one event a message.

What a first Faust version of the job looks like: for every event, look its id up in a table,
mark it seen, bump the campaign's click count and, for a new clicker, its unique count, overall
and in the event's 1-minute window. Every table write is one RocksDB put and one changelog
message. Tables are written on the partition of the event (keyed by subscriber), so per-campaign
counts are per-partition sums, added up at the end. Run in its own process:
``python -m pipeline.bench.baseline --broker B --topic T --expect N --status FILE --data-dir D``,
connecting as its environment's ``PIPELINE_KAFKA_*`` variables say (TLS, SASL), as a worker would.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.bench.common import peak_rss_mib, write_json
from pipeline.bench.data import WINDOW


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--status", required=True)
    parser.add_argument("--data-dir", required=True)
    args = parser.parse_args(argv)

    import faust

    from pipeline.bench.common import security_settings
    from pipeline.kafka.security import client_options, faust_credentials
    from pipeline.worker import quiet_faust_worker

    connect = security_settings(os.environ)
    app = faust.App(
        f"bench-baseline-{os.getpid()}",
        broker=f"kafka://{args.broker}",
        store="rocksdb://",
        datadir=args.data_dir,
        autodiscover=False,
        web_enabled=False,
        topic_partitions=4,
        consumer_auto_offset_reset="earliest",
        table_standby_replicas=0,
        logging_config=None,
        broker_credentials=faust_credentials(connect),  # None: plain TCP
    )
    topic = app.topic(args.topic, key_serializer="raw", value_serializer="json")
    seen = app.Table("seen", default=bool, partitions=4)
    clicks = app.Table("clicks", default=int, partitions=4)  # campaign (and window) -> clicks
    clickers = app.Table("clickers", default=bool, partitions=4)  # campaign|subscriber -> seen
    uniques = app.Table("uniques", default=int, partitions=4)  # campaign (and window) -> unique
    state: dict[str, Any] = {"first": None, "done": None, "events": 0, "pid": os.getpid()}
    status = Path(args.status)

    @app.agent(topic)
    async def count(stream: Any) -> None:
        async for event in stream:
            if state["first"] is None:
                state["first"] = time.time()
            state["events"] += 1
            if not seen[event["event_id"]]:
                seen[event["event_id"]] = True
                campaign = f"{event['channel']}|{event['campaign_id']}"
                window = f"{campaign}@{WINDOW}:{int(event['timestamp'] // WINDOW) * WINDOW}"
                clicks[campaign] += 1
                clicks[window] += 1
                for scope in (campaign, window):
                    member = f"{scope}|{event['subscriber_id']}"
                    if not clickers[member]:
                        clickers[member] = True
                        uniques[scope] += 1
            if state["events"] >= args.expect and state["done"] is None:
                state["done"] = time.time()
                finish()

    def finish() -> None:
        counts: dict[str, Any] = {}
        for key, value in clicks.items():
            campaign, _, window = key.partition("@")
            doc = counts.setdefault(campaign, {"click": 0, "unique_click": 0, "windows": {}})
            if window:
                doc["windows"].setdefault(window, [0, 0])[0] += value
            else:
                doc["click"] += value
        for key, value in uniques.items():
            campaign, _, window = key.partition("@")
            doc = counts[campaign]
            if window:
                doc["windows"].setdefault(window, [0, 0])[1] += value
            else:
                doc["unique_click"] += value
        for doc in counts.values():
            doc["windows"] = dict(sorted(doc["windows"].items()))
        state["counts"] = counts
        state["peak_rss_mib"] = peak_rss_mib()
        write_json(status, state)

    @app.timer(interval=0.5)
    async def report() -> None:
        if state["done"] is None:
            state["peak_rss_mib"] = peak_rss_mib()
            write_json(status, state)

    # its topics exist and every broker lists them before the consumer subscribes: left to
    # Faust, a changelog created a moment earlier on a fresh Apache Kafka could show 0
    # partitions to its check (PartitionsMismatch) and the baseline stalled
    from pipeline.kafka.declare import declare_pipeline_topics

    changelogs = [table.changelog_topic for table in (seen, clicks, clickers, uniques)]
    declare_pipeline_topics(
        args.broker, [topic, *changelogs], partitions=4, replication=1, options=client_options(connect)
    )

    worker = faust.Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False)
    quiet_faust_worker(worker)  # as `pipeline worker` runs it
    worker.execute_from_commandline()
    return 0


def measure(
    broker: str,
    topic: str,
    sample,
    workdir: Path,
    timeout: float = 240.0,
    *,
    security: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run the baseline over ``topic`` (already holding ``sample`` as one-event messages);
    ``security``: the ``PIPELINE_KAFKA_*`` variables it connects with."""
    import subprocess
    import sys

    from pipeline.bench.common import client_env, wait_until_done
    from pipeline.bench.data import clicker_counts
    from pipeline.bench.topology import stop_worker

    status = workdir / "baseline.status.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.bench.baseline",
            "--broker",
            broker,
            "--topic",
            topic,
            "--expect",
            str(sample.total),
            "--status",
            str(status),
            "--data-dir",
            str(workdir / "baseline-state"),
        ],
        env=client_env(security),
        stdout=open(workdir / "baseline.log", "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        doc = wait_until_done(
            proc,
            status,
            "baseline",
            workdir / "baseline.log",
            timeout,
            lambda d: f"{d['events']}/{sample.total} events",
        )
    finally:
        stop_worker(proc)
    seconds = doc["done"] - doc["first"]
    return {
        "events": sample.total,
        "seconds": seconds,
        "events_per_s": sample.total / seconds if seconds else 0.0,
        "peak_rss_mib": doc["peak_rss_mib"],
        "exact": doc["counts"] == clicker_counts(sample.expected),
    }


if __name__ == "__main__":
    raise SystemExit(main())
