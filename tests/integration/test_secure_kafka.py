"""`pipeline worker` on a secured Apache Kafka (``KafkaCluster(security="secure")``), configured
only with the ``PIPELINE_KAFKA_*`` variables: ground truth over SASL_SSL with SCRAM-SHA-512,
SCRAM-SHA-256 and PLAIN and over mutual TLS (every count, window and rate exact), the same on 3
nodes through a SIGKILL of the node leading most raw partitions, the starts a worker refuses
(wrong password, untrusted CA, host name mismatch, a mechanism the listener does not enable, a
principal without ACLs) with the message naming the cause and no password in its log, and a
principal holding exactly the ACLs deploy/README.md lists for a worker.

One secure node with ACLs serves the module (``User:worker`` and ``User:CN=worker`` may Create,
Describe, Read and Write topics prefixed ``funnel`` and Read and Describe groups prefixed ``funnel``).
Every worker on it has an app id of its own (its consumer group and changelogs), and every
traffic run campaigns of its own; the topics ``funnel.raw.*`` and ``funnel.partials`` have fixed
names, so each worker also reads the events of the runs before it, which no assertion looks at.
The least-privilege test (on each tested Kafka version) and the failures needing other broker
settings start nodes of their own; so does the 3-node test (marked ``slow``, as the suite's other
3-node tests are)."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from conftest import WorkerProcess
from helpers import Sender, assert_exact, count_stored_copies, report, scrape, wait_for_counts

from pipeline.kafka.local import KAFKA_VERSION, WORKER_GRANTS, KafkaCluster
from pipeline.kafka.topics import PARTIALS_TOPIC, RAW_TOPICS
from pipeline.simulation.traffic import Traffic, generate, send

# the ACLs of deploy/README.md, "Least privilege: the ACLs a worker needs" (Kafka 3.0 and later)
README_WORKER_ACLS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("topic", "funnel.", "prefixed", ("create", "describe", "read", "write")),
    ("topic", "funnel-", "prefixed", ("create", "describe", "read", "write")),
    ("group", "funnel", "literal", ("read", "describe")),
)


# what the module's workers (app ids funnel-<case>) hold: the README's set, for every app id
# starting with "funnel"
MODULE_GRANTS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("topic", "funnel", "prefixed", ("create", "describe", "read", "write")),
    ("group", "funnel", "prefixed", ("read", "describe")),
)


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    """One node serving SASL_SSL and mutual TLS, ACLs on; ``User:worker`` and ``User:CN=worker``
    hold :data:`MODULE_GRANTS`."""
    directory = tmp_path_factory.mktemp("secure") / "kafka"
    with KafkaCluster(directory, security="secure", acls=True) as cluster:
        for principal in ("User:worker", "User:CN=worker"):
            for resource, name, pattern, operations in MODULE_GRANTS:
                cluster.grant(principal, resource, name, pattern, operations)
        yield cluster


@pytest.fixture
def started() -> Iterator[list[WorkerProcess]]:
    """Workers to stop at the end of the test (before any cluster fixture stops)."""
    workers: list[WorkerProcess] = []
    yield workers
    for worker in workers:
        worker.stop()


def sasl_env(
    cluster: KafkaCluster,
    mechanism: str,
    user: str = "worker",
    *,
    password: str | None = None,
    password_file: Path | None = None,
    cafile: str = "ca.pem",
) -> dict[str, str]:
    """A worker's variables for SASL_SSL: the password inline, or from ``password_file``."""
    env = {
        "PIPELINE_BROKER": cluster.bootstrap,
        "PIPELINE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "PIPELINE_KAFKA_SASL_MECHANISM": mechanism,
        "PIPELINE_KAFKA_SASL_USERNAME": user,
        "PIPELINE_KAFKA_SSL_CAFILE": str(cluster.tls_dir / cafile),
    }
    if password_file is not None:
        env["PIPELINE_KAFKA_SASL_PASSWORD_FILE"] = str(password_file)
    else:
        env["PIPELINE_KAFKA_SASL_PASSWORD"] = cluster.passwords[user] if password is None else password
    return env


