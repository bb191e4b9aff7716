"""The driver of ``pipeline bench``: every mechanism on the same generated events, in one run.

Phases, each in processes of its own (so each peak RSS is its own), for each broker kind asked
for (``--brokers``: the embedded broker ``tansu``, Apache Kafka ``kafka`` or ``kafka-<version>``,
one node on loopback, or ``kafka-sasl`` / ``kafka-sasl-<version>``, the same node serving only
SASL_SSL, every client and worker connecting with SCRAM-SHA-512 as user ``worker``), one after
the other on the same events:

1. broker A: the workload is produced once as the ingest produces it (batched per
   partition) and its first ``--baseline-events`` once more as one-event messages;
   the framework-free ceiling, the natural Faust baseline and the real topology consume it;
   the real topology once more from single-event records, keyed right and all misplaced
   (fresh brokers, the same events);
2. broker B: a real ``pipeline worker``: HTTP ingest in batches of 1,000, 100 and 1,
   then webhook-to-``/metrics`` latency at half the sustainable load;
3. dedupe state of ``--subscribers`` subscribers in RocksDB;
4. embedded broker C: two real-topology workers on one hot campaign;
5. sustained capacity end to end (:mod:`.sustained`): ``pipeline worker`` fed over HTTP at
   rising rates, on a fresh broker of each kind (the embedded Tansu, Apache Kafka).

With ``kafka-sasl`` and its plain-TCP kind (``kafka``) both asked for, every row both measured
is also given as a ratio over SASL_SSL / plain TCP (``result["over_sasl_ssl"]``).
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pipeline.bench import baseline, ceiling, ingest, latency, memory, scale, topology
from pipeline.bench.common import (
    create_topics,
    kafka_version,
    median_of,
    open_broker,
    produce_single,
    progress,
    run_async,
    security_settings,
)
from pipeline.bench.data import generate
from pipeline.bench.table import machine as report_machine
from pipeline.bench.table import over_sasl_ssl
from pipeline.kafka.security import describe
from pipeline.kafka.topics import RAW_TOPICS, raw_topic

SINGLE_TOPIC = "bench.single"
DIRECT_LAYOUTS = ("keyed", "misplaced")  # direct single-event records: right and wrong partitions


def defaults(small: bool) -> dict[str, Any]:
    if small:
        return {
            "events": 6_000,
            "baseline_events": 600,
            "campaigns": 20,
            "population": 2_000,
            "subscribers": 50_000,
            "ingest_plan": [(1000, 4), (100, 10), (1, 50)],
            "probes": 3,
            "scale_events": 4_000,
            "topology_runs": 1,
        }
    return {
        "events": 200_000,
        "baseline_events": 5_000,
        "campaigns": 100,
        "population": 20_000,
        "subscribers": 10_000_000,
        "ingest_plan": [(1000, 300), (100, 300), (1, 1500)],
        "probes": 20,
        "scale_events": 100_000,
        "topology_runs": 3,
    }


def run(options: dict[str, Any]) -> dict[str, Any]:
    cfg = defaults(options.get("small", False))
    cfg.update({k: v for k, v in options.items() if v is not None and k in cfg})
    skip = set(options.get("skip") or ())
    workdir = Path(options.get("workdir") or tempfile.mkdtemp(prefix="pipeline-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "config": {
            **{k: v for k, v in cfg.items() if k != "ingest_plan"},
            "redeliveries": 0.10,
            "partitions": 4,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "machine": report_machine(),
        "errors": {},
    }
    started = time.monotonic()
    kinds = list(options.get("brokers") or ["tansu"])
    for kind in kinds + list(options.get("sustained_brokers") or []):
        kafka_version(kind)  # an unknown kind stops the run before any work
    result["config"]["brokers"] = kinds

    def phase(name: str, fn: Any, kind: str | None = None) -> None:
        if name in skip:
            return
        key = f"{kind}:{name}" if kind and len(kinds) > 1 else name
        try:
            fn()
        except Exception as exc:  # one broken phase must not hide the others
            result["errors"][key] = f"{exc.__class__.__name__}: {exc}"
            progress(f"{key}: FAILED: {exc}")

    progress(
        f"generating {cfg['events']:,} events ({cfg['campaigns']} campaigns, "
        f"{cfg['population']:,} subscribers)"
    )
    workload = generate(cfg["events"], campaigns=cfg["campaigns"], subscribers=cfg["population"])
    sample = generate(cfg["baseline_events"], campaigns=cfg["campaigns"], subscribers=cfg["population"])
    progress(f"workload: {workload.total:,} events, {workload.redelivered:,} redeliveries")

    result["by_broker"] = {}
    for kind in kinds:
        section: dict[str, Any] = {}
        result["by_broker"][kind] = section
        kind_dir = workdir / kind
        kind_dir.mkdir(parents=True, exist_ok=True)
        broker_phases(
            kind, kind_dir, cfg, options, workload, sample, section, functools.partial(phase, kind=kind)
        )
    result.update(result["by_broker"][kinds[0]])  # the first broker's figures head the report
    sasl = over_sasl_ssl(result)
    if sasl:
        result["over_sasl_ssl"] = sasl

    def do_memory() -> None:
        progress(f"memory: dedupe state of {cfg['subscribers']:,} subscribers")
        result["memory"] = memory.measure(cfg["subscribers"], workdir)

    phase("memory", do_memory)

    def do_sustained() -> None:
        from pipeline.bench import sustained

        sustained_kinds = options.get("sustained_brokers") or ["tansu", "kafka"]
        topo = result.get("topology")
        # the first step well below what one worker processes, so that a few steps find the knee
        start = options.get("sustained_start") or (0.25 * topo["events_per_s"] if topo else None)
        small = options.get("small", False)
        result["sustained"] = sustained.measure_on(sustained_kinds, workdir, small=small, start_rate=start)

    phase("sustained", do_sustained)
    result["seconds"] = time.monotonic() - started
    result["load_end"] = os.getloadavg()
    if not options.get("keep"):
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        result["workdir"] = str(workdir)
    return result


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median rate, exact only if every run was, with every run's rate beside it."""
    return {
        **median_of(runs),
        "exact": all(run.get("exact", True) for run in runs),
        "problems": [p for run in runs for p in run.get("problems", [])][:10],
    }


