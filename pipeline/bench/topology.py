"""The real topology: :func:`pipeline.stages.topology.create_pipeline` in a worker process of its own.

Run as ``python -m pipeline.bench.topology --status FILE --expect N`` with the usual
``PIPELINE_*`` environment. The stages are the pipeline's own; this runner only watches them:
the time the first batch reaches the dedupe stage, events applied by this worker's dedupe
stage, and the snapshots applied by its aggregate stage. When the campaign snapshots it holds
account for ``--expect`` events (the sum of their ``seq`` over partitions), it records the time,
its counts and its peak RSS in the status file, which the driver reads.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.bench.common import peak_rss_mib, rss_mib, write_json
from pipeline.state.codec import snapshot_seqs


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    times = os.times()
    return times.user + times.system


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--status", required=True)
    parser.add_argument("--expect", type=int, default=0, help="events whose snapshots mean done")
    parser.add_argument("--profile", default=None, help="write a pyinstrument profile here")
    args = parser.parse_args(argv)

    import faust

    from pipeline.kafka.declare import declare_pipeline_topics
    from pipeline.kafka.security import client_options
    from pipeline.settings import Settings
    from pipeline.stages.topology import create_pipeline
    from pipeline.worker import quiet_faust_worker

    settings = Settings.from_env()
    pipeline = create_pipeline(settings)
    if os.environ.get("BENCH_GC"):
        import gc

        gc.set_threshold(*(int(x) for x in os.environ["BENCH_GC"].split(",")))
    status_path = Path(args.status)
    state: dict[str, Any] = {
        "pid": os.getpid(),
        "first": None,
        "done": None,
        "dedupe_events": 0,
        "dedupe_batches": 0,
        "aggregate_snapshots": 0,
        "applied_seq": 0,
        "assigned": [],
    }
    seqs: dict[tuple[bytes, int], int] = {}
    dedupe_process = pipeline.dedupe.process_batch
    aggregate_process = pipeline.aggregate.process
    profiler = None

    async def dedupe_wrapped(events: list) -> int:
        nonlocal profiler
        if state["first"] is None:
            state["first"] = time.time()
            state["cpu_first"] = cpu_seconds()
            state["faults_first"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            if args.profile:
                from pyinstrument import Profiler

                profiler = Profiler(async_mode="disabled")
                profiler.start()
        applied = await dedupe_process(events)
        state["dedupe_events"] += applied
        state["dedupe_batches"] += 1
        return applied

    async def aggregate_wrapped(events: list) -> None:
        await aggregate_process(events)
        for event in events:
            # the watcher must not slow down what it watches: read only the campaigns,
            # partitions and seqs of the snapshots, not the whole documents
            for ckey, partition, q in snapshot_seqs(event.message.key, event.value):
                key = (ckey, partition)
                old = seqs.get(key, 0)
                if q > old:
                    seqs[key] = q
                    state["applied_seq"] += q - old
                state["aggregate_snapshots"] += 1
        if args.expect and state["done"] is None and state["applied_seq"] >= args.expect:
            state["done"] = time.time()
            state["cpu_done"] = cpu_seconds()
            state["faults_done"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            if profiler is not None:
                profiler.stop()
                Path(args.profile).write_text(
                    profiler.output_text(unicode=False, color=False, show_all=False)
                )
            finish()

    def finish() -> None:
        views = pipeline.aggregate.views()
        state["campaigns"] = {
            f"{v.channel}|{v.campaign}": {
                "counts": {k: n for k, n in v.totals.items() if n},
                "duplicates": v.duplicates,
                "late": v.late,
                "windows": {
                    f"{size}:{start}": {k: n for k, n in counts.items() if n}
                    for size, starts in v.windows.items()
                    for start, counts in starts.items()
                },
            }
            for v in views
        }
        write_status()

    def write_status() -> None:
        state["peak_rss_mib"] = peak_rss_mib()
        state["rss_mib"] = rss_mib()
        try:
            state["assigned"] = sorted([tp.topic, tp.partition] for tp in pipeline.app.consumer.assignment())
        except Exception:
            pass
        write_json(status_path, state)

    pipeline.dedupe.process_batch = dedupe_wrapped  # type: ignore[method-assign]
    pipeline.aggregate.process = aggregate_wrapped  # type: ignore[method-assign]

    @pipeline.app.timer(interval=0.5)
    async def report() -> None:
        write_status()

    worker = faust.Worker(pipeline.app, loglevel="warning", quiet=True, redirect_stdouts=False)
    declare_pipeline_topics(
        settings.broker or "",
        pipeline.topics,
        settings.partitions,
        settings.replication,
        client_options(settings),  # TLS and SASL as the stages connect (PIPELINE_KAFKA_*)
    )
    quiet_faust_worker(worker)  # as `pipeline worker` runs it
    worker.execute_from_commandline()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# --- driver side -------------------------------------------------------------------------


def worker_env(
    broker: str,
    data_dir: Path,
    app_id: str,
    port: int,
    extra: dict[str, str] | None = None,
    security: Mapping[str, str] | None = None,
) -> dict:
    from pipeline.bench.common import client_env

    return {
        **client_env(security),  # the PIPELINE_KAFKA_* variables of the broker's clients
        "PIPELINE_BROKER": broker,
        "PIPELINE_APP_ID": app_id,
        "PIPELINE_DATA_DIR": str(data_dir),
        "PIPELINE_PORT": str(port),
        "PIPELINE_WINDOWS": "1m",
        "PIPELINE_IDEMPOTENT_PRODUCER": "false",
        **(extra or {}),
    }


def start_worker(
    broker: str,
    workdir: Path,
    app_id: str,
    name: str,
    expect: int,
    profile: bool = False,
    extra_env: dict[str, str] | None = None,
    security: Mapping[str, str] | None = None,
):
    import subprocess
    import sys

    from pipeline.kafka.tansu import free_port

    status = workdir / f"{name}.status.json"
    status.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pipeline.bench.topology", "--status", str(status), "--expect", str(expect)]
    if profile:
        cmd += ["--profile", str(workdir / f"{name}.profile.txt")]
    log = open(workdir / f"{name}.log", "ab")
    proc = subprocess.Popen(
        cmd,
        env=worker_env(broker, workdir / f"{name}-state", app_id, free_port(), extra_env, security),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, status


def stop_worker(proc) -> None:
    import signal
    import subprocess

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def compare(expected: dict[str, dict[str, Any]], got: dict[str, dict[str, Any]]) -> list[str]:
    """Differences between the generator's truth and what the pipeline reports (empty = exact)."""
    problems = []
    for key, want in expected.items():
        have = got.get(key)
        if have is None:
            problems.append(f"{key}: missing")
            continue
        if have["counts"] != want["counts"]:
            problems.append(f"{key}: counts {have['counts']} != {want['counts']}")
        if have["duplicates"] != want["duplicates"]:
            problems.append(f"{key}: duplicates {have['duplicates']} != {want['duplicates']}")
        if have.get("late", 0):
            problems.append(f"{key}: {have['late']} late events, expected none")
        if have["windows"] != want["windows"]:
            bad = [
                w
                for w in set(want["windows"]) | set(have["windows"])
                if want["windows"].get(w) != have["windows"].get(w)
            ]
            problems.append(f"{key}: {len(bad)} windows differ, e.g. {sorted(bad)[:1]}")
    for key in set(got) - set(expected):
        problems.append(f"{key}: unexpected campaign")
    return problems


