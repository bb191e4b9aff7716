"""`--broker` / PIPELINE_BROKER: host:port, comma-separated lists and kafka:// URLs are accepted;
anything else stops the command at start with a message that says what is expected."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
from conftest import ROOT, WorkerProcess
from helpers import assert_exact, wait_for_counts

from pipeline.settings import Settings, SettingsError, broker_servers
from pipeline.simulation.traffic import generate, send


@pytest.mark.parametrize(
    ("url", "servers"),
    [
        ("k1:9092", "k1:9092"),
        ("k1:9092,k2:9093", "k1:9092,k2:9093"),
        (" k1:9092 , 10.0.0.2:9092 ", "k1:9092,10.0.0.2:9092"),
        ("kafka://k1:9092", "k1:9092"),
        ("kafka://k1:9092,k2:9092", "k1:9092,k2:9092"),
        ("KAFKA://k1:9092,kafka://k2:9092/", "k1:9092,k2:9092"),
        ("kafka-0.kafka.svc.cluster.local:9092", "kafka-0.kafka.svc.cluster.local:9092"),
    ],
)
def test_accepted_forms(url: str, servers: str) -> None:
    assert broker_servers(url) == servers
    assert Settings.from_env({"PIPELINE_BROKER": url}).broker == servers
    assert Settings().with_overrides(broker=url).broker == servers


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("kafka://kafka://k:9092", "kafka:// is given twice"),
        ("http://k:9092", "scheme 'http' is not supported"),
        ("sasl_ssl://user:secret@k:9093", "scheme 'sasl_ssl' is not supported"),
        ("k", "'k' is not host:port"),
        ("k:0", "'k:0' is not host:port"),
        ("k:70000", "'k:70000' is not host:port"),
        ("k:9092/topic", "'k:9092/topic' is not host:port"),
        ("k1:9092,,k2:9092", "an entry is empty"),
        ("user:secret@k:9092", "'<credentials>@k:9092' is not host:port"),
    ],
)
def test_refused_forms_say_what_is_expected(url: str, says: str) -> None:
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({"PIPELINE_BROKER": url})
    assert says in str(refused.value)
    assert "kafka://k1:9092,k2:9092" in str(refused.value)  # the accepted forms, by example
    assert "secret" not in str(refused.value)


@pytest.mark.parametrize("where", ["flag", "environment"])
def test_worker_refuses_a_bad_url_at_start(tmp_path, where) -> None:
    argv = [sys.executable, "-m", "pipeline", "worker", "--data-dir", str(tmp_path)]
    env = dict(os.environ)
    if where == "flag":
        argv += ["--broker", "http://127.0.0.1:9092"]
    else:
        env["PIPELINE_BROKER"] = "http://127.0.0.1:9092"
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "scheme 'http' is not supported" in done.stderr


def test_worker_with_a_kafka_url_runs(broker, tmp_path, workers) -> None:
    """Faust's own URL form, which used to become kafka://kafka://... and never bootstrap."""
    worker = WorkerProcess(
        f"kafka://{broker.address}", tmp_path, env={"PIPELINE_IDEMPOTENT_PRODUCER": "false"}
    ).start()
    workers.append(worker)
    traffic = generate(seed=13, subscribers=300)
    assert asyncio.run(send(worker.url, traffic.events)) == len(traffic.events)
    assert_exact(wait_for_counts([worker.url], traffic), traffic)
