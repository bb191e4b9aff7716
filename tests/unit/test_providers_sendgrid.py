"""SendGrid Event Webhook: mapping of the documented example batch, ECDSA signature, round trip."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from provider_helpers import (
    NOW,
    SALT,
    assert_email_event,
    ecdsa_key,
    private_pem,
    round_trip,
    sendgrid_public_key,
)

from pipeline.ingest.identity import pseudonymise
from pipeline.ingest.providers import ADAPTERS, ConfigError, PayloadError, SignatureError, WebhookRequest
from pipeline.ingest.providers.sendgrid import SIG_HEADER, TS_HEADER

ADDRESS = "example@test.com"
sg = ADAPTERS["sendgrid"]
KEY = ecdsa_key()
PUBLIC_B64 = sendgrid_public_key(KEY)
ENV = {"SENDGRID_WEBHOOK_PUBLIC_KEY": PUBLIC_B64}


def signed(body: bytes, key: ec.EllipticCurvePrivateKey = KEY, ts: float = NOW) -> WebhookRequest:
    timestamp = str(int(ts))
    sig = key.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    headers = {SIG_HEADER: base64.b64encode(sig).decode(), TS_HEADER: timestamp}
    return WebhookRequest(body=body, headers=headers, url="https://x.test/webhooks/sendgrid")


def base(event: str, **extra: Any) -> dict[str, Any]:
    item = {
        "email": ADDRESS,
        "timestamp": 1513299569,
        "smtp-id": "<14c5d75ce93.dfd.64b469@ismtpd-555>",
        "event": event,
        "category": "cat facts",
        "sg_event_id": f"rbtnWrG1DVDGGGFHFyun0A-{event}==",
        "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.000000000000000000000",
    }
    item.update(extra)
    return item


# the documented example batch (docs "Event Webhook Reference"), one of each event type
DOCUMENTED = [
    base("processed"),
    base("deferred", response="400 try again later", attempt="5"),
    base("delivered", response="250 OK"),
    base("open", sg_machine_open=False, useragent="Mozilla/4.0 (compatible; MSIE 6.1)", ip="255.255.255.255"),
    base("click", useragent="Mozilla/4.0", ip="255.255.255.255", url="http://www.sendgrid.com/"),
    base("bounce", reason="500 unknown recipient", status="5.0.0", type="bounce"),
    base("dropped", reason="Bounced Address", status="5.0.0"),
    base("spamreport"),
    base("unsubscribe"),
    base("group_unsubscribe", asm_group_id=10),
    base("group_resubscribe", asm_group_id=10),
]
BODY = orjson.dumps(DOCUMENTED) + b"\r\n"  # SendGrid bodies end with CRLF


def test_documented_batch_maps_every_field() -> None:
    sg.verify(signed(BODY), ENV, NOW + 60)
    result = sg.parse(signed(BODY), SALT)
    assert result.ignored == 6 and result.malformed == 0
    assert [e["type"] for e in result.events] == ["send", "delivery", "open", "click", "bounce"]
    for event in result.events:
        assert_email_event(event, "sendgrid", ADDRESS)
        assert event["event_id"].startswith("sendgrid:rbtnWrG1DVDGGGFHFyun0A-")
        assert event["timestamp"] == 1513299569.0
        assert event["campaign_id"] == "cat facts"
        assert event["machine"] is False and event["bot"] is False
    assert result.events[3]["url"] == "http://www.sendgrid.com/"
    assert "url" not in result.events[2]
    assert ADDRESS not in repr(result)


def test_machine_open_and_campaign_precedence() -> None:
    items = [
        base("open", sg_machine_open=True, marketing_campaign_id=12345, campaign_id="custom"),
        base("open", campaign_id="custom", category=["first", "second"]),
        base("open", category=["first", "second"]),
        base("open", category=[]),
    ]
    items[1]["sg_event_id"] += "b"
    events = sg.parse(WebhookRequest(orjson.dumps(items), {}, ""), SALT).events
    assert events[0]["machine"] is True
    assert [e["campaign_id"] for e in events] == ["12345", "custom", "first", "unknown"]


def test_valid_signature_pem_key_too() -> None:
    pem = KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    sg.verify(signed(BODY), {"SENDGRID_WEBHOOK_PUBLIC_KEY": pem.decode()}, NOW)


def test_tampered_body_refused() -> None:
    req = signed(BODY)
    tampered = WebhookRequest(BODY.replace(b"processed", b"delivered"), req.headers, req.url)
    with pytest.raises(SignatureError) as exc:
        sg.verify(tampered, ENV, NOW)
    assert exc.value.status == 403


def test_trailing_crlf_is_signed() -> None:
    req = signed(BODY)
    with pytest.raises(SignatureError):
        sg.verify(WebhookRequest(BODY.rstrip(), req.headers, req.url), ENV, NOW)


def test_wrong_key_refused() -> None:
    with pytest.raises(SignatureError) as exc:
        sg.verify(signed(BODY, key=ecdsa_key()), ENV, NOW)
    assert exc.value.status == 403


def test_missing_headers_401() -> None:
    with pytest.raises(SignatureError) as exc:
        sg.verify(WebhookRequest(BODY, {}, ""), ENV, NOW)
    assert exc.value.status == 401


@pytest.mark.parametrize("age", [26 * 3600, -600])
def test_stale_or_future_timestamp_refused(age: float) -> None:
    with pytest.raises(SignatureError) as exc:
        sg.verify(signed(BODY, ts=NOW - age), ENV, NOW)
    assert exc.value.status == 403 and exc.value.reason == "stale_timestamp"


def test_retry_within_a_day_accepted() -> None:
    sg.verify(signed(BODY, ts=NOW - 23 * 3600), ENV, NOW)


def test_unconfigured_accepts_and_bad_key_is_config_error() -> None:
    sg.verify(WebhookRequest(BODY, {}, ""), {}, NOW)
    assert not sg.configured({}) and sg.configured(ENV)
    with pytest.raises(ConfigError) as exc:
        sg.verify(signed(BODY), {"SENDGRID_WEBHOOK_PUBLIC_KEY": "bm90IGEga2V5"}, NOW)
    assert exc.value.status == 500


def test_malformed_event_skipped_not_batch() -> None:
    items = [base("delivered"), {"event": "delivered", "email": ADDRESS}, "junk", base("open", timestamp="x")]
    result = sg.parse(WebhookRequest(orjson.dumps(items), {}, ""), SALT)
    assert len(result.events) == 1 and result.malformed == 3


@pytest.mark.parametrize("body", [b"", b"\xff\xfe", b"42", b'"x"', b"{not json"])
def test_unparseable_body(body: bytes) -> None:
    with pytest.raises(PayloadError) as exc:
        sg.parse(WebhookRequest(body, {}, ""), SALT)
    assert exc.value.status == 400


def test_address_in_click_url_is_hashed() -> None:
    url = "https://shop.test/unsub/alice%40x.com?email=alice@x.com&utm_source=mail#bob@x.com"
    event = sg.parse(WebhookRequest(orjson.dumps([base("click", url=url)]), {}, ""), SALT).events[0]
    assert "alice" not in event["url"] and "bob" not in event["url"] and "%40" not in event["url"]
    assert "utm_source=mail" in event["url"] and pseudonymise("alice@x.com", SALT) in event["url"]


def test_round_trip() -> None:
    events = [
        {"type": "send", "email": "a@x.test", "campaign_id": "c1", "timestamp": NOW - 50, "event_id": "e1"},
        {"type": "open", "email": "a@x.test", "campaign_id": "c1", "timestamp": NOW - 40, "event_id": "e2"},
        {"type": "open", "email": "b@x.test", "campaign_id": "c1", "timestamp": NOW - 30, "event_id": "e3"},
        {"type": "click", "email": "a@x.test", "campaign_id": "c1", "timestamp": NOW - 20, "event_id": "e4"},
    ]
    events[2]["machine"] = True
    events[3]["url"] = "https://shop.test/p"
    parsed = round_trip(sg, events, {**ENV, "SENDGRID_WEBHOOK_PRIVATE_KEY": private_pem(KEY)})
    assert [(e["event_id"], e["type"], e["campaign_id"], e["timestamp"]) for e in parsed] == [
        (f"sendgrid:{ev['event_id']}", ev["type"], "c1", float(int(ev["timestamp"]))) for ev in events
    ]
    assert [e["subscriber_id"] for e in parsed] == [pseudonymise(ev["email"], SALT) for ev in events]
    assert [e["machine"] for e in parsed] == [False, False, True, False]
    assert parsed[3]["url"] == "https://shop.test/p"
