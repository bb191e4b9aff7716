"""Apache Kafka on loopback without Docker: the broker's jars from Maven Central, KRaft mode.

``pipeline kafka`` and the test suite use this to run one broker or a 3-broker cluster as
plain ``java`` processes: :func:`fetch_jars` runs ``mvn dependency:copy-dependencies`` on the
``pom.xml`` next to this file into a cache folder (once per version), then every node gets a
``server.properties``, ``kafka.tools.StorageTool format`` and ``kafka.Kafka``. Every node is
broker and controller at once (combined mode), so three JVMs make a cluster that survives the
loss of any one node. Java (17 for Kafka 4) and Maven come from PATH.

``KafkaCluster(..., security="secure")`` (``pipeline kafka --secure``) serves clients only over
TLS, for developing and testing secured clients; see :class:`KafkaCluster` for its listeners,
the files it makes in ``<directory>/tls/`` and its users. ``acls=True`` (``--acls``) adds the
standard authorizer, denying what no ACL allows; :meth:`KafkaCluster.grant` adds ACLs.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import os
import secrets
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
from aiokafka.protocol.admin import CreateAclsRequest, DescribeAclsRequest
from aiokafka.protocol.metadata import MetadataRequest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

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


SECURITY_MODES = ("plaintext", "secure")
USERS = ("admin", "worker", "limited")  # SASL users of a secure cluster; admin is a super user
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
SERVER_SAN = ("IP:127.0.0.1", "DNS:localhost")
AUTHORIZER = "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
SUPER_USERS = "User:admin;User:ANONYMOUS"  # ANONYMOUS: the internal PLAINTEXT and CONTROLLER listeners

# Kafka's wire codes (org.apache.kafka.common.resource / acl), for CreateAcls and DescribeAcls
ACL_RESOURCE_TYPES = {
    "topic": 2,
    "group": 3,
    "cluster": 4,
    "transactional_id": 5,
    "delegation_token": 6,
    "user": 7,
}
ACL_PATTERN_TYPES = {"literal": 3, "prefixed": 4}
ACL_OPERATIONS = {
    "all": 2,
    "read": 3,
    "write": 4,
    "create": 5,
    "delete": 6,
    "alter": 7,
    "describe": 8,
    "cluster_action": 9,
    "describe_configs": 10,
    "alter_configs": 11,
    "idempotent_write": 12,
}
ACL_ANY_OPERATION = 1
ACL_ALLOW = 3

# What a worker needs, and all `pipeline kafka --secure --acls` grants its principals (SASL and
# mTLS), for the default PIPELINE_APP_ID `funnel`: the table "Least privilege" of
# deploy/README.md lists the same (tests/integration/test_secure_kafka.py runs a worker on them)
WORKER_TOPIC_OPERATIONS = ("create", "describe", "read", "write")
WORKER_GRANTS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("topic", "funnel.", "prefixed", WORKER_TOPIC_OPERATIONS),  # the pipeline's own topics
    ("topic", "funnel-", "prefixed", WORKER_TOPIC_OPERATIONS),  # Faust's changelogs and leader topic
    ("group", "funnel", "literal", ("read", "describe")),  # the stream stages' consumer group
)


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
    """Run a coroutine on a loop of its own (callers may be inside a test or a CLI command);
    called from a running loop (an async test), on a thread of its own, blocking that loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # none: the usual case
        pass
    else:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(_run, coro).result()
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8, which Kafka's PEM key store reads when no ``ssl.key.password`` is set."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, secret: bool = False) -> None:
    """Written whole under a temporary name, then renamed; secrets are 0600 from the start."""
    temporary = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    temporary.replace(path)