def broker_phases(
    kind: str,
    workdir: Path,
    cfg: dict[str, Any],
    options: dict[str, Any],
    workload: Any,
    sample: Any,
    result: dict[str, Any],
    phase: Callable[[str, Callable[[], None]], None],
) -> None:
    """Every mechanism that needs a broker, on fresh brokers of ``kind``; figures into ``result``."""
    skip = set(options.get("skip") or ())
    progress(f"broker: {kind}")
    with open_broker(kind, workdir, "broker-a") as broker:
        security = broker.security  # PIPELINE_KAFKA_* of every client and worker (none: plain TCP)
        result["connection"] = describe(security_settings(security))  # never the password

        def produce_all() -> None:
            run_async(create_topics(broker.address, [*RAW_TOPICS, SINGLE_TOPIC], security=security))
            run_async(produce_single(broker.address, SINGLE_TOPIC, sample.events, security=security))

        phase("produce", produce_all)

        def do_topology() -> None:
            # this machine is shared and noisy: the topology runs several times, each extra run
            # on a fresh broker (its topics would otherwise hold the earlier run's state), and
            # the median run is reported with every run's rate beside it
            profile = options.get("profile", False)
            runs = [topology.measure(broker.address, workload, workdir, profile=profile, security=security)]
            for n in range(2, cfg["topology_runs"] + 1):
                progress(f"topology: run {n} of {cfg['topology_runs']} on a fresh broker")
                rundir = workdir / f"topology-run{n}"
                rundir.mkdir(exist_ok=True)
                with open_broker(kind, rundir, "broker") as fresh:
                    runs.append(topology.measure(fresh.address, workload, rundir, security=fresh.security))
            result["topology"] = median_run(runs)
            progress(
                f"topology: {result['topology']['events_per_s']:,.0f} events/s (median of "
                f"{len(runs)}), exact={result['topology']['exact']}"
            )

        phase("topology", do_topology)

        def do_direct() -> None:
            # the same events one per record, as Kafka clients write them directly: keyed right,
            # and every one on a wrong partition; each run on a fresh broker (its raw topics must
            # hold only that run's records), the two rows' runs alternating, as often as the
            # topology, the median of each reported
            runs: dict[str, list[dict[str, Any]]] = {layout: [] for layout in DIRECT_LAYOUTS}
            for n in range(1, cfg["topology_runs"] + 1):
                for layout in DIRECT_LAYOUTS:
                    progress(f"direct-{layout}: run {n} of {cfg['topology_runs']} on a fresh broker")
                    rundir = workdir / f"direct-{layout}-run{n}"
                    rundir.mkdir(exist_ok=True)
                    with open_broker(kind, rundir, "broker") as fresh:
                        runs[layout].append(
                            topology.measure(
                                fresh.address, workload, rundir, layout=layout, security=fresh.security
                            )
                        )
            for layout in DIRECT_LAYOUTS:
                row = result[f"direct_{layout}"] = median_run(runs[layout])
                progress(
                    f"direct-{layout}: {row['events_per_s']:,.0f} events/s (median of {len(runs[layout])}), "
                    f"{row['cpu_s_per_million']:.1f} CPU s per million, exact={row['exact']}"
                )

        phase("direct", do_direct)

        def do_ceiling() -> None:
            # under a second of work: one burst of other work on this shared machine moves it
            # a lot, so it runs as often as the topology and the median is reported
            runs = [
                ceiling.measure(
                    broker.address,
                    raw_topic("click"),
                    workload,
                    workdir,
                    label=f"ceiling{n}",
                    security=security,
                )
                for n in range(cfg["topology_runs"])
            ]
            result["ceiling"] = median_run(runs)
            progress(
                f"ceiling: {result['ceiling']['events_per_s']:,.0f} events/s (median of {len(runs)}), "
                f"exact={result['ceiling']['exact']}"
            )

        phase("ceiling", do_ceiling)

        def do_baseline() -> None:
            progress(f"baseline: {sample.total:,} one-event messages through natural-style Faust")
            result["baseline"] = baseline.measure(
                broker.address, SINGLE_TOPIC, sample, workdir, security=security
            )
            progress(f"baseline: {result['baseline']['events_per_s']:,.0f} events/s")

        phase("baseline", do_baseline)

    def do_http() -> None:
        with open_broker(kind, workdir, "broker-b") as broker:
            run_async(http_phases(broker.address, workdir, cfg, result, skip, broker.security))

    if not {"ingest", "latency"} <= skip:
        phase("http", do_http)

    def do_scale() -> None:
        hot = generate(
            cfg["scale_events"], campaigns=1, subscribers=cfg["population"], seed=11, hot_campaign="hot-sale"
        )
        with open_broker(kind, workdir, "broker-c") as broker:
            result["scale"] = scale.measure(broker.address, hot, workdir, security=broker.security)

    phase("scale", do_scale)


