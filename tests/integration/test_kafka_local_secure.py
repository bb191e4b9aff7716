"""A secured Apache Kafka from ``pipeline kafka --secure`` (``KafkaCluster(security="secure")``),
reached with plain aiokafka clients: SASL_SSL with PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512, mutual
TLS, what the brokers refuse (a wrong password, an untrusted client certificate, none) and what a
client refuses (another CA, a certificate for another name), ACLs, and a 3-node cluster."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAuthorizationFailedError
from aiokafka.helpers import create_ssl_context
from conftest import ROOT
from cryptography import x509
from helpers import alive, children

from pipeline.kafka.local import USERS, KafkaCluster
from pipeline.kafka.tansu import free_port

TOPIC_AUTHORIZATION_FAILED = 29


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    """One node, ACLs on; the worker's two principals may do anything with topics ``t.*``."""
    with KafkaCluster(tmp_path_factory.mktemp("secure") / "kafka", security="secure", acls=True) as cluster:
        for principal in ("User:worker", "User:CN=worker"):
            cluster.grant(principal, "topic", "t.", "prefixed", ["all"])
        yield cluster


def sasl(
    cluster: KafkaCluster, mechanism: str, user: str = "worker", password: str | None = None
) -> dict[str, Any]:
    return {
        "bootstrap_servers": cluster.bootstrap,
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": user,
        "sasl_plain_password": cluster.passwords[user] if password is None else password,
        "ssl_context": create_ssl_context(cafile=cluster.tls_dir / "ca.pem"),
    }


def mtls(cluster: KafkaCluster, name: str = "client", cafile: str = "ca.pem") -> dict[str, Any]:
    tls = cluster.tls_dir
    context = create_ssl_context(
        cafile=tls / cafile, certfile=tls / f"{name}.pem", keyfile=tls / f"{name}.key"
    )
    return {"bootstrap_servers": cluster.ssl_bootstrap, "security_protocol": "SSL", "ssl_context": context}


async def create_topic(client: dict[str, Any], topic: str, partitions: int = 1, replicas: int = 1) -> int:
    """The topic's error code in the CreateTopics response (0: created)."""
    admin = AIOKafkaAdminClient(request_timeout_ms=10_000, **client)
    await admin.start()
    try:
        response = await admin.create_topics([NewTopic(topic, partitions, replicas)])
        return next(error for name, error, *_ in response.topic_errors if name == topic)
    finally:
        await admin.close()


async def round_trip(client: dict[str, Any], topic: str, count: int = 3, replicas: int = 1) -> None:
    """Create ``topic`` with these credentials, produce ``count`` records (acks=all), read them back."""
    assert await create_topic(client, topic, replicas=replicas) == 0
    sent = [f"{topic}-{n}".encode() for n in range(count)]
    producer = AIOKafkaProducer(acks="all", request_timeout_ms=10_000, **client)
    await producer.start()
    try:
        for value in sent:
            await producer.send_and_wait(topic, value)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, auto_offset_reset="earliest", **client)
    await consumer.start()
    try:
        received: list[bytes] = []
        async with asyncio.timeout(30):
            while len(received) < count:
                batch = await consumer.getmany(timeout_ms=1000)
                received += [record.value for records in batch.values() for record in records]
        assert received == sent
    finally:
        await consumer.stop()


async def refused(client: dict[str, Any], caplog: pytest.LogCaptureFixture) -> str:
    """Why a producer could not connect, as aiokafka logged it."""
    caplog.clear()
    producer = AIOKafkaProducer(request_timeout_ms=5_000, **client)
    with caplog.at_level(logging.ERROR, logger="aiokafka"), pytest.raises(KafkaConnectionError):
        await producer.start()
    await producer.stop()
    return caplog.text


