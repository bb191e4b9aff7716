"""One ingest process: the public port's ``POST`` endpoints, beside the stream worker.

Started by :class:`pipeline.ingest.processes.IngestProcesses` as
``python -m pipeline.ingest.server --ready-fd N --parent PID --number K`` with the worker's
settings pickled on stdin; it writes a line to the ready descriptor once it listens. It exits
when the worker exits (the kernel sends it SIGTERM), and on SIGTERM it finishes the requests it
holds before it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import pickle
import signal
import sys

from pipeline.settings import Settings, SettingsError

log = logging.getLogger("pipeline.ingest.server")
PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """SIGTERM this process when the worker that started it dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before prctl took effect
        sys.exit(0)


async def serve(settings: Settings, upstream: str | None, ready_fd: int) -> None:
    from pipeline.http.server import INGEST, WebApp
    from pipeline.http.webhooks import add_webhook_routes
    from pipeline.ingest.producer import EventProducer
    from pipeline.ingest.service import IngestService
    from pipeline.metrics.collector import HealthCounters, broker_up_gauge

    counters = HealthCounters(None)  # multiprocess files, summed by the worker's /metrics
    broker_up = broker_up_gauge()
    producer = EventProducer(settings)
    broker_up.set(0)
    producer.on_health = lambda healthy: broker_up.set(1 if healthy else 0)
    ingest = IngestService(settings, producer, counters)
    web = WebApp(
        settings,
        counters,
        None,
        None,
        lambda: False,
        None,
        extra_routes=lambda web_app: add_webhook_routes(web_app, ingest, settings),
        ingest=ingest,
        role=INGEST,
        upstream=upstream,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await web.start()
    os.write(ready_fd, b"ready\n")
    os.close(ready_fd)
    try:
        await stop.wait()
    finally:
        await web.stop()  # the requests in progress finish first
        await producer.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--number", type=int, default=0)
    args = parser.parse_args(argv)
    die_with_parent(args.parent)
    settings, upstream, loglevel = pickle.loads(sys.stdin.buffer.read())
    logging.basicConfig(
        level=getattr(logging, loglevel.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s ingest-{args.number} %(name)s: %(message)s",
    )
    from pipeline.http.security import check_listeners

    try:
        check_listeners(settings)  # every process refuses an unsafe start on its own
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(settings, upstream, args.ready_fd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
