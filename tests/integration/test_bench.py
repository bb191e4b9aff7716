"""``pipeline bench --small --json --brokers tansu,kafka`` completes and every count it checks is
exact on both brokers (no timing: performance is only compared side by side, in the report),
the real topology's included when fed direct single-event records, on their right partitions
and every one on a wrong partition."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_small_bench_is_exact_on_tansu_and_kafka(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "bench",
            "--small",
            "--json",
            "--workdir",
            str(tmp_path / "bench"),
            "--brokers",
            "tansu,kafka",
            "--results",
            str(tmp_path / "results"),
            "--sustained-brokers",
            "tansu",  # the sustained mechanism on Apache Kafka: its own test
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=590,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-4000:]
    result = json.loads(proc.stdout)
    assert result["errors"] == {}
    assert list(result["by_broker"]) == ["tansu", "kafka"]
    for kind, section in result["by_broker"].items():
        for name in ("ceiling", "baseline", "topology"):
            assert section[name]["exact"], (kind, name, section[name])
            assert section[name]["events"] > 0
        assert section["topology"]["events"] == result["config"]["events"]
        assert section["topology"]["problems"] == []
        # the same events one per record: keyed right, and all misplaced (moved before deciding)
        for name, misplaced in (("direct_keyed", 0), ("direct_misplaced", result["config"]["events"])):
            row = section[name]
            assert row["events"] == result["config"]["events"], (kind, name)
            assert row["misplaced_records"] == misplaced, (kind, name, row["misplaced_records"])
            assert row["exact"] and row["problems"] == [], (kind, name, row["problems"])
            assert row["cpu_s_per_million"] > 0, (kind, name)
        assert [row["batch"] for row in section["ingest"]] == [1000, 100, 1]
        assert all(row["failures"] == 0 for row in section["ingest"])
        assert section["latency"]["lost"] == 0
        scale = section["scale"]
        assert scale["exact"], (kind, scale)
        assert all(worker["events"] > 0 for worker in scale["per_worker"]), scale
        assert sum(worker["events"] for worker in scale["per_worker"]) == scale["events"]
    assert result["topology"] == result["by_broker"]["tansu"]["topology"]  # the first one heads it
    assert result["memory"]["read_found"] == result["memory"]["read_sample"]
    # the results file: the same run's table with every goal judged, and the machine it ran on
    written = (tmp_path / "results" / "results.md").read_text()
    goal_lines = written.split("goals (ratios from this run):")[1].split("\n\n")[0].strip().splitlines()
    # sustained, ingest, half-capacity latency, topology; direct keyed and misplaced per broker
    assert len(goal_lines) == 8, goal_lines
    assert all(line.split()[0] in ("MET", "MISSED") for line in goal_lines), goal_lines
    direct_goals = [line for line in goal_lines if "direct single-event records" in line]
    assert len(direct_goals) == 4 and not any("NOT exact" in line for line in direct_goals), direct_goals
    assert "machine:" in written and "CPUs" in written
    assert json.loads((tmp_path / "results" / "results.json").read_text())["config"] == result["config"]
    sustained = result["sustained"]["tansu"]
    assert sustained["exact"], sustained["problems"]
    assert sustained["steps"]


@pytest.mark.timeout(600)
def test_small_bench_over_sasl_ssl_beside_plain_kafka(tmp_path: Path) -> None:
    """``--brokers kafka,kafka-sasl``: the topology-only row and the HTTP ingest rows run on a node
    serving only SASL_SSL too (every client and worker as user worker, SCRAM-SHA-512), with
    exact counts, and each row both brokers measured is given as SASL_SSL / plain TCP."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "bench",
            "--small",
            "--json",
            "--workdir",
            str(tmp_path / "bench"),
            "--brokers",
            "kafka,kafka-sasl",
            "--skip",
            "ceiling,baseline,direct,memory,scale,sustained",
            "--results",
            str(tmp_path / "results"),
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=590,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-4000:]
    result = json.loads(proc.stdout)
    assert result["errors"] == {}
    assert list(result["by_broker"]) == ["kafka", "kafka-sasl"]
    assert result["by_broker"]["kafka"]["connection"] == "PLAINTEXT"
    assert result["by_broker"]["kafka-sasl"]["connection"].startswith("SASL_SSL, SCRAM-SHA-512 as 'worker'")
    for kind, section in result["by_broker"].items():
        topology = section["topology"]
        assert topology["events"] == result["config"]["events"], kind
        assert topology["exact"] and topology["problems"] == [], (kind, topology["problems"])
        assert [row["batch"] for row in section["ingest"]] == [1000, 100, 1], kind
        assert all(row["failures"] == 0 for row in section["ingest"]), (kind, section["ingest"])
        assert section["latency"]["lost"] == 0, kind
    ratios = {row["row"]: row for row in result["over_sasl_ssl"]}
    for name in (
        "real topology, 1 worker (events/s)",
        "HTTP ingest, batches of 1,000 (events/s)",
        "HTTP ingest, batches of 100 (events/s)",
        "HTTP ingest, single events (events/s)",
    ):
        row = ratios[name]
        assert (row["plain_broker"], row["sasl_broker"]) == ("kafka", "kafka-sasl"), row
        assert row["ratio"] == pytest.approx(row["sasl_ssl"] / row["plain"]) and row["ratio"] > 0, row
    written = (tmp_path / "results" / "results.md").read_text()
    section = written.split("over SASL_SSL / plain TCP: kafka-sasl / kafka")[1].split("\n\n")[0]
    assert "real topology, 1 worker (events/s)" in section and "HTTP ingest, batches of 1,000" in section
    assert "every count exact" in section and " NO" not in section, section
