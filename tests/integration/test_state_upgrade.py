"""Stored state across versions and configurations, through the real broker.

* State written by the last release before versioned formats (records under
  ``channel|campaign|subscriber`` keys, unversioned records, partials, snapshots and
  campaigns) is read by this version with the same numbers, and keeps deduplicating:
  every event sent again is a duplicate, every subscriber already counted stays counted once.
* ``PIPELINE_WINDOWS`` changed across a SIGKILL (a size added, one removed): ``all`` stays
  exact, the window kept throughout is exact, the removed one is gone and the added one
  shows nothing wrong.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import tarfile
from pathlib import Path

import httpx
from conftest import ROOT, WorkerProcess
from helpers import assert_exact, nonzero, wait_for_counts

from pipeline.bench.common import produce_batched
from pipeline.simulation.traffic import Traffic, generate, send

# main before the record keys and formats were versioned (the format users run today)
UNVERSIONED_FORMATS_COMMIT = "bd7d98b9409547d249bf96ebc88b277a0a5aea01"


def checkout(commit: str, dest: Path) -> Path:
    """The package and schemas of ``commit``, from this repository's history."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", commit, "pipeline", "schemas"],
        capture_output=True,
        check=False,
    )
    assert archive.returncode == 0, (
        f"this test runs the worker of {commit} and needs the repository's history "
        f"(a full clone): {archive.stderr.decode(errors='replace')}"
    )
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def test_state_of_the_unversioned_format_is_upgraded(broker, tmp_path, workers):
    traffic = generate(seed=31, subscribers=900)
    old = WorkerProcess(
        broker.address,
        tmp_path,
        code_dir=checkout(UNVERSIONED_FORMATS_COMMIT, tmp_path / "old"),
        env={"PIPELINE_IDEMPOTENT_PRODUCER": "false"},  # that version needed telling (Tansu)
    )
    workers.append(old.start())
    assert asyncio.run(send(old.url, traffic.events, batch=250)) == len(traffic.events)
    before = wait_for_counts([old.url], traffic)
    assert_exact(before, traffic)
    old.kill()

    # this version on the same broker and the same local state
    new = WorkerProcess(broker.address, tmp_path, port=old.port)
    workers.append(new.start())
    after = wait_for_counts([new.url], traffic)
    assert_exact(after, traffic)
    for name, doc in before.items():
        for field in ("counts", "windows", "window_history", "duplicates_dropped", "late_events"):
            assert after[name][field] == doc[field], (name, field)

    # every event again is a redelivery; a new open of every e-mail subscriber already counted
    # adds to the totals and its new windows, never to the lifetime uniques
    truth = traffic.truth
    for event in traffic.events:
        truth.duplicates[(event["channel"], event["campaign_id"])] += 1
    end = max(event["timestamp"] for event in traffic.events)
    opens = []
    for subscriber in sorted({e["subscriber_id"] for e in traffic.events if e["channel"] == "email"}):
        first = next(e for e in traffic.events if e.get("subscriber_id") == subscriber)
        event = {
            "event_id": f"again-{subscriber}",
            "type": "open",
            "channel": "email",
            "campaign_id": first["campaign_id"],
            "subscriber_id": subscriber,
            "timestamp": end + 10,
            "source": "simulate",
        }
        truth.count(event, late=False)
        opens.append(event)
    unique_before = {name: doc["counts"]["unique_open"] for name, doc in before.items()}
    assert asyncio.run(send(new.url, traffic.events + opens, batch=250)) == len(traffic.events) + len(opens)
    again = Traffic(traffic.events + opens, truth, traffic.campaigns)
    docs = wait_for_counts([new.url], again)
    assert_exact(docs, again)
    for name, doc in docs.items():
        if doc["channel"] == "email":
            assert doc["counts"]["unique_open"] >= unique_before[name]
            assert doc["counts"]["open"] > before[name]["counts"]["open"]


def test_windows_changed_across_a_sigkill(broker, tmp_path, workers):
    traffic = generate(seed=33, subscribers=1200, windows=(60, 300, 3600))
    # enough windows retained that none is closed by retention while topics are caught up
    # the first half's subscriber records are stored, its partials not: the worker dies there
    env = {
        "PIPELINE_WINDOWS": "5m,1h",
        "PIPELINE_WINDOW_RETENTION": "400",  # none closed by retention while topics catch up
        "PIPELINE_FAILPOINT": "dedupe.after_records",
    }
    worker = WorkerProcess(broker.address, tmp_path, env=env)
    workers.append(worker.start())
    half = len(traffic.events) // 2
    asyncio.run(produce_batched(broker.address, traffic.events[:half]))
    assert worker.process is not None and worker.process.wait(60) == 137, worker.log()

    # restarted with a 1m window added and the 1h window removed: the first half is replayed
    # from the stored records under the new sizes
    worker.env["PIPELINE_WINDOWS"] = "1m,5m"
    del worker.env["PIPELINE_FAILPOINT"]
    worker.start()
    rest = traffic.events[half:]
    assert asyncio.run(send(worker.url, rest, batch=250)) == len(rest)
    docs = wait_for_counts([worker.url], traffic, timeout=180)

    # all, and 5m (configured throughout): exact
    assert_exact(
        {name: {**doc, "window_history": {"5m": doc["window_history"]["5m"]}} for name, doc in docs.items()},
        traffic,
    )
    # 1h: gone; 1m: counts what came after the restart (and what was replayed), never more
    # than the truth, and exactly the truth in windows that start after the first half's events
    restart = max(event["timestamp"] for event in traffic.events[:half])
    exact = 0
    for name, doc in docs.items():
        assert set(doc["window_history"]) == {"1m", "5m"} and "1h" not in doc["rates"]
        want = traffic.truth.expected(doc["channel"], doc["campaign_id"])["windows"]
        for window in doc["window_history"]["1m"]:
            got = nonzero(window["counts"])
            truth = want.get(f"60:{window['start']}", {})
            if window["start"] > restart:
                assert got == truth, (name, window["start"], got, truth)
                exact += 1
            else:
                assert all(value <= truth.get(count, 0) for count, value in got.items()), (name, window)
    assert exact >= 30
    metrics = httpx.get(f"{worker.url}/metrics", timeout=10).text
    assert 'window="1h"' not in metrics and 'window="1m"' in metrics