async def http_phases(
    broker: str, workdir: Path, cfg: dict, result: dict, skip: set, security: Mapping[str, str] | None = None
) -> None:
    import aiohttp

    worker = ingest.Worker(broker, workdir, security=security)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            progress("http: starting a pipeline worker")
            await worker.wait_healthy(session)
            runs = cfg["topology_runs"]  # each row as often as the topology: seconds each, noisy
            events = generate(
                runs * sum(size * n for size, n in cfg["ingest_plan"]),
                campaigns=cfg["campaigns"],
                subscribers=cfg["population"],
                seed=23,
                redeliveries=0.0,
            ).events
            if "ingest" not in skip:
                try:
                    result["ingest"] = await ingest.measure(session, worker, events, cfg["ingest_plan"], runs)
                except Exception as exc:  # a refused connection says less than the worker's own log
                    failure = worker.failure(wait=10)
                    if failure:
                        raise RuntimeError(f"during the HTTP ingest rows {failure}") from exc
                    raise
                for row in result["ingest"]:
                    progress(
                        f"ingest: batches of {row['batch']}: {row['events_per_s']:,.0f} events/s, "
                        f"p99 {row['p99_ms']:.0f} ms"
                    )
            if "latency" not in skip:
                # one worker process both ingests and processes what it ingested, so its
                # sustainable load is the harmonic combination of the two measured rates
                rates = [r["events_per_s"] for r in result.get("ingest", []) if r["batch"] == 1000]
                if result.get("topology"):
                    rates.append(result["topology"]["events_per_s"])
                sustainable = 1 / sum(1 / r for r in rates) if rates else 10_000.0
                rate = 0.5 * sustainable
                result["sustainable_events_per_s"] = sustainable
                result["latency"] = await latency.measure(session, worker, events, rate, cfg["probes"])
                lat = result["latency"]
                progress(f"latency: p50 {lat['p50_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms")
            failure = worker.failure()
            if failure:  # every request answered, but the figures are of a worker that broke
                raise RuntimeError(f"by the end of the HTTP rows {failure}")
    finally:
        result["ingest_worker_peak_rss_mib"] = worker.peak_rss_mib()
        worker.stop()