def test_files_users_and_listeners(secure: KafkaCluster) -> None:
    tls = secure.tls_dir
    assert json.loads((tls / "users.json").read_text()) == secure.passwords
    assert set(secure.passwords) == set(USERS)
    assert (tls / "worker.password").read_text().strip() == secure.passwords["worker"]
    for secret in (
        "users.json",
        "worker.password",
        "ca.key",
        "server.key",
        "server-keystore.pem",
        "client.key",
    ):
        assert stat.S_IMODE((tls / secret).stat().st_mode) == 0o600, secret
    assert stat.S_IMODE((secure.node(1).directory / "server.properties").stat().st_mode) == 0o600
    server = x509.load_pem_x509_certificate((tls / "server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    client = x509.load_pem_x509_certificate((tls / "client.pem").read_bytes())
    assert client.subject.rfc4514_string() == "CN=worker"
    node = secure.node(1)
    assert secure.bootstrap == secure.address == f"127.0.0.1:{node.sasl_port}"
    assert secure.ssl_bootstrap == f"127.0.0.1:{node.ssl_port}"
    assert secure.plaintext_bootstrap == f"127.0.0.1:{node.port}"
    assert secure.broker_ids() == {1}  # the helpers go through the internal PLAINTEXT listener


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_sasl_ssl_round_trip(secure: KafkaCluster, mechanism: str) -> None:
    await round_trip(sasl(secure, mechanism), f"t.{mechanism.lower()}")


async def test_mutual_tls_round_trip_as_cn_worker(secure: KafkaCluster) -> None:
    await round_trip(mtls(secure), "t.mtls")
    producer = AIOKafkaProducer(**mtls(secure, "other-client"))  # User:CN=other: no ACL
    await producer.start()
    try:
        with pytest.raises(TopicAuthorizationFailedError):
            await producer.send_and_wait("t.mtls", b"denied")
    finally:
        await producer.stop()


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-512"])
async def test_a_wrong_password_is_refused(
    secure: KafkaCluster, mechanism: str, caplog: pytest.LogCaptureFixture
) -> None:
    why = await refused(sasl(secure, mechanism, password=secure.passwords["worker"] + "x"), caplog)
    assert "SaslAuthenticationFailed" in why


async def test_a_client_trusting_another_ca_refuses_the_brokers(
    secure: KafkaCluster, caplog: pytest.LogCaptureFixture
) -> None:
    client = sasl(secure, "SCRAM-SHA-512")
    client["ssl_context"] = create_ssl_context(cafile=secure.tls_dir / "other-ca.pem")
    assert "CERTIFICATE_VERIFY_FAILED" in await refused(client, caplog)


async def test_the_ssl_listener_refuses_clients_without_a_trusted_certificate(
    secure: KafkaCluster, caplog: pytest.LogCaptureFixture
) -> None:
    untrusted = mtls(secure, "untrusted-client")  # CN=worker, signed by the other CA
    await refused(untrusted, caplog)
    none = mtls(secure)
    none["ssl_context"] = create_ssl_context(cafile=secure.tls_dir / "ca.pem")
    await refused(none, caplog)


async def test_limited_cannot_create_a_topic_until_granted(secure: KafkaCluster) -> None:
    limited = sasl(secure, "SCRAM-SHA-256", "limited")
    assert await create_topic(limited, "limited.a") == TOPIC_AUTHORIZATION_FAILED
    secure.grant("User:limited", "topic", "limited.", "prefixed", ["create"])
    assert await create_topic(limited, "limited.a") == 0
    assert await create_topic(limited, "other.a") == TOPIC_AUTHORIZATION_FAILED
    assert ("limited.a", 0) in secure.partitions(["limited.a"])


async def test_a_certificate_for_another_name_fails_hostname_verification(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``server_san`` without 127.0.0.1: the CA verifies, the name does not (and no ACLs: any
    authenticated user may do anything)."""
    with KafkaCluster(tmp_path / "kafka", security="secure", server_san=("DNS:wrong.example",)) as cluster:
        client = sasl(cluster, "SCRAM-SHA-512")
        assert "mismatch" in await refused(client, caplog)
        unchecked = create_ssl_context(cafile=cluster.tls_dir / "ca.pem")
        unchecked.check_hostname = False
        assert unchecked.verify_mode == ssl.CERT_REQUIRED
        await round_trip({**client, "ssl_context": unchecked}, "any.topic")


def client_from_env(env: dict[str, str]) -> dict[str, Any]:
    """aiokafka arguments from PIPELINE_* variables as ``pipeline kafka --secure`` prints them."""
    context = create_ssl_context(
        cafile=env["PIPELINE_KAFKA_SSL_CAFILE"],
        certfile=env.get("PIPELINE_KAFKA_SSL_CERTFILE"),
        keyfile=env.get("PIPELINE_KAFKA_SSL_KEYFILE"),
    )
    client = {
        "bootstrap_servers": env["PIPELINE_BROKER"],
        "security_protocol": env["PIPELINE_KAFKA_SECURITY_PROTOCOL"],
        "ssl_context": context,
    }
    if "PIPELINE_KAFKA_SASL_MECHANISM" in env:
        password_file = Path(env["PIPELINE_KAFKA_SASL_PASSWORD_FILE"])
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        client["sasl_mechanism"] = env["PIPELINE_KAFKA_SASL_MECHANISM"]
        client["sasl_plain_username"] = env["PIPELINE_KAFKA_SASL_USERNAME"]
        client["sasl_plain_password"] = password_file.read_text().strip()
    return client


def test_pipeline_kafka_secure_prints_what_a_worker_needs(tmp_path: Path) -> None:
    """``pipeline kafka --secure --acls``: the printed variables work as printed, for SCRAM-SHA-512
    with the password file and for mutual TLS (the commented block), on topics the worker was
    granted (prefix ``funnel``)."""
    port = free_port()
    out = tmp_path / "kafka.out"
    command = [sys.executable, "-m", "pipeline", "kafka", "--secure", "--acls", "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--dir", str(tmp_path / "kafka")],
        cwd=ROOT,
        stdout=open(out, "ab"),
        stderr=subprocess.STDOUT,
    )
    jvms: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while "Ctrl-C stops it" not in out.read_text():
            assert process.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.3)
        jvms = children(process.pid)
        lines = out.read_text().splitlines()
        worker = dict(line.split("=", 1) for line in lines if line.startswith("PIPELINE_"))
        alternative = dict(
            line.removeprefix("#").strip().split("=", 1) for line in lines if line.startswith("#   PIPELINE_")
        )
        assert worker["PIPELINE_BROKER"] == f"127.0.0.1:{port}"
        assert worker["PIPELINE_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
        assert worker["PIPELINE_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
        assert worker["PIPELINE_KAFKA_SASL_USERNAME"] == "worker"
        assert alternative["PIPELINE_BROKER"] == f"127.0.0.1:{port + 200}"
        assert alternative["PIPELINE_KAFKA_SECURITY_PROTOCOL"] == "SSL"

        async def both() -> None:
            await round_trip(client_from_env(worker), "funnel.cli.sasl")
            await round_trip(client_from_env(alternative), "funnel.cli.mtls")

        asyncio.run(both())
        process.send_signal(signal.SIGTERM)
        assert process.wait(90) == 0, out.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in jvms:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
