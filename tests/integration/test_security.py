"""Secure by default when exposed, through real sockets and worker processes.

A worker bound beyond loopback refuses to start without its secrets; with them, nothing
unauthenticated reaches a topic, admin paths stay off the public port, secrets can come from
files, TLS works, and a client that trickles its request head is cut off. ``pipeline run``
keeps the salt it generated across a restart, so unique counts stay exact.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from conftest import ROOT, WorkerProcess
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from provider_helpers import ecdsa_key, private_pem, sendgrid_public_key

from pipeline.http.security import (
    MIN_SALT_LENGTH,
    SALT_FILE_NAME,
    check_listeners,
    exposure_problems,
    is_loopback,
    provider_credentials,
)
from pipeline.ingest.identity import pseudonymise
from pipeline.ingest.providers import ADAPTERS
from pipeline.kafka.tansu import EmbeddedBroker, free_port, true_end_offsets
from pipeline.kafka.topics import DEAD_LETTER_TOPIC, RAW_TOPICS
from pipeline.settings import Settings, SettingsError

SALT = "0123456789abcdef" * 4  # 64 characters
TOKEN = "ingest-token-for-the-test-7f3a9c"
ADMIN_PATHS = ("/health", "/metrics", "/campaigns", "/campaigns/email/c1")


# --------------------------------------------------------------------------- helpers


def secure_env() -> dict[str, str]:
    """Every setting an exposed worker needs, as plain variables."""
    env = {"PIPELINE_ID_SALT": SALT, "PIPELINE_INGEST_TOKEN": TOKEN}
    for name, variables in provider_credentials().items():
        env[variables[0]] = f"credential-of-{name}"
    return env


def run_refused(env: dict[str, str], host: str = "0.0.0.0") -> subprocess.Popen[str]:
    """A worker that must refuse before it touches the broker (there is none at that address)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "worker", "--loglevel", "warning"],
        env={**base, "PIPELINE_BROKER": "127.0.0.1:9", "PIPELINE_HOST": host, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ecdsa_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_text(private_pem(key))
    return cert_path, key_path


def secret_file(directory: Path, name: str, value: str) -> str:
    path = directory / name
    path.write_text(value + "\n")  # as `echo value > file` writes it
    path.chmod(0o600)
    return str(path)


def topic_contents(bootstrap: str, topics: tuple[str, ...]) -> tuple[dict[str, int], bytes]:
    """(end offset reported per topic, every record value joined) of the raw and dead-letter topics.

    The reported end of an empty partition is 0 on Tansu too, so a sum of 0 means nothing was produced.
    """

    async def read() -> tuple[dict[str, int], bytes]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            await consumer.topics()
            tps = [
                TopicPartition(topic, p)
                for topic in topics
                for p in sorted(consumer.partitions_for_topic(topic) or ())
            ]
            reported = await consumer.end_offsets(tps)
            ends = await true_end_offsets(bootstrap, dict(reported))
            per_topic = {topic: sum(reported[tp] for tp in tps if tp.topic == topic) for topic in topics}
            values: list[bytes] = []
            pending = {tp for tp in tps if ends[tp] > 0}
            if pending:
                consumer.assign(sorted(pending))
                await consumer.seek_to_beginning(*pending)
                deadline = time.monotonic() + 30
                while pending and time.monotonic() < deadline:
                    for tp, records in (await consumer.getmany(*pending, timeout_ms=500)).items():
                        values += [r.value for r in records if r.value]
                        if records and records[-1].offset + 1 >= ends[tp]:
                            pending.discard(tp)
                assert not pending, f"could not read to the end of {pending}"
            return per_topic, b"\n".join(values)
        finally:
            await consumer.stop()

    return asyncio.run(read())


def email_event(n: int, address: str, kind: str, campaign: str = "sec-c1") -> dict:
    return {
        "event_id": f"{campaign}-{kind}-{n}",
        "type": kind,
        "channel": "email",
        "campaign_id": campaign,
        "subscriber_id": address,
        # a click a minute after the delivery: a human's, not a link scanner's
        "timestamp": time.time() - (60 if kind == "click" else 120),
    }


def slow_header_client_is_cut_off(port: int, tls: ssl.SSLContext | None = None) -> bool:
    """Open a connection, send a request line, then one header byte at a time.

    True if the server closed the connection before the head was complete (the trickle is
    bounded: 240 bytes, a quarter-second apart, never a complete head).
    """
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock = tls.wrap_socket(raw, server_hostname="127.0.0.1") if tls else raw
    try:
        sock.sendall(b"POST /events HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        sock.settimeout(0.25)
        for _ in range(240):
            try:
                if sock.recv(4096) == b"":
                    return True  # closed by the server
            except TimeoutError:
                pass
            except (ConnectionError, ssl.SSLError):
                return True
            try:
                sock.sendall(b"a")
            except (ConnectionError, ssl.SSLError):
                return True
        return False
    finally:
        sock.close()


# --------------------------------------------------------------------------- pure functions


def test_loopback_is_told_apart_from_every_other_bind() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "::ffff:127.0.0.1"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "", "192.0.2.10", "10.0.0.1", "fd00::2"):
        assert not is_loopback(host), host


def test_each_endpoint_is_satisfied_by_credentials_or_by_name() -> None:
    credentials = secure_env()
    complete = Settings(host="0.0.0.0", id_salt=SALT.encode(), ingest_token=TOKEN, env=credentials)
    assert exposure_problems(complete) == []
    names = ("events", *provider_credentials())
    # explicitly opened by name
    opened = Settings(host="0.0.0.0", id_salt=SALT.encode(), allow_unauthenticated=frozenset(names))
    assert exposure_problems(opened) == []
    # explicitly switched off: only what is served needs credentials
    only_events = Settings(
        host="0.0.0.0", id_salt=SALT.encode(), ingest_token=TOKEN, endpoints=frozenset({"events"})
    )
    assert exposure_problems(only_events) == []
    check_listeners(only_events)
    # a user name alone is no secret
    postmark_user = Settings(
        host="0.0.0.0",
        id_salt=SALT.encode(),
        ingest_token=TOKEN,
        endpoints=frozenset({"events", "postmark"}),
        env={"POSTMARK_WEBHOOK_USER": "pm"},
    )
    assert [p.split(":")[0] for p in exposure_problems(postmark_user)] == ["POST /webhooks/postmark"]
    # a salt too short to be a secret
    short = Settings(
        host="0.0.0.0", id_salt=b"x" * (MIN_SALT_LENGTH - 1), allow_unauthenticated=frozenset(names)
    )
    assert [p.split(" ")[0] for p in exposure_problems(short)] == ["PIPELINE_ID_SALT"]
    # on loopback nothing is demanded
    check_listeners(Settings())


def test_settings_refuse_unknown_endpoint_names_and_broken_secret_files(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="unknown endpoint sendgird"):
        Settings.from_env({"PIPELINE_ENDPOINTS": "events,sendgird"})
    with pytest.raises(SettingsError, match="unknown endpoint all"):
        Settings.from_env({"PIPELINE_ALLOW_UNAUTHENTICATED": "all"})
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(
            {
                "PIPELINE_ID_SALT_FILE": str(empty),
                "PIPELINE_INGEST_TOKEN_FILE": str(tmp_path / "absent"),
                "MAILGUN_WEBHOOK_SIGNING_KEY": "k",
                "MAILGUN_WEBHOOK_SIGNING_KEY_FILE": str(empty),
            }
        )
    message = str(raised.value)
    assert f"PIPELINE_ID_SALT_FILE={empty} is empty" in message
    assert "PIPELINE_INGEST_TOKEN_FILE=" in message and "cannot be read" in message
    assert "MAILGUN_WEBHOOK_SIGNING_KEY and MAILGUN_WEBHOOK_SIGNING_KEY_FILE are both set" in message
    # secrets stay out of a Settings' repr (and so out of any log line that prints one)
    settings = Settings.from_env({"PIPELINE_ID_SALT": SALT, "PIPELINE_INGEST_TOKEN": TOKEN})
    assert SALT not in repr(settings) and TOKEN not in repr(settings)


# --------------------------------------------------------------------------- refused starts


def test_exposed_worker_refuses_to_start_naming_every_missing_setting(tmp_path: Path) -> None:
    complete = secure_env()
    cases: dict[str, tuple[dict[str, str], str]] = {
        "nothing set": ({}, "0.0.0.0"),
        "salt missing": ({k: v for k, v in complete.items() if k != "PIPELINE_ID_SALT"}, "0.0.0.0"),
        "salt too short": ({**complete, "PIPELINE_ID_SALT": "short-salt"}, "0.0.0.0"),
        "token missing": ({k: v for k, v in complete.items() if k != "PIPELINE_INGEST_TOKEN"}, "0.0.0.0"),
        "every interface, IPv6": ({}, "::"),
    }
    for name, variables in provider_credentials().items():
        cases[f"{name} missing"] = ({k: v for k, v in complete.items() if k != variables[0]}, "0.0.0.0")
    local = sorted(
        {
            info[4][0]
            for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
            if not ipaddress.ip_address(info[4][0]).is_loopback
        }
    )
    if local:  # another address of this machine, not a wildcard
        cases["a local interface address"] = ({}, local[0])
    running = {case: run_refused(env, host) for case, (env, host) in cases.items()}
    outputs = {}
    for case, proc in running.items():
        out, err = proc.communicate(timeout=120)
        outputs[case] = (proc.returncode, out + err)
    for case, (code, output) in outputs.items():
        assert code == 2, (case, output)
        assert output.count("refusing to serve on") == 1, (case, output)  # one message
        assert "Traceback" not in output, (case, output)

    def missing(case: str) -> list[str]:
        return [line for line in outputs[case][1].splitlines() if line.startswith("  - ")]

    everything = missing("nothing set")
    assert len(everything) == 1 + 1 + len(provider_credentials())
    assert any("PIPELINE_ID_SALT (or PIPELINE_ID_SALT_FILE) is not set" in line for line in everything)
    assert any("POST /events: set PIPELINE_INGEST_TOKEN" in line for line in everything)
    for name, variables in provider_credentials().items():
        assert any(
            line.startswith(f"  - POST /webhooks/{name}: set {variables[0]}") for line in everything
        ), name
    assert missing("every interface, IPv6") == everything
    if "a local interface address" in outputs:
        assert missing("a local interface address") == everything
    assert len(missing("salt missing")) == 1 and "PIPELINE_ID_SALT" in missing("salt missing")[0]
    assert len(missing("salt too short")) == 1 and "has 10 characters" in missing("salt too short")[0]
    assert [line[4:19] for line in missing("token missing")] == ["POST /events: s"]
    for name in provider_credentials():
        lines = missing(f"{name} missing")
        assert len(lines) == 1 and lines[0].startswith(f"  - POST /webhooks/{name}:"), (name, lines)
    # the salt and the token given are never printed
    for _, output in outputs.values():
        assert SALT not in output and TOKEN not in output


# --------------------------------------------------------------------------- an exposed worker


def test_exposed_worker_with_its_secrets(broker: EmbeddedBroker, tmp_path: Path, workers) -> None:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    sg_key = ecdsa_key()
    sg_public = sendgrid_public_key(sg_key)
    sg_private = private_pem(sg_key)
    mailgun_key = "mailgun-signing-key-of-the-test"
    cert, key = self_signed(tmp_path)
    env = {
        "PIPELINE_HOST": "0.0.0.0",
        "PIPELINE_ADMIN_HOST": "127.0.0.1",
        "PIPELINE_TLS_CERT": str(cert),
        "PIPELINE_TLS_KEY": str(key),
        "PIPELINE_HEADER_TIMEOUT": "2s",
        "PIPELINE_ENDPOINTS": "events,sendgrid,mailgun",
        # secrets as files, the way Kubernetes and compose mount them
        "PIPELINE_ID_SALT_FILE": secret_file(secrets_dir, "id-salt", SALT),
        "PIPELINE_INGEST_TOKEN_FILE": secret_file(secrets_dir, "ingest-token", TOKEN),
        "SENDGRID_WEBHOOK_PUBLIC_KEY_FILE": secret_file(secrets_dir, "sendgrid", sg_public),
        "MAILGUN_WEBHOOK_SIGNING_KEY": mailgun_key,
    }
    worker = WorkerProcess(
        broker.address, tmp_path, env=env, admin_port=free_port(), unset=("PIPELINE_ID_SALT",), scheme="https"
    )
    workers.append(worker)
    worker.start()
    tls = ssl.create_default_context(cafile=str(cert))
    topics = (*RAW_TOPICS, DEAD_LETTER_TOPIC)
    with httpx.Client(verify=tls, timeout=30) as public, httpx.Client(timeout=30) as admin:
        # the public port: ingest and liveness only
        assert public.get(f"{worker.url}/livez").status_code == 200
        for path in ADMIN_PATHS:
            assert public.get(f"{worker.url}{path}").status_code == 404, path
        # the admin port: what is internal, and no ingest
        for path in ("/health", "/metrics", "/campaigns", "/livez"):
            assert admin.get(f"{worker.admin_url}{path}").status_code == 200, path
        assert admin.post(f"{worker.admin_url}/events", json=[]).status_code in (404, 405)
        with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port gets no answer
            httpx.get(f"http://127.0.0.1:{worker.port}/livez", timeout=10)

        # refused: no token, a wrong token, an unsigned and a badly signed webhook, a switched-off provider
        event = email_event(1, "ann@example.com", "send")
        assert public.post(f"{worker.url}/events", json=[event]).status_code == 401
        wrong = {"Authorization": "Bearer not-the-token"}
        assert public.post(f"{worker.url}/events", json=[event], headers=wrong).status_code == 401
        native = [{**email_event(2, "bob@example.com", "delivery"), "email": "bob@example.com"}]
        sg_env = {"SENDGRID_WEBHOOK_PUBLIC_KEY": sg_public, "SENDGRID_WEBHOOK_PRIVATE_KEY": sg_private}
        headers, body = ADAPTERS["sendgrid"].build_request(native, {}, time.time(), worker.url)  # unsigned
        resp = public.post(f"{worker.url}/webhooks/sendgrid", content=body, headers=headers)
        assert resp.status_code == 401, resp.text
        headers, body = ADAPTERS["mailgun"].build_request(
            native, {"MAILGUN_WEBHOOK_SIGNING_KEY": "somebody-else's-key"}, time.time(), worker.url
        )
        resp = public.post(f"{worker.url}/webhooks/mailgun", content=body, headers=headers)
        assert resp.status_code == 403, resp.text
        headers, body = ADAPTERS["postmark"].build_request(native, {}, time.time(), worker.url)
        assert (
            public.post(f"{worker.url}/webhooks/postmark", content=body, headers=headers).status_code == 404
        )
        ends, _ = topic_contents(broker.address, topics)
        assert sum(ends.values()) == 0, ends  # nothing produced, not even a dead letter

        # accepted: the token and the SendGrid key both came from files
        ok = {"Authorization": f"Bearer {TOKEN}"}
        resp = public.post(f"{worker.url}/events", json=[event], headers=ok)
        assert resp.status_code == 202 and resp.json()["accepted"] == 1, resp.text
        headers, body = ADAPTERS["sendgrid"].build_request(native, sg_env, time.time(), worker.url)
        resp = public.post(f"{worker.url}/webhooks/sendgrid", content=body, headers=headers)
        assert resp.status_code == 200 and resp.json()["accepted"] == 1, resp.text
        headers, body = ADAPTERS["mailgun"].build_request(
            native, {"MAILGUN_WEBHOOK_SIGNING_KEY": mailgun_key}, time.time(), worker.url
        )
        resp = public.post(f"{worker.url}/webhooks/mailgun", content=body, headers=headers)
        assert resp.status_code == 200, resp.text

    ends, values = topic_contents(broker.address, topics)
    assert ends[DEAD_LETTER_TOPIC] == 0
    for address in ("ann@example.com", "bob@example.com"):
        # hashed with the salt from the file, never with an empty key, never in clear
        assert pseudonymise(address, SALT.encode()).encode() in values, address
        assert pseudonymise(address, b"").encode() not in values, address
        assert address.encode() not in values, address
    # slow-loris: a request head trickled in is cut off, on both listeners
    assert slow_header_client_is_cut_off(worker.port, tls)
    assert slow_header_client_is_cut_off(worker.admin_port)  # type: ignore[arg-type]
    with httpx.Client(verify=tls, timeout=30) as public:  # and the worker still serves
        assert public.get(f"{worker.url}/livez").status_code == 200
    # no secret in the worker's output
    log = worker.log_path.read_text(errors="replace")  # type: ignore[union-attr]
    for secret in (SALT, TOKEN, mailgun_key, sg_public):
        assert secret not in log


# --------------------------------------------------------------------------- pipeline run's salt


def test_pipeline_run_keeps_its_salt_across_a_restart(
    broker: EmbeddedBroker, tmp_path: Path, workers
) -> None:
    run = WorkerProcess(broker.address, tmp_path, command=("run",), unset=("PIPELINE_ID_SALT",))
    workers.append(run)
    run.start()
    salt_file = tmp_path / f"state-{run.port}" / SALT_FILE_NAME
    assert stat.S_IMODE(salt_file.stat().st_mode) == 0o600
    salt = salt_file.read_text().strip()
    assert len(salt) >= MIN_SALT_LENGTH

    first = ["a", "b", "c", "d", "e"]
    second = ["c", "d", "e", "f", "g", "h"]  # three seen before the restart, three new
    events = [email_event(i, f"{who}@example.com", "delivery") for i, who in enumerate(first)]
    events += [email_event(10 + i, f"{who}@example.com", "click") for i, who in enumerate(first)]
    assert httpx.post(f"{run.url}/events", json=events, timeout=30).json()["accepted"] == 10

    def counts(want: dict[str, int]) -> dict[str, int]:
        deadline = time.monotonic() + 90
        while True:
            resp = httpx.get(f"{run.url}/campaigns/email/sec-c1", timeout=10)
            got = {k: v for k, v in resp.json()["counts"].items() if v} if resp.status_code == 200 else {}
            if got == want or time.monotonic() > deadline:
                return got
            time.sleep(0.5)

    before = {"delivery": 5, "click": 5, "unique_click": 5, "unique_open": 5, "unique_human_open": 5}
    assert counts(before) == before
    run.stop()
    assert run.process is not None and run.process.returncode == 0, run.log()
    run.start()
    assert salt_file.read_text().strip() == salt  # kept, not made anew
    events = [email_event(20 + i, f"{who}@example.com", "delivery") for i, who in enumerate(second[3:])]
    events += [email_event(30 + i, f"{who}@example.com", "click") for i, who in enumerate(second)]
    assert httpx.post(f"{run.url}/events", json=events, timeout=30).json()["accepted"] == 9
    # an address seen before the restart is the same subscriber after it: 8 unique clickers, not 11
    after = {"delivery": 8, "click": 11, "unique_click": 8, "unique_open": 8, "unique_human_open": 8}
    assert counts(after) == after
    _, values = topic_contents(broker.address, RAW_TOPICS)
    for who in set(first) | set(second):
        assert pseudonymise(f"{who}@example.com", salt.encode()).encode() in values, who
        assert pseudonymise(f"{who}@example.com", b"").encode() not in values, who
    assert salt not in run.log()
