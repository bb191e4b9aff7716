"""SparkPost event webhooks: msys batches, ping, basic/token auth, round trip."""

from __future__ import annotations

from typing import Any

import pytest
from provider_helpers import NOW, SALT, assert_email_event, basic_auth, json_request, round_trip

from pipeline.ingest.identity import pseudonymise
from pipeline.ingest.providers import ADAPTERS, PayloadError, SignatureError, WebhookRequest

sp = ADAPTERS["sparkpost"]
ADDRESS = "Recipient@Example.com"


def event(type_: str, event_id: str, **extra: Any) -> dict[str, Any]:
    """Fields as in SparkPost's documented sample events."""
    base = {
        "type": type_,
        "event_id": event_id,
        "campaign_id": "Example Campaign Name",
        "customer_id": "1",
        "message_id": "000443ee14578172be22",
        "transmission_id": "65832150921904138",
        "raw_rcpt_to": ADDRESS,
        "rcpt_to": ADDRESS.lower(),
        "rcpt_meta": {"customKey": "customValue"},
        "rcpt_tags": ["male", "US"],
        "friendly_from": "sender@example.com",
        "ip_address": "127.0.0.1",
        "timestamp": "1460989507",
        "user_agent": "Mozilla/5.0",
    }
    return base | extra


BATCH = [
    {"msys": {"message_event": event("injection", "92356927693813850")}},
    {"msys": {"message_event": event("delivery", "92356927693813851", queue_time="12")}},
    {"msys": {"message_event": event("bounce", "92356927693813852", bounce_class="1", error_code="554")}},
    {"msys": {"track_event": event("initial_open", "92356927693813853")}},
    {"msys": {"track_event": event("open", "92356927693813854")}},
    {"msys": {"track_event": event("click", "92356927693813855", target_link_url="https://example.com")}},
    {"msys": {"message_event": event("spam_complaint", "92356927693813856")}},
    {"msys": {"unsubscribe_event": event("list_unsubscribe", "92356927693813857")}},
]


def req(doc: Any, headers: dict[str, str] | None = None) -> WebhookRequest:
    return json_request("sparkpost", doc, headers)


def test_documented_batch() -> None:
    result = sp.parse(req(BATCH), SALT)
    assert [e["type"] for e in result.events] == ["send", "delivery", "bounce", "open", "click"]
    assert result.ignored == 3 and result.malformed == 0
    for ev in result.events:
        assert_email_event(ev, "sparkpost", ADDRESS)
        assert ev["event_id"].startswith("sparkpost:9235692769381385")
        assert ev["timestamp"] == 1460989507.0 and ev["campaign_id"] == "Example Campaign Name"
    assert result.events[4]["url"] == "https://example.com"


def test_campaign_precedence() -> None:
    e1 = event("delivery", "1", campaign_id="", rcpt_meta={"campaign_id": "meta-c"})
    e2 = event("delivery", "2", campaign_id="", rcpt_meta={})
    e3 = event("delivery", "3", campaign_id="", rcpt_meta={}, rcpt_tags=[])
    events = sp.parse(req([{"msys": {"message_event": e}} for e in (e1, e2, e3)]), SALT).events
    assert [e["campaign_id"] for e in events] == ["meta-c", "male", "unknown"]


def test_ping_and_malformed() -> None:
    result = sp.parse(req([{"msys": {}}]), SALT)
    assert result.events == [] and result.ignored == 0 and result.malformed == 0
    result = sp.parse(req([{"nope": 1}, 3, {"msys": {"track_event": {"type": "open"}}}, BATCH[1]]), SALT)
    assert len(result.events) == 1 and result.malformed == 3


@pytest.mark.parametrize("body", [b"", b"\x80abc", b"1.5", b"[1,"])
def test_unparseable(body: bytes) -> None:
    with pytest.raises(PayloadError):
        sp.parse(WebhookRequest(body, {}, ""), SALT)


def test_basic_auth() -> None:
    env = {"SPARKPOST_WEBHOOK_USER": "sp", "SPARKPOST_WEBHOOK_PASSWORD": "pw"}
    sp.verify(req(BATCH, basic_auth("sp", "pw")), env, NOW)
    with pytest.raises(SignatureError) as exc:
        sp.verify(req(BATCH, basic_auth("sp", "nope")), env, NOW)
    assert exc.value.status == 403
    with pytest.raises(SignatureError) as exc:
        sp.verify(req(BATCH), env, NOW)
    assert exc.value.status == 401


def test_token_auth() -> None:
    env = {"SPARKPOST_WEBHOOK_TOKEN": "tok-123"}
    sp.verify(req(BATCH, {"authorization": "Bearer tok-123"}), env, NOW)
    sp.verify(req(BATCH, {"x-webhook-token": "tok-123"}), env, NOW)
    with pytest.raises(SignatureError) as exc:
        sp.verify(req(BATCH, {"x-webhook-token": "tok-124"}), env, NOW)
    assert exc.value.status == 403
    with pytest.raises(SignatureError) as exc:
        sp.verify(req(BATCH), env, NOW)
    assert exc.value.status == 401
    sp.verify(req(BATCH), {}, NOW)


def test_round_trip() -> None:
    env = {"SPARKPOST_WEBHOOK_TOKEN": "tok"}
    events = [
        {"type": t, "email": "w@x.test", "campaign_id": "c", "timestamp": NOW + i, "event_id": str(100 + i)}
        for i, t in enumerate(["send", "delivery", "bounce", "open", "click"])
    ]
    parsed = round_trip(sp, events, env)
    assert [(e["event_id"], e["type"], e["timestamp"]) for e in parsed] == [
        (f"sparkpost:{ev['event_id']}", ev["type"], ev["timestamp"]) for ev in events
    ]
    assert {e["subscriber_id"] for e in parsed} == {pseudonymise("w@x.test", SALT)}