def _general_names(entries: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for entry in entries:
        kind, _, value = entry.partition(":")
        if kind.upper() == "IP" and value:
            names.append(x509.IPAddress(ipaddress.ip_address(value)))
        elif kind.upper() == "DNS" and value:
            names.append(x509.DNSName(value))
        else:
            raise ValueError(f"a subject alternative name is IP:<address> or DNS:<name>, not {entry!r}")
    return names


def _issue(
    common_name: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    usage: str,
    san: Iterable[str] = (),
    days: int = 3650,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A P-256 certificate: ``usage`` "ca" (self-signed when ``issuer`` is None), "server" or "client"."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    )
    ca = usage == "ca"
    builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    builder = builder.add_extension(
        x509.KeyUsage(
            digital_signature=not ca,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=ca,
            crl_sign=ca,
            encipher_only=False,
            decipher_only=False,
        ),
        critical=True,
    )
    if not ca:
        purpose = ExtendedKeyUsageOID.SERVER_AUTH if usage == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
    names = _general_names(san)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _load(directory: Path, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    if not (cert_path.exists() and key_path.exists()):
        return None
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def _save(directory: Path, name: str, pair: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    _write(directory / f"{name}.key", _private_pem(pair[1]), secret=True)
    _write(directory / f"{name}.pem", _cert_pem(pair[0]))


@dataclass
class KafkaNode:
    """One JVM: broker and controller of the cluster, with its own ports and data folder.

    ``port`` is its PLAINTEXT listener: the clients' on a plaintext cluster, the internal one
    (brokers among themselves, test tooling) on a secure cluster, which also has ``sasl_port``
    (SASL_SSL) and ``ssl_port`` (SSL with client certificates).
    """

    node_id: int
    port: int
    controller_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    sasl_port: int | None = None
    ssl_port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_address(self) -> str:
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def ssl_address(self) -> str:
        return f"127.0.0.1:{self.ssl_port}"

    @property
    def ports(self) -> list[int]:
        """Every port it serves clients on."""
        return [p for p in (self.port, self.sasl_port, self.ssl_port) if p is not None]

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

    ``security="secure"``: every node serves clients on two TLS listeners, ``SASL_SSL``
    (mechanisms PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512; :attr:`bootstrap`) and ``SSL`` with
    client certificates required (:attr:`ssl_bootstrap`), beside a PLAINTEXT listener for the
    brokers among themselves and for test tooling (:attr:`plaintext_bootstrap`, loopback only,
    a super user under ACLs). With ``port`` given, node n takes SASL_SSL ``port+n-1``,
    CONTROLLER ``port+100+n-1``, SSL ``port+200+n-1`` and PLAINTEXT ``port+300+n-1``.
    Made at the first start in ``<directory>/tls/`` (kept; the server certificate is made anew
    at every start, from ``server_san``):

    - ``ca.pem`` (and ``ca.key``): the CA every broker and client certificate is signed by,
      the CA file a client verifies the brokers with, and the brokers' trust store;
    - ``server.pem``, ``server.key``, ``server-keystore.pem`` (both in one, Kafka's
      ``ssl.keystore.type=PEM``): one certificate for every node, SAN ``server_san``
      (default IP:127.0.0.1 and DNS:localhost; e.g. ``("DNS:wrong.example",)`` for a
      hostname-mismatch test);
    - ``client.pem``/``client.key`` (CN=worker, Kafka principal ``User:CN=worker``) and
      ``other-client.pem``/``other-client.key`` (CN=other, ``User:CN=other``) for mutual TLS;
    - ``other-ca.pem`` (and ``.key``): a CA that signed nothing the brokers use, so a client
      verifying with it fails; ``untrusted-client.pem``/``.key``: CN=worker signed by that CA,
      which the brokers refuse;
    - ``users.json`` (0600): the generated password of each of :data:`USERS` (also
      :attr:`passwords`), each one a PLAIN, a SCRAM-SHA-256 and a SCRAM-SHA-512 user (the
      SCRAM ones are written into the metadata log when a node is formatted); the SASL
      principal is ``User:<name>``; ``worker.password`` (0600): the worker's alone.

    ``acls=True`` (secure only): the standard authorizer, nothing allowed without an ACL
    (``allow.everyone.if.no.acl.found=false``), super users ``User:admin`` and
    ``User:ANONYMOUS`` (what the PLAINTEXT and CONTROLLER listeners authenticate as);
    :meth:`grant` adds ACLs.
    """

    directory: Path
    brokers: int = 1
    version: str = KAFKA_VERSION
    port: int | None = None  # first client port; the next nodes take the following ones
    heap: str = HEAP
    config: dict[str, str] = field(default_factory=dict)
    security: str = "plaintext"
    acls: bool = False
    server_san: tuple[str, ...] = SERVER_SAN
    nodes: list[KafkaNode] = field(default_factory=list, init=False)
    libs: Path | None = field(default=None, init=False)
    passwords: dict[str, str] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if self.security not in SECURITY_MODES:
            raise ValueError(f"security is one of {SECURITY_MODES}, not {self.security!r}")
        if self.acls and not self.secure:
            raise ValueError("acls=True needs security='secure' (every plaintext client is a super user)")
        _general_names(self.server_san)  # refused now rather than at start
        self.directory = Path(self.directory).resolve()
        per_node = 4 if self.secure else 2
        ports = [] if self.port else free_ports(per_node * self.brokers)
        for index in range(self.brokers):
            directory = self.directory / f"node-{index + 1}"
            if self.port:
                own = [self.port + offset + index for offset in (0, 100, 200, 300)][:per_node]
            else:
                own = ports[per_node * index : per_node * (index + 1)]
            if self.secure:  # the client port stays the one a worker's PIPELINE_BROKER takes
                sasl, controller, ssl_port, plain = own
                node = KafkaNode(index + 1, plain, controller, directory, sasl_port=sasl, ssl_port=ssl_port)
            else:
                node = KafkaNode(index + 1, own[0], own[1], directory)
            self.nodes.append(node)

    @property
    def secure(self) -> bool:
        return self.security == "secure"

    @property
    def bootstrap(self) -> str:
        """What a worker's PIPELINE_BROKER takes: the SASL_SSL listeners of a secure cluster."""
        if self.secure:
            return ",".join(node.sasl_address for node in self.nodes)
        return ",".join(node.address for node in self.nodes)

    address = bootstrap  # what a worker's --broker takes, as for the embedded broker

    @property
    def ssl_bootstrap(self) -> str:
        """The SSL listeners (client certificates required) of a secure cluster."""
        if not self.secure:
            raise KafkaError("only a secure cluster has SSL listeners")
        return ",".join(node.ssl_address for node in self.nodes)

    @property
    def plaintext_bootstrap(self) -> str:
        """The PLAINTEXT listeners: the clients' on a plaintext cluster, the internal ones (no
        authentication, a super user under ACLs) on a secure cluster."""
        return ",".join(node.address for node in self.nodes)

    @property
    def tls_dir(self) -> Path:
        return self.directory / "tls"

    def node(self, node_id: int) -> KafkaNode:
        return self.nodes[node_id - 1]

    def properties(self, node: KafkaNode) -> dict[str, str]:
        replicas = min(3, self.brokers)
        in_sync = 2 if replicas >= 3 else 1
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes)
        listeners = {
            "listeners": f"PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        }
        if self.secure:
            listeners = self._secure_properties(node)
        return {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            **listeners,
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

    def _secure_properties(self, node: KafkaNode) -> dict[str, str]:
        if not self.passwords:
            raise KafkaError("the users of a secure cluster are made by start()")
        tls = self.tls_dir
        plain_users = " ".join(f'user_{name}="{password}"' for name, password in self.passwords.items())
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        clients = f"SASL_SSL://127.0.0.1:{node.sasl_port},SSL://127.0.0.1:{node.ssl_port}"
        props = {
            "listeners": f"PLAINTEXT://127.0.0.1:{node.port},{clients},"
            f"CONTROLLER://127.0.0.1:{node.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.port},{clients}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": (
                "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,SSL:SSL"
            ),
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(tls / "server-keystore.pem"),  # key unencrypted: no key password
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(tls / "ca.pem"),
            "listener.name.ssl.ssl.client.auth": "required",  # else a client without one is ANONYMOUS
            "listener.name.sasl_ssl.ssl.client.auth": "none",
            "listener.name.sasl_ssl.sasl.enabled.mechanisms": ",".join(SASL_MECHANISMS),
            "listener.name.sasl_ssl.plain.sasl.jaas.config": "org.apache.kafka.common.security.plain."
            f"PlainLoginModule required {plain_users};",
            "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config": scram,
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": scram,
        }
        if self.acls:
            props.update(
                {
                    "authorizer.class.name": AUTHORIZER,
                    "allow.everyone.if.no.acl.found": "false",
                    "super.users": SUPER_USERS,
                }
            )
        return props

    def _prepare_tls(self) -> None:
        """The CAs, certificates and users of a secure cluster (see the class); what exists is kept."""
        tls = self.tls_dir
        tls.mkdir(parents=True, exist_ok=True)
        ca = _load(tls, "ca")
        if ca is None:
            ca = _issue("funnel-pipeline local Kafka CA", None, usage="ca")
            _save(tls, "ca", ca)
            for name in ("client", "other-client"):  # signed by the CA before: made anew
                for suffix in (".pem", ".key"):
                    with contextlib.suppress(FileNotFoundError):
                        (tls / f"{name}{suffix}").unlink()
        if _load(tls, "other-ca") is None:
            _save(tls, "other-ca", _issue("funnel-pipeline untrusted CA", None, usage="ca"))
        other_ca = _load(tls, "other-ca")
        assert other_ca is not None
        for name, common_name, issuer in (
            ("client", "worker", ca),
            ("other-client", "other", ca),
            ("untrusted-client", "worker", other_ca),
        ):
            if _load(tls, name) is None:
                _save(tls, name, _issue(common_name, issuer, usage="client", days=825))
        server, server_key = _issue("kafka", ca, usage="server", san=self.server_san, days=825)
        _save(tls, "server", (server, server_key))
        _write(
            tls / "server-keystore.pem", _private_pem(server_key) + _cert_pem(server) + _cert_pem(ca[0]), True
        )

        users = tls / "users.json"
        if users.exists():
            self.passwords = json.loads(users.read_text())
        else:
            formatted = [n.node_id for n in self.nodes if (n.directory / "data" / "meta.properties").exists()]
            if formatted:  # SCRAM users are made when a node is formatted, not later
                raise KafkaError(
                    f"{users} is missing but nodes {formatted} are formatted already (without these "
                    f"users): start a secure cluster in a new folder, or restore the file"
                )
            self.passwords = {name: secrets.token_urlsafe(18) for name in USERS}
            _write(users, json.dumps(self.passwords, indent=2).encode() + b"\n", secret=True)
        _write(tls / "worker.password", self.passwords["worker"].encode() + b"\n", secret=True)

    def _scram_arguments(self) -> list[str]:
        return [
            f"--add-scram={mechanism}=[name={name},password={password}]"
            for name, password in self.passwords.items()
            for mechanism in SASL_MECHANISMS
            if mechanism.startswith("SCRAM-")
        ]

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
        if self.secure:
            self._prepare_tls()
        formats = []
        for node in self.nodes:
            node.directory.mkdir(parents=True, exist_ok=True)
            props = node.directory / "server.properties"
            text = "".join(f"{k}={v}\n" for k, v in self.properties(node).items())
            _write(props, text.encode(), secret=self.secure)  # a secure one holds the PLAIN passwords
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
                            *(self._scram_arguments() if self.secure else []),
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
            listening = all(_listening(port) for node_id in wanted for port in self.node(node_id).ports)
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
            client = AIOKafkaClient(bootstrap_servers=self._live(), request_timeout_ms=10_000)
            try:
                await client.bootstrap()
                request = MetadataRequest(list(topics) if topics is not None else None, False)
                return await client.send(client.get_random_node(), request)
            finally:
                await client.close()

        return _run(fetch())

    def _live(self) -> str:
        """The PLAINTEXT listeners of the nodes that serve now (the helpers' way in)."""
        return ",".join(node.address for node in self.nodes if node.running and _listening(node.port))

    def grant(
        self,
        principal: str,
        resource_type: str,
        name: str,
        pattern_type: str = "literal",
        operations: Iterable[str] = ("all",),
        host: str = "*",
        timeout: float = 30.0,
    ) -> None:
        """ALLOW ACLs, e.g. ``grant("User:limited", "topic", "limited.", "prefixed", ["create"])``;
        returns once every running node's authorizer has them.

        ``resource_type``: topic, group, cluster (name ``kafka-cluster``), transactional_id,
        delegation_token, user; ``pattern_type``: literal (``*`` = every name) or prefixed;
        ``operations``: keys of :data:`ACL_OPERATIONS`. Principals: ``User:<name>`` for SASL
        users, ``User:CN=worker`` for the client certificate (Kafka's default mapping: the
        certificate's whole subject). Sent over the PLAINTEXT listener (ANONYMOUS, a super user).
        """
        if not self.acls:
            raise KafkaError("grant() needs a cluster started with acls=True")
        try:
            resource = ACL_RESOURCE_TYPES[resource_type.lower()]
            pattern = ACL_PATTERN_TYPES[pattern_type.lower()]
            codes = {ACL_OPERATIONS[operation.lower()] for operation in operations}
        except KeyError as exc:
            raise ValueError(f"unknown ACL resource type, pattern type or operation: {exc}") from None

        async def create() -> None:
            client = AIOKafkaClient(bootstrap_servers=self._live(), request_timeout_ms=10_000)
            try:
                await client.bootstrap()
                for code in sorted(codes):
                    request = CreateAclsRequest(resource, name, pattern, principal, host, code, ACL_ALLOW)
                    response = await client.send(client.get_random_node(), request)
                    for error_code, message in response.creation_responses:
                        if error_code:
                            raise KafkaError(
                                f"CreateAcls {principal} {resource_type} {name}: {error_code} {message}"
                            )
                deadline = time.monotonic() + timeout
                for node in self.nodes:
                    if not node.running:
                        continue
                    describe = DescribeAclsRequest(
                        resource, name, pattern, principal, host, ACL_ANY_OPERATION, ACL_ALLOW
                    )
                    while True:
                        response = await client.send(node.node_id, describe)
                        found = {acl[2] for resource_acls in response.resources for acl in resource_acls[-1]}
                        if codes <= found:
                            break
                        if time.monotonic() > deadline:
                            raise KafkaError(
                                f"node {node.node_id} did not list the new ACLs within {timeout:.0f} s"
                            )
                        await asyncio.sleep(0.1)
            finally:
                await client.close()

        _run(create())

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
