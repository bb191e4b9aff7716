"""Ingest in processes of its own, beside the stream worker, so that it uses other cores.

Ingest (parse, validate, pseudonymise, produce, answer 202 once the broker acked) keeps no
state, so it runs in processes that all bind the public port with ``SO_REUSEPORT``: the kernel
spreads the connections over them, and a GIL busy with the stream stages no longer delays a
request. The stream worker (``pipeline worker`` / ``pipeline run``) starts them, restarts one
that dies (loudly), and stops them when it stops. They share its settings exactly (the
settings are handed over on stdin, the generated salt of ``pipeline run`` included) and run the
same security checks at start.

``/metrics`` stays one endpoint: the ingest counters (``pipeline_events_ingested_total``,
``pipeline_events_rejected_total``, ``pipeline_http_requests_total``, ...) of every process are
kept in prometheus_client's multiprocess files in ``<data dir>/ingest-metrics``, and the stream
worker's ``/metrics`` sums them. A counter of a process that died keeps its count there, so the
sums never go back; the directory is emptied when the worker starts, as a process's counters
start at zero.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

from pipeline.settings import Settings

log = logging.getLogger(__name__)

SHARED_COUNTERS_DIR = "ingest-metrics"
RESTART_DELAY = 1.0
QUICK_DEATHS = 5  # processes that die this many times in a row within QUICK seconds stop the worker
QUICK = 10.0


def cpu_count() -> int:
    """CPUs this process may run on (its affinity: a container's cpuset, taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def ingest_process_count(settings: Settings, cpus: int | None = None) -> int:
    """``PIPELINE_INGEST_PROCESSES``, or from the CPUs: none on one CPU (everything in one
    process), else one per four CPUs, at least one.

    One stream worker processes each event several times as expensively as ingest does, so
    one ingest process keeps up with it on two to four cores; more of them help TLS and
    webhook signatures on larger machines.
    """
    if settings.ingest_processes is not None:
        return settings.ingest_processes
    cpus = cpu_count() if cpus is None else cpus
    return 0 if cpus < 2 else max(1, cpus // 4)


def share_counters(directory: Path) -> None:
    """Make this process's counters multiprocess files in ``directory`` (emptied first).

    prometheus_client decides the kind of value when a metric is created, from
    ``PROMETHEUS_MULTIPROC_DIR``: set here before the worker creates its counters, and in the
    ingest processes' environment before they start.
    """
    from prometheus_client import values

    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    values.ValueClass = values.MultiProcessValue()


class IngestProcess:
    def __init__(self, number: int) -> None:
        self.number = number
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_fd: int | None = None
        self.ready = False
        self.started_at = 0.0
        self.quick_deaths = 0
        self.restart_at: float | None = None  # exited: started again at this time


class IngestProcesses:
    """Starts, watches and stops the ingest processes of one worker."""

    def __init__(self, settings: Settings, count: int, directory: Path, loglevel: str = "info") -> None:
        self.settings = settings
        self.loglevel = loglevel
        self.count = count
        self.directory = directory
        self.upstream: str | None = None
        self.processes = [IngestProcess(n) for n in range(count)]
        self.failed: str | None = None  # set when they keep dying: the worker stops

    @property
    def ready(self) -> bool:
        """Every ingest process listens on the public port."""
        return all(p.ready for p in self.processes)

    def start(self, upstream: str | None) -> None:
        self.upstream = upstream
        for process in self.processes:
            self._spawn(process)

    def _spawn(self, process: IngestProcess) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.directory)}
        command = [
            sys.executable,
            "-m",
            "pipeline.ingest.server",
            "--ready-fd",
            str(write_fd),
            "--parent",
            str(os.getpid()),
            "--number",
            str(process.number),
        ]
        # same process group, stdout and stderr as the worker: a signal to the group and the log
        # reach them too
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, env=env, pass_fds=(write_fd,))
        os.close(write_fd)
        assert proc.stdin is not None
        try:
            proc.stdin.write(pickle.dumps((self.settings, self.upstream, self.loglevel)))
            proc.stdin.close()
        except BrokenPipeError:
            pass  # it died at once: the next poll reports and restarts it
        process.proc, process.ready_fd, process.ready = proc, read_fd, False
        process.started_at = time.monotonic()
        process.restart_at = None

    def poll(self) -> None:
        """Note which processes became ready; restart any that exited."""
        from prometheus_client import multiprocess

        for process in self.processes:
            proc = process.proc
            if proc is None:
                if process.restart_at is not None and time.monotonic() >= process.restart_at:
                    self._spawn(process)
                continue
            if not process.ready and process.ready_fd is not None:
                try:
                    if os.read(process.ready_fd, 64):
                        process.ready = True
                except BlockingIOError:
                    pass
            code = proc.poll()
            if code is None:
                continue
            lived = time.monotonic() - process.started_at
            process.quick_deaths = process.quick_deaths + 1 if lived < QUICK else 0
            log.error(
                "ingest process %d (pid %d) exited with %s after %.0f s: %s",
                process.number,
                proc.pid,
                code,
                lived,
                "restarting it" if process.quick_deaths < QUICK_DEATHS else "giving up",
            )
            multiprocess.mark_process_dead(proc.pid, str(self.directory))
            self._close(process)
            if process.quick_deaths >= QUICK_DEATHS:
                self.failed = (
                    f"ingest process {process.number} exited {process.quick_deaths} times within "
                    f"{QUICK:.0f} s of its start (last exit code {code}); see the log above"
                )
                return
            # not at once: a process that cannot start would otherwise be started in a tight loop
            process.restart_at = process.started_at + max(lived, RESTART_DELAY)

    def _close(self, process: IngestProcess) -> None:
        if process.ready_fd is not None:
            os.close(process.ready_fd)
        process.proc, process.ready_fd, process.ready = None, None, False

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM: each finishes the requests it holds (their events acknowledged or refused)."""
        running = [p for p in self.processes if p.proc is not None and p.proc.poll() is None]
        for process in running:
            assert process.proc is not None
            process.proc.terminate()
        deadline = time.monotonic() + timeout
        for process in running:
            assert process.proc is not None
            try:
                process.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("ingest process %d did not stop in time: killed", process.number)
                process.proc.kill()
                process.proc.wait()
        for process in self.processes:
            if process.proc is not None:
                self._close(process)
