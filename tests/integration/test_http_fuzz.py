"""Hypothesis against a live worker over a real socket: arbitrary bodies, headers and encodings
at every endpoint. Never a 5xx other than the documented 503, never a crash, and nothing is
produced from a refused request."""

from __future__ import annotations

import json
import time

import httpx
from conftest import WorkerProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_webhooks_e2e import provider_env

from pipeline.events import BodyError, EventError, parse_body, validate_event
from pipeline.simulation.truth import from_stream

ENDPOINTS = ["/events"] + [
    f"/webhooks/{p}" for p in ("sendgrid", "mailgun", "postmark", "ses", "mandrill", "sparkpost", "brevo")
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=20,
)
bodies = st.one_of(
    st.binary(max_size=2048),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.text(max_size=500).map(lambda t: t.encode("utf-16")),
    st.text(max_size=500).map(lambda t: t.encode("utf-8")),
    st.just(b"mandrill_events=%5B%7B%7D%5D"),
    st.just(b'{"signature": {"timestamp": "1", "token": "t", "signature": "00"}, "event-data": {}}'),
)
header_names = st.sampled_from(
    [
        "content-type",
        "authorization",
        "x-twilio-email-event-webhook-signature",
        "x-twilio-email-event-webhook-timestamp",
        "x-mandrill-signature",
        "x-amz-sns-message-type",
        "x-webhook-token",
        "content-encoding",
    ]
)
header_values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60).map(
    str.strip
)


def test_fuzz_every_endpoint_refused_and_nothing_produced(broker, tmp_path, workers):
    env = {**provider_env(tmp_path), "PIPELINE_INGEST_TOKEN": "fuzz-token"}
    worker = WorkerProcess(broker.address, tmp_path, env=env).start()
    workers.append(worker)
    client = httpx.Client(timeout=30)
    statuses: dict[int, int] = {}

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        endpoint=st.sampled_from(ENDPOINTS),
        body=bodies,
        headers=st.dictionaries(header_names, header_values, max_size=4),
    )
    def fuzz(endpoint: str, body: bytes, headers: dict[str, str]) -> None:
        resp = client.post(f"{worker.url}{endpoint}", content=body, headers=headers)
        statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
        assert resp.status_code < 500 or resp.status_code == 503, (endpoint, body[:80], resp.text)
        if resp.status_code == 503:
            # the only 503 a refused request may get is for an SNS certificate we cannot fetch
            assert endpoint == "/webhooks/ses", resp.text
        assert resp.status_code >= 400, (endpoint, resp.status_code, resp.text)

    fuzz()
    assert worker.process.poll() is None, "the worker died"
    time.sleep(2)
    assert client.get(f"{worker.url}/campaigns").json()["campaigns"] == []
    metrics = client.get(f"{worker.url}/metrics").text
    assert "pipeline_events_ingested_total{" not in metrics
    assert sum(statuses.values()) >= 300


def test_fuzz_open_events_endpoint_never_5xx(worker):
    """Without a token, /events answers 202/400/413 to anything; the events it accepts are
    exactly those the schema accepts, and exactly those are counted."""
    client = httpx.Client(timeout=30)
    accepted: list[dict] = []
    serial = iter(range(10**9))

    event = st.fixed_dictionaries(
        {
            # unique per event: this test is about validation, redeliveries are tested elsewhere
            "event_id": st.text(min_size=1, max_size=8).map(lambda t: f"{next(serial)}-{t}"),
            "type": st.sampled_from(["click", "open", "clack", 3]),
            "channel": st.sampled_from(["ads", "email", "tv"]),
            "campaign_id": st.text(max_size=6),
            "timestamp": st.one_of(
                st.floats(allow_nan=True, allow_infinity=True),
                st.text(max_size=25),
                st.integers(min_value=-10, max_value=10**12),
            ),
        },
        optional={"subscriber_id": st.text(max_size=8), "machine": json_values, "value": json_values},
    )

    def check(payload) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload, allow_nan=True).encode()
        resp = client.post(f"{worker.url}/events", content=body)
        assert resp.status_code in (202, 400, 413), (payload, resp.text)
        if resp.status_code == 413:
            return
        try:
            items = parse_body(body)  # what the server reads from these bytes
        except BodyError:
            assert resp.status_code == 400, resp.text
            return
        doc = resp.json()
        rejected = {r["index"] for r in doc["rejected"]} if "accepted" in doc else set(range(len(items)))
        for index, item in enumerate(items):
            try:
                valid = validate_event(item, time.time(), 300)
            except EventError:
                valid = None
            assert (valid is None) == (index in rejected), (item, resp.text)
            if valid is not None:
                accepted.append(valid)

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(payload=st.one_of(st.lists(event, max_size=5), event, json_values, bodies))
    def fuzz(payload) -> None:
        check(payload)

    fuzz()
    known = {"type": "click", "channel": "ads", "campaign_id": "fuzz-known", "subscriber_id": "s"}
    check([{**known, "event_id": f"known-{n}", "timestamp": time.time() - 60} for n in range(3)])
    assert worker.process.poll() is None
    # every accepted event, and nothing else, is counted: per campaign and type, in "all"
    assert len(accepted) >= 3
    truth = from_stream(accepted, (300, 3600))
    want = {
        f"{channel}/{campaign}": {
            k: v
            for k, v in truth.expected(channel, campaign)["counts"].items()
            if not k.startswith("unique_")
        }
        for channel, campaign in truth.totals
    }
    deadline = time.monotonic() + 120
    while True:
        docs = client.get(f"{worker.url}/campaigns").json()["campaigns"]
        got = {
            f"{doc['channel']}/{doc['campaign_id']}": {
                k: v for k, v in doc["counts"].items() if v and not k.startswith("unique_")
            }
            for doc in docs
        }
        if got == want or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert got == want