def mtls_env(cluster: KafkaCluster, name: str = "client") -> dict[str, str]:
    """A worker's variables for the SSL listener, with client certificate ``name`` (mutual TLS)."""
    tls = cluster.tls_dir
    return {
        "PIPELINE_BROKER": cluster.ssl_bootstrap,
        "PIPELINE_KAFKA_SECURITY_PROTOCOL": "SSL",
        "PIPELINE_KAFKA_SSL_CAFILE": str(tls / "ca.pem"),
        "PIPELINE_KAFKA_SSL_CERTFILE": str(tls / f"{name}.pem"),
        "PIPELINE_KAFKA_SSL_KEYFILE": str(tls / f"{name}.key"),
    }


def password_file(path: Path, password: str) -> Path:
    """The password alone, newline-terminated, readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(password + "\n")
    return path


def worker_on(env: dict[str, str], tmp_path: Path, app_id: str, **extra: str) -> WorkerProcess:
    """A worker of its own app id (consumer group, changelogs) and data directory."""
    return WorkerProcess(
        env["PIPELINE_BROKER"], tmp_path / app_id, env={**env, "PIPELINE_APP_ID": app_id, **extra}
    )


def full_log(worker: WorkerProcess) -> str:
    assert worker.log_path is not None
    return worker.log_path.read_text(errors="replace")


def assert_no_secret(worker: WorkerProcess, secret_values: list[str]) -> None:
    """No line of the worker's log (every process of it: stream worker, ingest) holds a secret."""
    for number, line in enumerate(full_log(worker).splitlines(), 1):
        for secret in secret_values:
            assert secret not in line, f"a password in line {number} of {worker.log_path}"


def ground_truth_run(worker: WorkerProcess, seed: int, subscribers: int = 900) -> tuple[Traffic, dict]:
    """Send generated traffic (10 % redeliveries, late and out-of-order events) through the
    worker's POST /events; every count, window and rate must equal the truth."""
    traffic = generate(seed=seed, subscribers=subscribers)
    accepted = asyncio.run(send(worker.url, traffic.events, batch=250))
    assert accepted == len(traffic.events)
    docs = wait_for_counts([worker.url], traffic, timeout=180)
    assert_exact(docs, traffic)
    return traffic, docs


# --- ground truth over each way in --------------------------------------------------------------


GROUND_TRUTH_CASES = {
    # name: (seed, the variables from the cluster and the test's folder)
    "sasl-ssl-scram-sha-512-password-file": (
        301,
        lambda c, d: sasl_env(c, "SCRAM-SHA-512", password_file=c.tls_dir / "worker.password"),
    ),
    "sasl-ssl-scram-sha-256": (302, lambda c, d: sasl_env(c, "SCRAM-SHA-256")),
    "sasl-ssl-plain-password-file": (
        303,
        lambda c, d: sasl_env(c, "PLAIN", password_file=password_file(d / "plain.pw", c.passwords["worker"])),
    ),
    "ssl-mutual-tls": (304, lambda c, d: mtls_env(c)),
}


