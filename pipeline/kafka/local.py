"""Apache Kafka on loopback without Docker: the broker's jars from Maven Central, KRaft mode.

``pipeline kafka`` and the test suite use this to run one broker or a 3-broker cluster as
plain ``java`` processes: :func:`fetch_jars` runs ``mvn dependency:copy-dependencies`` on the
``pom.xml`` next to this file into a cache folder (once per version), then every node gets a
``server.properties``, ``kafka.tools.StorageTool format`` and ``kafka.Kafka``. Every node is
broker and controller at once (combined mode), so three JVMs make a cluster that survives the
loss of any one node. Java (17 for Kafka 4) and Maven come from PATH.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.metadata import MetadataRequest

from pipeline.kafka.tansu import free_ports

KAFKA_VERSION = "4.4.0"  # the default; docker-compose.yml and deploy/kubernetes pin the same
TESTED_VERSIONS = ("4.4.0", "3.9.1")
POM = Path(__file__).with_name("pom.xml")
HEAP = "512m"  # a small machine runs three of them next to the workers

LOG4J2 = """\
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
appender.file.type = File
appender.file.name = file
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
"""


class KafkaError(RuntimeError):
    """Apache Kafka could not be fetched, started or reached."""


def cache_dir() -> Path:
    """Where fetched jars are kept: ``$PIPELINE_KAFKA_CACHE``, else the user's cache folder."""
    if os.environ.get("PIPELINE_KAFKA_CACHE"):
        return Path(os.environ["PIPELINE_KAFKA_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "funnel-pipeline" / "kafka"


def _tool(name: str, why: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise KafkaError(f"`{name}` is not on PATH: {why}")
    return path


def fetch_jars(version: str = KAFKA_VERSION, quiet: bool = True) -> Path:
    """The folder holding ``kafka_2.13-<version>.jar`` and its dependencies, fetched once.

    Several processes may ask at once (parallel test runs): one fetches under a file lock, the
    others wait and find the finished folder. A fetch goes to a temporary folder first, so an
    interrupted one never looks finished.
    """
    root = cache_dir() / version
    libs = root / "libs"
    if (libs / f"kafka_2.13-{version}.jar").exists():
        return libs
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (libs / f"kafka_2.13-{version}.jar").exists():
            return libs
        mvn = _tool("mvn", "Maven fetches the Kafka jars from Maven Central (apt-get install maven)")
        with tempfile.TemporaryDirectory(dir=root) as work:
            pom = Path(work) / "pom.xml"
            shutil.copyfile(POM, pom)  # the package folder may be read-only
            fetched = Path(work) / "libs"
            command = [
                mvn,
                *(["-q"] if quiet else []),
                "-B",
                "-f",
                str(pom),
                "dependency:copy-dependencies",
                f"-Dkafka.version={version}",
                f"-DoutputDirectory={fetched}",
            ]
            done = subprocess.run(command, capture_output=quiet, text=True)
            if done.returncode != 0 or not (fetched / f"kafka_2.13-{version}.jar").exists():
                output = (done.stdout or "") + (done.stderr or "") if quiet else ""
                raise KafkaError(f"fetching Apache Kafka {version} with Maven failed:\n{output[-3000:]}")
            fetched.rename(libs)
    return libs


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine on a loop of its own (callers may be inside a test or a CLI command)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


@dataclass
class KafkaNode:
    """One JVM: broker and controller of the cluster, with its own ports and data folder."""

    node_id: int
    port: int
    controller_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no controlled shutdown, no flush (the page cache survives, as in a JVM crash)."""
        if self.running:
            assert self.process is not None
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def terminate(self) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float = 60.0) -> None:
        """After :meth:`terminate`: a controlled shutdown moves leadership away first."""
        if self.process is None:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self.process = None

    def quorum_state(self) -> dict[str, Any]:
        path = self.directory / "data" / "__cluster_metadata-0" / "quorum-state"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}


@dataclass
class KafkaCluster:
    """``brokers`` Apache Kafka nodes in KRaft combined mode on 127.0.0.1.

    With three nodes, topics default to replication factor 3 and ``min.insync.replicas=2``:
    acks=all then survives any one node down. Topics are not created on first use
    (``auto.create.topics.enable=false``, as in production): the pipeline creates its own.
    """

    directory: Path
    brokers: int = 1
    version: str = KAFKA_VERSION
    port: int | None = None  # first client port; the next nodes take the following ones
    heap: str = HEAP
    config: dict[str, str] = field(default_factory=dict)
    nodes: list[KafkaNode] = field(default_factory=list, init=False)
    libs: Path | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).resolve()
        ports = [] if self.port else free_ports(2 * self.brokers)
        for index in range(self.brokers):
            if self.port:
                port, controller_port = self.port + index, self.port + 100 + index
            else:
                port, controller_port = ports[2 * index], ports[2 * index + 1]
            directory = self.directory / f"node-{index + 1}"
            self.nodes.append(KafkaNode(index + 1, port, controller_port, directory))

    @property
    def bootstrap(self) -> str:
        return ",".join(node.address for node in self.nodes)

    address = bootstrap  # what a worker's --broker takes, as for the embedded broker

    def node(self, node_id: int) -> KafkaNode:
        return self.nodes[node_id - 1]

    def properties(self, node: KafkaNode) -> dict[str, str]:
        replicas = min(3, self.brokers)
        in_sync = 2 if replicas >= 3 else 1
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes)
        return {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "listeners": f"PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "controller.quorum.voters": voters,
            "log.dirs": str(node.directory / "data"),
            "num.partitions": "4",
            "default.replication.factor": str(replicas),
            "min.insync.replicas": str(in_sync),
            "offsets.topic.replication.factor": str(replicas),
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": str(replicas),
            "transaction.state.log.min.isr": str(in_sync),
            "transaction.state.log.num.partitions": "10",
            "auto.create.topics.enable": "false",
            "unclean.leader.election.enable": "false",
            "group.initial.rebalance.delay.ms": "0",
            **self.config,
        }

    def _java(self, node: KafkaNode, main: str, *args: str) -> list[str]:
        assert self.libs is not None
        java = _tool("java", "Apache Kafka needs a Java 17 runtime (apt-get install openjdk-17-jre-headless)")
        return [
            java,
            f"-Xmx{self.heap}",
            "-Xms128m",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.directory / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={node.directory}",
            "-cp",
            f"{self.libs}/*",
            main,
            *args,
        ]

    def _cluster_id(self) -> str:
        path = self.directory / "cluster.id"
        if not path.exists():
            path.write_text(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))
        return path.read_text().strip()

    def start(self, timeout: float = 180.0) -> KafkaCluster:
        """Fetch the jars, format every node that is new, start them all, wait until all serve."""
        self.libs = fetch_jars(self.version)
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "log4j2.properties").write_text(LOG4J2)
        cluster_id = self._cluster_id()
        formats = []
        for node in self.nodes:
            node.directory.mkdir(parents=True, exist_ok=True)
            props = node.directory / "server.properties"
            props.write_text("".join(f"{k}={v}\n" for k, v in self.properties(node).items()))
            if not (node.directory / "data" / "meta.properties").exists():
                formats.append(
                    subprocess.Popen(
                        self._java(
                            node,
                            "kafka.tools.StorageTool",
                            "format",
                            f"--cluster-id={cluster_id}",  # an id may start with "-"
                            f"--config={props}",
                            "--ignore-formatted",
                        ),
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                    )
                )
        for process in formats:
            output, _ = process.communicate(timeout=timeout)
            if process.returncode != 0:
                text = output.decode(errors="replace")[-3000:]
                raise KafkaError(f"formatting a Kafka node failed:\n{text}")
        try:
            for node in self.nodes:
                self.start_node(node.node_id, wait=False)
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def start_node(self, node_id: int, wait: bool = True, timeout: float = 120.0) -> None:
        node = self.node(node_id)
        if node.running:
            return
        out = open(node.directory / "stdout.log", "ab")
        node.process = subprocess.Popen(
            self._java(node, "kafka.Kafka", str(node.directory / "server.properties")),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Every running node listens and the cluster's metadata lists each of them as a broker."""
        deadline = time.monotonic() + timeout
        wanted = {node.node_id for node in self.nodes if node.running}
        while True:
            for node in self.nodes:  # started, not stopped by us, yet gone
                if node.process is not None and node.process.poll() is not None:
                    raise KafkaError(f"Kafka node {node.node_id} exited:\n{self.log(node)}")
            listening = all(_listening(self.node(node_id).port) for node_id in wanted)
            with contextlib.suppress(Exception):
                if listening and wanted <= self.broker_ids():
                    return
            if time.monotonic() > deadline:
                raise KafkaError(f"the cluster did not list brokers {sorted(wanted)} within {timeout:.0f} s")
            time.sleep(0.5)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to every node at once (a controlled shutdown), SIGKILL to any still running
        after ``timeout``: the last nodes of a cluster may wait for a controller quorum that is
        shutting down with them. Kafka recovers an unclean log at the next start."""
        for node in self.nodes:
            node.terminate()
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            node.wait_stopped(max(0.1, deadline - time.monotonic()))

    def kill(self, node_id: int) -> None:
        self.node(node_id).kill()

    def restart(self, node_id: int, timeout: float = 120.0) -> None:
        node = self.node(node_id)
        node.terminate()
        node.wait_stopped()
        self.start_node(node_id, wait=True, timeout=timeout)

    def log(self, node: KafkaNode, tail: int = 4000) -> str:
        text = ""
        for name in ("stdout.log", "server.log"):
            path = node.directory / name
            if path.exists():
                text += f"--- {name}\n" + path.read_text(errors="replace")[-tail:]
        return text

    def __enter__(self) -> KafkaCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # what the fault tests look at

    def active_controller(self) -> int | None:
        """The node leading the KRaft metadata quorum: the newest epoch any node has recorded."""
        states = [node.quorum_state() for node in self.nodes]
        known = [s for s in states if s.get("leaderId", -1) >= 0]
        if not known:
            return None
        return max(known, key=lambda s: s.get("leaderEpoch", -1))["leaderId"]

    def metadata(self, topics: Iterable[str] | None = None) -> Any:
        """A Metadata response from a live node (topics None: every topic)."""

        async def fetch() -> Any:
            live = ",".join(node.address for node in self.nodes if node.running and _listening(node.port))
            client = AIOKafkaClient(bootstrap_servers=live, request_timeout_ms=10_000)
            try:
                await client.bootstrap()
                request = MetadataRequest(list(topics) if topics is not None else None, False)
                return await client.send(client.get_random_node(), request)
            finally:
                await client.close()

        return _run(fetch())

    def broker_ids(self) -> set[int]:
        return {broker[0] for broker in self.metadata([]).brokers}

    def partitions(
        self, topics: Iterable[str] | None = None
    ) -> dict[tuple[str, int], tuple[int, list[int], list[int]]]:
        """(topic, partition) -> (leader, replicas, in-sync replicas), of every topic by default."""
        found = {}
        for _error, topic, _internal, partitions, *_ in self.metadata(topics).topics:
            for _perror, partition, leader, replicas, isr, *_ in partitions:
                found[(topic, partition)] = (leader, list(replicas), list(isr))
        return found

    def leader_counts(self, topics: Iterable[str]) -> Counter[int]:
        return Counter(leader for leader, _, _ in self.partitions(topics).values())

    def wait_in_sync(self, topics: Iterable[str] | None = None, timeout: float = 180.0) -> None:
        """Until every partition (of ``topics``, default all) has a leader and all replicas in sync:
        what an operator waits for before restarting the next broker."""
        topics = list(topics) if topics is not None else None
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(Exception):
                parts = self.partitions(topics)
                if parts and all(
                    leader >= 0 and set(isr) == set(replicas) for leader, replicas, isr in parts.values()
                ):
                    return
            if time.monotonic() > deadline:
                raise KafkaError(f"partitions not back in sync within {timeout:.0f} s")
            time.sleep(0.5)
