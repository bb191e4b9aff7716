"""Fixtures that start real parts: a broker over TCP (the embedded Tansu, or Apache Kafka from
its jars) and worker processes.

A test marked ``@pytest.mark.brokers("tansu", "kafka")`` runs once per broker kind: ``kafka``
is a single Apache Kafka node of the default version (:data:`pipeline.kafka.local.KAFKA_VERSION`),
``kafka-<version>`` another version. Unmarked tests get Tansu."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from pipeline.kafka.local import KAFKA_VERSION, KafkaCluster
from pipeline.kafka.tansu import EmbeddedBroker, free_port

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "brokers(*kinds): run once per broker kind (tansu, kafka, kafka-<version>)"
    )
    config.addinivalue_line("markers", "slow: a 3-broker Apache Kafka cluster test (minutes; CI runs it)")
    for name, what in SUITES.items():
        config.addinivalue_line("markers", f"{name}: {what}")


# One folder per suite; each test is marked with its folder's name (`pytest -m unit`, ...).
SUITES = {
    "unit": "pure rules, codecs, providers' parsing and signatures, diagnosis, layering: no broker, seconds",
    "integration": "one worker or tool against a real broker over TCP",
    "e2e": "faults, several processes, the installed wheel, soak",
    "deploy": "Prometheus rules and alerts, dashboards, compose and Kubernetes files, with real tools",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        suite = Path(str(item.fspath)).relative_to(Path(__file__).parent).parts[0]
        if suite in SUITES:
            item.add_marker(suite)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("brokers")
    if marker is not None and "broker_kind" in metafunc.fixturenames:
        metafunc.parametrize("broker_kind", marker.args)


@pytest.fixture
def broker_kind() -> str:
    return "tansu"


@pytest.fixture
def broker(
    broker_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[EmbeddedBroker | KafkaCluster]:
    assert request.node.get_closest_marker("unit") is None, "unit tests run without a broker"
    if broker_kind == "tansu":
        with EmbeddedBroker(log_path=tmp_path / "broker.log") as running:
            yield running
    else:
        version = broker_kind.partition("-")[2] or KAFKA_VERSION
        with KafkaCluster(tmp_path / "kafka", brokers=1, version=version) as cluster:
            yield cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[KafkaCluster]:
    """A 3-node Apache Kafka cluster (replication factor 3, min.insync.replicas=2)."""
    with KafkaCluster(tmp_path / "kafka", brokers=3) as running:
        yield running


@pytest.fixture
def cluster_workers(cluster: KafkaCluster) -> Iterator[list[WorkerProcess]]:
    """Workers to start against the cluster; stopped before it."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the wheel built from the checkout, the fresh virtual environment it is installed in),
    once per session: what users install, with its pinned dependencies from pip's cache."""
    work = tmp_path_factory.mktemp("package")
    # from a copy without build/: setuptools builds in place and would reuse files a previous
    # build left there, so a file missing from the package could still reach the wheel
    source = work / "source"
    skipped = (".git", ".venv", "build", "*.egg-info", "data", "__pycache__", ".*cache", "node_modules")
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(*skipped))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(work / "dist")],
        check=True,
        cwd=work,
    )
    (wheel,) = (work / "dist").glob("funnel_pipeline-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], check=True, cwd=work)
    return wheel, venv


# What a process started from the installed wheel must not inherit from the test's environment:
# the checkout on its path, this virtual environment.
CHECKOUT_VARIABLES = ("PYTHONPATH", "VIRTUAL_ENV")


def outside_environ() -> dict[str, str]:
    """This environment without what points a process at the checkout."""
    return {k: v for k, v in os.environ.items() if k not in CHECKOUT_VARIABLES}


@dataclass
class WorkerProcess:
    broker: str
    data_dir: Path
    port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    code_dir: Path = ROOT  # where `python -m pipeline` finds the package (another version's, too)
    program: tuple[str, ...] = ()  # how to run `pipeline` (default: this interpreter, -m pipeline)
    admin_port: int | None = None  # set: /health, /metrics and /campaigns answer there only
    command: tuple[str, ...] = ("worker",)
    unset: tuple[str, ...] = ()  # variables of the default environment to leave out
    scheme: str = "http"  # "https" when the worker is given a certificate

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        """Where /health, /metrics and /campaigns answer."""
        return f"http://127.0.0.1:{self.admin_port}" if self.admin_port else self.url

    def start(self, wait: bool = True, timeout: float = 90.0) -> WorkerProcess:
        self.log_path = self.data_dir / f"worker-{self.port}.log"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "PIPELINE_BROKER": self.broker,
            "PIPELINE_PORT": str(self.port),
            "PIPELINE_DATA_DIR": str(self.data_dir / f"state-{self.port}"),
            "PIPELINE_ID_SALT": "test-salt",
            **({"PIPELINE_ADMIN_PORT": str(self.admin_port)} if self.admin_port else {}),
            **self.env,
        }
        for name in self.unset:
            env.pop(name, None)
        self.process = subprocess.Popen(
            [*(self.program or (sys.executable, "-m", "pipeline")), *self.command, "--loglevel", "warning"],
            stdout=open(self.log_path, "ab"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.code_dir,
            start_new_session=True,
        )
        if wait:
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.admin_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"worker not healthy after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path else ""

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, no buffered write is flushed."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def workers(broker: EmbeddedBroker, tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    """A list to start workers into; all are stopped at the end."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


@pytest.fixture
def worker(broker: EmbeddedBroker, tmp_path: Path, workers: list[WorkerProcess]) -> WorkerProcess:
    running = WorkerProcess(broker.address, tmp_path).start()
    workers.append(running)
    return running