@pytest.mark.parametrize("case", list(GROUND_TRUTH_CASES))
def test_ground_truth_through_a_secured_kafka(
    secure: KafkaCluster, tmp_path: Path, started: list[WorkerProcess], case: str
) -> None:
    seed, make_env = GROUND_TRUTH_CASES[case]
    env = make_env(secure, tmp_path)
    if "password-file" in case:  # the password only in a file
        assert "PIPELINE_KAFKA_SASL_PASSWORD" not in env and "PIPELINE_KAFKA_SASL_PASSWORD_FILE" in env
    worker = worker_on(env, tmp_path, f"funnel-{case}")
    started.append(worker)
    worker.start()
    traffic, docs = ground_truth_run(worker, seed)
    assert worker.process is not None and worker.process.poll() is None
    if env["PIPELINE_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL":  # aiokafka logs whom it authenticated as
        assert f"Authenticated as worker via {env['PIPELINE_KAFKA_SASL_MECHANISM']}" in full_log(worker)
    assert_no_secret(worker, list(secure.passwords.values()))
    report(f"secured Kafka, {case}", traffic, len(traffic.events), docs)


# --- 3 nodes, SIGKILL of the node leading most raw partitions -----------------------------------


@pytest.mark.slow
def test_three_secure_nodes_leader_sigkill_exact(tmp_path: Path, started: list[WorkerProcess]) -> None:
    """SASL_SSL with SCRAM-SHA-512 (password from a file) on 3 nodes, replication 3; while events
    stream in, SIGKILL of the node leading most raw partitions, then its restart."""
    with KafkaCluster(tmp_path / "kafka", brokers=3, security="secure") as cluster:
        env = sasl_env(cluster, "SCRAM-SHA-512", password_file=cluster.tls_dir / "worker.password")
        worker = worker_on(env, tmp_path, "funnel", PIPELINE_REPLICATION="3")
        started.append(worker)
        worker.start()
        assert {len(replicas) for _, replicas, _ in cluster.partitions(RAW_TOPICS).values()} == {3}
        traffic = generate(seed=305, subscribers=2000)
        sender = Sender(worker.url, traffic.events, stops=2)
        sender.start()
        sender.wait_stop(0)
        leaders = cluster.leader_counts(RAW_TOPICS)
        victim = leaders.most_common(1)[0][0]
        cluster.kill(victim)
        sender.resume(0)
        sender.wait_stop(1)
        cluster.start_node(victim)
        cluster.wait_in_sync()
        sender.resume(1)
        sender.join(600)
        assert sender.error is None and not sender.is_alive(), sender.error
        assert sender.acknowledged == len(traffic.events)
        stored_twice = count_stored_copies(cluster.plaintext_bootstrap, traffic)
        docs = wait_for_counts([worker.url], traffic, timeout=300)
        assert_exact(docs, traffic)
        assert worker.process is not None and worker.process.poll() is None, worker.log()  # never restarted
        assert httpx.get(f"{worker.url}/health", timeout=10).status_code == 200
        assert_no_secret(worker, list(cluster.passwords.values()))
        print(f"SIGKILL node {victim}, leader of {leaders[victim]} of {sum(leaders.values())} raw partitions")
        name = "secured Kafka 3 nodes (SASL_SSL SCRAM-SHA-512): SIGKILL of the raw leader, restart"
        report(name, traffic, sender.acknowledged, docs, stored_twice)
        worker.stop()


# --- what a worker refuses to start with --------------------------------------------------------


def refused_start(worker: WorkerProcess, timeout: float = 90.0) -> str:
    """Start ``worker`` and check it never becomes healthy: it exits with status 1 within
    ``timeout``. Returns its whole log."""
    worker.start(wait=False)
    assert worker.process is not None
    deadline = time.monotonic() + timeout
    while worker.process.poll() is None and time.monotonic() < deadline:
        try:
            status = httpx.get(f"{worker.admin_url}/health", timeout=1).status_code
        except httpx.HTTPError:
            status = None
        assert status != 200, f"the worker became healthy:\n{worker.log()}"
        time.sleep(0.3)
    assert worker.process.poll() == 1, f"still running or another status after {timeout}s:\n{worker.log()}"
    return full_log(worker)


def cannot_start_line(log: str) -> str:
    lines = [line for line in log.splitlines() if "the worker cannot start:" in line]
    assert len(lines) == 1, log[-3000:]
    return lines[0]


def test_a_wrong_password_is_named_and_not_logged(
    secure: KafkaCluster, tmp_path: Path, started: list[WorkerProcess]
) -> None:
    wrong = secrets.token_urlsafe(18)
    env = sasl_env(secure, "SCRAM-SHA-512", password_file=password_file(tmp_path / "wrong.pw", wrong))
    worker = worker_on(env, tmp_path, "funnel-wrong-password")
    started.append(worker)
    line = cannot_start_line(refused_start(worker))
    assert f"Kafka at {secure.bootstrap} (SASL_SSL, SCRAM-SHA-512 as 'worker'" in line, line
    assert "authentication failed (SCRAM-SHA-512 as user 'worker'): wrong user name or password" in line
    assert_no_secret(worker, [wrong, *secure.passwords.values()])


def test_an_untrusted_ca_is_named(secure: KafkaCluster, tmp_path: Path, started: list[WorkerProcess]) -> None:
    env = sasl_env(secure, "SCRAM-SHA-512", cafile="other-ca.pem")  # the right password, inline
    worker = worker_on(env, tmp_path, "funnel-untrusted-ca")
    started.append(worker)
    line = cannot_start_line(refused_start(worker))
    assert "the broker's certificate is not trusted" in line, line
    assert str(secure.tls_dir / "other-ca.pem") in line
    assert_no_secret(worker, list(secure.passwords.values()))


def test_a_principal_without_acls_is_refused_naming_operation_and_resource(
    secure: KafkaCluster, tmp_path: Path, started: list[WorkerProcess]
) -> None:
    """``User:CN=other`` (mutual TLS, a certificate of the right CA) holds no ACL."""
    worker = worker_on(mtls_env(secure, "other-client"), tmp_path, "funnel-no-acls")
    started.append(worker)
    line = cannot_start_line(refused_start(worker))
    assert re.search(r"missing ACL: Create on topic funnel[.-]\S+", line), line
    assert_no_secret(worker, list(secure.passwords.values()))


def test_a_host_name_mismatch_is_named(tmp_path: Path, started: list[WorkerProcess]) -> None:
    """The brokers' certificate is for ``wrong.example`` only; the CA is the right one."""
    with KafkaCluster(tmp_path / "kafka", security="secure", server_san=("DNS:wrong.example",)) as cluster:
        worker = worker_on(sasl_env(cluster, "SCRAM-SHA-512"), tmp_path, "funnel")
        started.append(worker)
        line = cannot_start_line(refused_start(worker))
        assert "the broker's certificate does not match the host name it was reached by" in line, line
        assert_no_secret(worker, list(cluster.passwords.values()))


def test_a_mechanism_the_listener_does_not_enable_is_named(
    tmp_path: Path, started: list[WorkerProcess]
) -> None:
    """The SASL_SSL listener enables SCRAM-SHA-512 only; the worker asks for SCRAM-SHA-256 with the
    user's right password."""
    only_512 = {"listener.name.sasl_ssl.sasl.enabled.mechanisms": "SCRAM-SHA-512"}
    with KafkaCluster(tmp_path / "kafka", security="secure", config=only_512) as cluster:
        worker = worker_on(sasl_env(cluster, "SCRAM-SHA-256"), tmp_path, "funnel")
        started.append(worker)
        line = cannot_start_line(refused_start(worker))
        assert "the broker does not enable SASL mechanism SCRAM-SHA-256 on this listener" in line, line
        assert_no_secret(worker, list(cluster.passwords.values()))


# --- least privilege ----------------------------------------------------------------------------


async def group_offsets(bootstrap: str, group: str, topics: list[str]) -> tuple[dict, dict]:
    """(committed offsets of ``group``, end offsets) of every partition of ``topics``, read as the
    super user of the internal listener."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        found = await admin.describe_topics(topics)
        tps = [TopicPartition(doc["topic"], p["partition"]) for doc in found for p in doc["partitions"]]
        ends = await consumer.end_offsets(tps)
        committed = {tp: meta.offset for tp, meta in (await admin.list_consumer_group_offsets(group)).items()}
        return {tp: committed.get(tp, 0) for tp in tps}, ends
    finally:
        await consumer.stop()
        await admin.close()


def wait_committed_at_end(bootstrap: str, group: str, timeout: float = 60.0) -> dict:
    """Until the group's committed offset of every raw and partials partition is its end."""
    topics = [*RAW_TOPICS, PARTIALS_TOPIC]
    deadline = time.monotonic() + timeout
    while True:
        committed, ends = asyncio.run(group_offsets(bootstrap, group, topics))
        behind = {
            f"{tp.topic}/{tp.partition}": (committed[tp], end)
            for tp, end in ends.items()
            if committed[tp] != end
        }
        if not behind:
            return ends
        assert time.monotonic() < deadline, f"committed offsets not at the end (committed, end): {behind}"
        time.sleep(1)


def denials(cluster: KafkaCluster, principal: str) -> list[str]:
    """What the brokers' authorizers refused ``principal`` so far (Kafka logs every denial at
    INFO to ``kafka.authorizer.logger``; a topic left out of a metadata answer is not logged)."""
    found = []
    for node in cluster.nodes:
        path = node.directory / "server.log"
        if path.exists():
            text = path.read_text(errors="replace")
            found += [line for line in text.splitlines() if f"Principal = {principal} is Denied" in line]
    return found


def raw_lag(worker: WorkerProcess) -> dict[tuple[str, str], float]:
    return {
        (labels["topic"], labels["partition"]): value
        for (name, tags), value in scrape(worker.admin_url).items()
        if name == "pipeline_consumer_lag" and (labels := dict(tags))["topic"] in RAW_TOPICS
    }


# the version the worker is tested on everywhere; the other tested version (3.9.1) passed the
# same test too when it was written, left out of the suite for its running time
@pytest.mark.parametrize("version", [KAFKA_VERSION])
def test_a_principal_with_exactly_the_documented_acls(
    tmp_path: Path, started: list[WorkerProcess], version: str
) -> None:
    """``User:limited`` holds exactly the ACLs of deploy/README.md's table for a worker on Kafka
    3.0 or later (nothing on the cluster) on a fresh secure node: refused before they are
    granted, then it creates every topic itself, consumes, produces, commits and counts exactly;
    stopped and started again it counts nothing twice and its raw lag is 0. With another app id
    (whose group and changelogs the ACLs do not name) it is refused, naming the topic."""
    with KafkaCluster(tmp_path / "kafka", version=version, security="secure", acls=True) as cluster:
        limited_pw = password_file(tmp_path / "limited.pw", cluster.passwords["limited"])
        env = sasl_env(cluster, "SCRAM-SHA-512", "limited", password_file=limited_pw)
        all_passwords = list(cluster.passwords.values())

        before = worker_on(env, tmp_path, "funnel")  # no ACL yet
        before.data_dir = tmp_path / "before"
        started.append(before)
        line = cannot_start_line(refused_start(before))
        assert re.search(r"missing ACL: Create on topic funnel[.-]\S+", line), line
        assert_no_secret(before, all_passwords)
        assert not [topic for topic, _ in cluster.partitions() if topic.startswith("funnel")]

        assert README_WORKER_ACLS == WORKER_GRANTS  # what `pipeline kafka --secure --acls` grants
        for resource, name, pattern, operations in README_WORKER_ACLS:
            cluster.grant("User:limited", resource, name, pattern, operations)

        refused_before = len(denials(cluster, "User:limited"))
        assert refused_before > 0  # the refusal above is in the log: the check below can see one
        worker = worker_on(env, tmp_path, "funnel")
        started.append(worker)
        worker.start()
        topics = {topic for topic, _ in cluster.partitions()}
        for topic in (*RAW_TOPICS, PARTIALS_TOPIC, "funnel.deadletter", "funnel-__assignor-__leader"):
            assert topic in topics, topic
        assert {
            "funnel-subscribers-changelog",
            "funnel-partials-changelog",
            "funnel-campaigns-changelog",
        } <= topics

        traffic, docs = ground_truth_run(worker, seed=306)
        ends = wait_committed_at_end(cluster.plaintext_bootstrap, "funnel")
        assert sum(ends[TopicPartition(t, p)] for t, p in cluster.partitions(RAW_TOPICS)) > 0

        worker.stop()
        assert worker.process is not None and worker.process.returncode == 0, worker.log()
        assert wait_committed_at_end(cluster.plaintext_bootstrap, "funnel", timeout=5) == ends

        worker.start()  # same port, same data directory, same group
        again = wait_for_counts([worker.url], traffic, timeout=60)
        assert_exact(again, traffic)
        for key, doc in docs.items():  # nothing counted twice, nothing lost, in any window
            for part in ("counts", "duplicates_dropped", "late_events", "window_history"):
                assert again[key][part] == doc[part], (key, part)
        raw_partitions = len(cluster.partitions(RAW_TOPICS))
        deadline = time.monotonic() + 60
        while not ((lag := raw_lag(worker)) and len(lag) == raw_partitions and set(lag.values()) == {0}):
            assert time.monotonic() < deadline, lag  # it owns every raw partition: each at 0
            time.sleep(0.5)
        assert wait_committed_at_end(cluster.plaintext_bootstrap, "funnel", timeout=5) == ends
        assert_no_secret(worker, all_passwords)
        assert "Authenticated as limited via SCRAM-SHA-512" in full_log(worker)
        name = f"secured Kafka {version}, least-privilege principal, restarted"
        report(name, traffic, len(traffic.events), docs)
        worker.stop()
        assert worker.process.returncode == 0, worker.log()
        # through two starts, a ground-truth run, commits and two stops, the brokers refused it nothing
        assert denials(cluster, "User:limited")[refused_before:] == []

        other = worker_on(env, tmp_path, "other-app")
        started.append(other)
        line = cannot_start_line(refused_start(other))
        assert re.search(r"missing ACL: Create on topic other-app-\S+", line), line
        assert_no_secret(other, all_passwords)
