"""Dedupe state of N distinct subscribers in RocksDB, with the pipeline's own store options.

Writes N subscriber records exactly as the dedupe stage stores them (key
``channel|campaign|subscriber``, an orjson record with the event id, its stamp and the
uniqueness flags overall and per window) into one rocksdict database per partition (4, as a
worker owning every partition has) opened through Faust's
``RocksDBOptions`` with :data:`pipeline.stages.topology.ROCKSDB_LARGE`, in write batches of 25,000 like
the stage's chunks, then reads a sample back with multi-gets. Reports peak RSS, the RSS
growth per million subscribers, and the size on disk. Run in its own process:
``python -m pipeline.bench.memory --subscribers N --dir D --status FILE``.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline.bench.common import peak_rss_mib, rss_mib, write_json
from pipeline.rules.dedupe import Rules, apply, stamp_of
from pipeline.state import codec
from pipeline.state.codec import Partial, SubscriberRecord

BATCH = 25_000
PARTITIONS = 4


def record(n: int, now: int) -> tuple[bytes, bytes]:
    """Subscriber ``n``'s record after one click, in the shape the stage's own rules give it."""
    shape = _shape(now)
    subscriber = SubscriberRecord()
    subscriber.ids = {f"sendgrid:ev{n:012d}": [stamp_of(1, n, 0), *shape.ids["first"][1:]]}
    subscriber.unique, subscriber.windows = shape.unique, shape.windows
    subscriber.orders, subscriber.delivered = shape.orders, shape.delivered
    key = codec.record_key("email", f"camp-{n % 100:03d}", f"h:{n:032x}", "")
    return key, codec.encode_record(subscriber, [60])


@functools.cache
def _shape(now: int) -> SubscriberRecord:
    """A record after one e-mail click, made by :func:`pipeline.rules.dedupe.apply` itself."""
    event = {
        "event_id": "first",
        "type": "click",
        "channel": "email",
        "campaign_id": "camp",
        "subscriber_id": "h:0",
        "timestamp": float(now),
        "source": "sendgrid",
    }
    subscriber = SubscriberRecord()
    apply(event, stamp_of(1, 0, 0), subscriber, Partial(), Rules((60,), 300), now)
    return subscriber


def run(subscribers: int, directory: Path) -> dict[str, Any]:
    from faust.stores.rocksdb import RocksDBOptions
    from rocksdict import WriteBatch

    from pipeline.stages.topology import ROCKSDB_LARGE

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    # one database per partition, as the worker's table has (4 partitions, all owned)
    dbs = [RocksDBOptions(**ROCKSDB_LARGE).open(directory / f"subscribers-{p}.db") for p in range(PARTITIONS)]
    now = int(time.time())
    base_rss = rss_mib()
    checkpoints: list[tuple[int, float]] = []
    started = time.perf_counter()
    written = 0
    while written < subscribers:
        batches = [WriteBatch(raw_mode=True) for _ in dbs]
        for n in range(written, min(subscribers, written + BATCH)):
            key, value = record(n, now)
            batches[n % PARTITIONS].put(key, value)
        for db, batch in zip(dbs, batches, strict=True):
            db.write(batch)
        written = min(subscribers, written + BATCH)
        if written % (subscribers // 4 or 1) < BATCH or written == subscribers:
            checkpoints.append((written, rss_mib()))
    write_s = time.perf_counter() - started
    rng = random.Random(1)
    picks = [rng.randrange(subscribers) for _ in range(min(subscribers, 50_000))]
    started = time.perf_counter()
    found = 0
    for p, db in enumerate(dbs):
        keys = [record(n, now)[0] for n in picks if n % PARTITIONS == p]
        found += sum(1 for v in db.get(keys) if v is not None)
    read_s = time.perf_counter() - started
    for db in dbs:
        db.flush()
    disk = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    for db in dbs:
        db.close()
    # RSS growth per million from the second half of the run (past the fixed costs)
    (n1, r1), (n2, r2) = (
        checkpoints[len(checkpoints) // 2 - 1 if len(checkpoints) > 1 else 0],
        checkpoints[-1],
    )
    slope = max(0.0, (r2 - r1) / ((n2 - n1) / 1e6)) if n2 > n1 else 0.0
    peak = peak_rss_mib()
    return {
        "subscribers": subscribers,
        "write_seconds": write_s,
        "records_per_s": subscribers / write_s,
        "read_sample": len(picks),
        "read_found": found,
        "reads_per_s": len(picks) / read_s if read_s else 0.0,
        "base_rss_mib": base_rss,
        "peak_rss_mib": peak,
        "rss_per_million_mib": slope,
        "checkpoints": checkpoints,
        "disk_mib": disk / 2**20,
        "extrapolated_10m_rss_mib": None
        if subscribers >= 10_000_000
        else peak + slope * (10_000_000 - subscribers) / 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--subscribers", type=int, required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--status", required=True)
    args = parser.parse_args(argv)
    result = run(args.subscribers, Path(args.dir))
    shutil.rmtree(args.dir, ignore_errors=True)
    write_json(Path(args.status), result)
    return 0


def measure(subscribers: int, workdir: Path) -> dict[str, Any]:
    import subprocess
    import sys

    from pipeline.bench.common import read_json

    status = workdir / "memory.status.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.bench.memory",
            "--subscribers",
            str(subscribers),
            "--dir",
            str(workdir / "memory-db"),
            "--status",
            str(status),
        ],
        check=True,
        timeout=1800,
        env={**os.environ},
    )
    return read_json(status)


if __name__ == "__main__":
    raise SystemExit(main())
