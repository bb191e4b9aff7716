"""The results table: one row per mechanism, ratios, and the targets of issue 3."""

from __future__ import annotations

from typing import Any

TARGETS = {
    "topology_events_per_s": 100_000,
    "ingest_1000_events_per_s": 50_000,
    "latency_p99_ms": 2000,
    "memory_10m_rss_mib": 512,
}


def _n(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    topo = result.get("topology")
    if topo:
        rows.append(
            _target(
                "real topology, one worker (events/s)",
                topo["events_per_s"],
                TARGETS["topology_events_per_s"],
                ">=",
            )
        )
    ingest = {row["batch"]: row for row in result.get("ingest", [])}
    if 1000 in ingest:
        rows.append(
            _target(
                "HTTP ingest, batches of 1,000 (events/s)",
                ingest[1000]["events_per_s"],
                TARGETS["ingest_1000_events_per_s"],
                ">=",
            )
        )
    lat = result.get("latency")
    if lat:
        rows.append(
            _target(
                "webhook to /metrics p99 at half load (ms)", lat["p99_ms"], TARGETS["latency_p99_ms"], "<="
            )
        )
    mem = result.get("memory")
    if mem:
        measured = mem["subscribers"] >= 10_000_000
        value = mem["peak_rss_mib"] if measured else mem["extrapolated_10m_rss_mib"]
        label = "dedupe state, 10 M subscribers (peak RSS MiB)"
        if not measured:
            label += f" EXTRAPOLATED from {mem['subscribers']:,}"
        rows.append(_target(label, value, TARGETS["memory_10m_rss_mib"], "<="))
    return rows


def _target(name: str, value: float, target: float, op: str) -> dict[str, Any]:
    met = value >= target if op == ">=" else value <= target
    return {
        "target": name,
        "value": value,
        "goal": f"{op} {target:,}",
        "met": met,
        "ratio": value / target if target else None,
    }


def render(result: dict[str, Any]) -> str:
    lines = []
    cfg = result["config"]
    lines.append(
        f"pipeline bench: {cfg['events']:,} events ({cfg['redeliveries']:.0%} redeliveries), "
        f"{cfg['campaigns']} campaigns "
        f"(Zipf), {cfg['population']:,} subscribers, {cfg['partitions']} partitions, "
        "embedded broker (Tansu), "
        f"{cfg['cpus']} CPUs, Python {cfg['python']}"
    )
    lines.append("")
    lines.append(
        f"{'mechanism':<44} {'events':>9} {'seconds':>8} {'events/s':>10} {'peak RSS MiB':>13} {'exact':>6}"
    )
    for key, label in (
        ("ceiling", "framework-free ceiling (aiokafka+orjson)"),
        ("baseline", "natural Faust (per event, 1 event/message)"),
        ("topology", "real topology, 1 worker (exact, 1m windows)"),
    ):
        row = result.get(key)
        if row:
            lines.append(
                f"{label:<44} {row['events']:>9,} {row['seconds']:>8.2f} {row['events_per_s']:>10,.0f} "
                f"{row['peak_rss_mib']:>13,.0f} {('yes' if row['exact'] else 'NO'):>6}"
            )
            if len(row.get("runs_events_per_s", [])) > 1:
                rates = ", ".join(f"{rate:,.0f}" for rate in row["runs_events_per_s"])
                lines.append(f"{'':<44} median of {len(row['runs_events_per_s'])} runs: {rates} events/s")
            if row.get("cpu_seconds"):
                lines.append(f"{'':<44} worker CPU (user+system): {row['cpu_seconds']:.2f} s")
    topo, base, ceil = result.get("topology"), result.get("baseline"), result.get("ceiling")
    if topo and base:
        lines.append(
            f"ratio real topology / natural Faust: {topo['events_per_s'] / base['events_per_s']:,.1f}x"
        )
    if topo and ceil:
        lines.append(
            f"ratio real topology / ceiling:       {topo['events_per_s'] / ceil['events_per_s']:.1%}"
        )
    if result.get("ingest"):
        lines.append("")
        lines.append(
            f"{'HTTP POST /events':<44} {'requests':>9} {'events/s':>10} "
            f"{'p50 ms':>8} {'p99 ms':>8} {'failed':>7}"
        )
        for row in result["ingest"]:
            label = f"batches of {row['batch']:,}" if row["batch"] > 1 else "single events"
            lines.append(
                f"{label:<44} {row['requests']:>9,} {row['events_per_s']:>10,.0f} {row['p50_ms']:>8.1f} "
                f"{row['p99_ms']:>8.1f} {row['failures']:>7}"
            )
        if result.get("ingest_worker_peak_rss_mib"):
            lines.append(
                f"(ingest worker peak RSS {result['ingest_worker_peak_rss_mib']:,.0f} MiB, "
                "its stream stages running)"
            )
    lat = result.get("latency")
    if lat:
        lines.append("")
        lines.append(
            f"webhook -> /metrics at {lat['achieved_rate']:,.0f} events/s background "
            f"(target {lat['target_rate']:,.0f}): "
            f"p50 {lat['p50_ms']:,.0f} ms, p99 {lat['p99_ms']:,.0f} ms, max {lat['max_ms']:,.0f} ms, "
            f"{lat['probes'] - lat['lost']}/{lat['probes']} probes seen (/metrics polled every "
            f"{lat.get('poll_ms', 0):.0f} ms)"
        )
    mem = result.get("memory")
    if mem:
        lines.append("")
        extra = (
            f"; EXTRAPOLATED to 10 M: ~{mem['extrapolated_10m_rss_mib']:,.0f} MiB "
            f"(+{mem['rss_per_million_mib']:,.1f} MiB per million)"
            if mem.get("extrapolated_10m_rss_mib") is not None
            else ""
        )
        lines.append(
            f"dedupe state (RocksDB, pipeline options): {mem['subscribers']:,} subscribers written at "
            f"{mem['records_per_s']:,.0f}/s, peak RSS {mem['peak_rss_mib']:,.0f} MiB, "
            f"{mem['disk_mib']:,.0f} MiB on disk, "
            f"{mem['read_found']:,}/{mem['read_sample']:,} read back{extra}"
        )
    scale = result.get("scale")
    if scale:
        lines.append("")
        per = ", ".join(
            f"worker {n}: partitions {w['raw_partitions']} -> {w['events']:,} events"
            for n, w in enumerate(scale["per_worker"])
        )
        lines.append(
            f"scale-out, 2 workers, 1 hot campaign, {scale['events']:,} events: {per}; "
            f"{scale['events_per_s']:,.0f} events/s together, exact: {'yes' if scale['exact'] else 'NO'}"
        )
    if result.get("sustained"):
        from pipeline.bench.sustained import render as render_sustained

        lines.append("")
        lines += render_sustained(result["sustained"])
    rows = targets(result)
    if rows:
        lines.append("")
        lines.append("targets (issue 3):")
        for row in rows:
            lines.append(
                f"  {'MET ' if row['met'] else 'MISSED'} {row['target']}: {_n(row['value'])} "
                f"(goal {row['goal']}, "
                f"{row['ratio']:.0%} of it)"
            )
    if result.get("errors"):
        lines.append("")
        for name, err in result["errors"].items():
            lines.append(f"ERROR in {name}: {err}")
    return "\n".join(lines)