LAYOUTS = ("batched", "keyed", "misplaced")


def measure(
    broker: str,
    workload,
    workdir: Path,
    *,
    layout: str = "batched",
    profile: bool = False,
    timeout: float = 300.0,
    security: Mapping[str, str] | None = None,
) -> dict:
    """Preload the events, then time one worker from first batch to last snapshot.

    ``layout``: ``batched`` as the ingest writes them (one message per request and partition),
    ``keyed`` one event per record on its right partition, ``misplaced`` one event per record,
    each on a wrong partition (:func:`~pipeline.bench.common.produce_direct`). ``security``:
    the ``PIPELINE_KAFKA_*`` variables the producers, the admin client and the worker connect with.
    """
    from pipeline.bench.common import (
        create_topics,
        produce_batched,
        produce_direct,
        progress,
        run_async,
        wait_until_done,
    )
    from pipeline.kafka.topics import RAW_TOPICS

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: one of {', '.join(LAYOUTS)}")
    name = "topology" if layout == "batched" else f"direct-{layout}"
    # Apache Kafka here creates none on first use
    run_async(create_topics(broker, list(RAW_TOPICS), security=security))
    misplaced = None
    if layout == "batched":
        progress(f"{name}: producing {workload.total} events in ingest-style batched messages")
        produce_s = run_async(produce_batched(broker, workload.events, security=security))
    else:
        progress(f"{name}: producing {workload.total} events, one per record, {layout}")
        produce_s, misplaced = run_async(
            produce_direct(broker, workload.events, misplaced=layout == "misplaced", security=security)
        )
    progress(f"{name}: produced in {produce_s:.1f}s; starting one worker")
    proc, status = start_worker(
        broker, workdir, "bench-topology", name, workload.total, profile, security=security
    )
    try:
        doc = wait_until_done(
            proc,
            status,
            name,
            workdir / f"{name}.log",
            timeout,
            lambda d: f"{d['dedupe_events']}/{workload.total} events deduplicated",
        )
    finally:
        stop_worker(proc)
    elapsed = doc["done"] - doc["first"]
    problems = compare(workload.expected, doc["campaigns"])
    # user + system CPU of the worker over the same span: about the elapsed time means
    # the worker is CPU-bound (one core: the GIL), not waiting on the broker
    cpu = doc["cpu_done"] - doc["cpu_first"]
    return {
        "layout": layout,
        "events": workload.total,
        "seconds": elapsed,
        "events_per_s": workload.total / elapsed,
        "peak_rss_mib": doc["peak_rss_mib"],
        "cpu_seconds": cpu,
        "cpu_s_per_million": cpu * 1e6 / workload.total,
        "exact": not problems,
        "problems": problems[:10],
        "dedupe_batches": doc["dedupe_batches"],
        "produce_seconds": produce_s,
        "misplaced_records": misplaced,  # direct records acknowledged off their right partition
        "profile": str(workdir / f"{name}.profile.txt") if profile else None,
    }
