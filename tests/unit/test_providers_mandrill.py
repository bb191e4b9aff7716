"""Mandrill webhooks: form-encoded batch, HMAC-SHA1 over URL + sorted fields, composite ids."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
from provider_helpers import NOW, SALT, assert_email_event, round_trip

from pipeline.ingest.providers import ADAPTERS, PayloadError, SignatureError, WebhookRequest

URL = "https://hooks.example.com/webhooks/mandrill"
ENV = {"MANDRILL_WEBHOOK_KEY": "m4ndr1ll-key", "MANDRILL_WEBHOOK_URL": URL}
md = ADAPTERS["mandrill"]
ADDRESS = "example.webhook@mandrillapp.com"


def msg(**extra: Any) -> dict[str, Any]:
    base = {
        "ts": 1365109999,
        "subject": "This an example webhook message",
        "email": ADDRESS,
        "sender": "example.sender@mandrillapp.com",
        "tags": ["webhook-example"],
        "opens": [],
        "clicks": [],
        "state": "sent",
        "metadata": {"user_id": 111},
        "_id": "exampleaaaaaaaaaaaaaaaaaaaaaaaaa",
        "_version": "exampleaaaaaaaaaaaaaaa",
    }
    return base | extra


# shaped like the sample batch Mandrill sends from "Send Test" (docs: webhook format)
EVENTS = [
    {"event": "send", "msg": msg(), "_id": "exampleaaaaaaaaaaaaaaaaaaaaaaaaa", "ts": 1384954004},
    {
        "event": "deferral",
        "msg": msg(state="deferred"),
        "_id": "exampleaaaaaaaaaaaaaaaaaaaaaaaaa1",
        "ts": 1384954004,
    },
    {
        "event": "hard_bounce",
        "msg": msg(state="bounced"),
        "_id": "exampleaaaaaaaaaaaaaaaaaaaaaaaaa2",
        "ts": 1384954004,
    },
    {
        "event": "soft_bounce",
        "msg": msg(state="soft-bounced"),
        "_id": "exampleaaaaaaaaaaaaaaaaaaaaaaaaa3",
        "ts": 1384954004,
    },
    {
        "event": "open",
        "msg": msg(),
        "_id": "exampleaaaaaaaaaaaaaaaaaaaaaaaaa4",
        "ts": 1384954004,
        "ip": "127.0.0.1",
        "location": {"country_short": "US"},
        "user_agent": "Mozilla/5.0",
    },
    {
        "event": "click",
        "msg": msg(),
        "_id": "exampleaaaaaaaaaaaaaaaaaaaaaaaaa5",
        "ts": 1384954004,
        "url": "http://mandrill.com",
        "ip": "127.0.0.1",
        "user_agent": "Mozilla/5.0",
    },
    {"event": "spam", "msg": msg(), "_id": "exampleaaaaaaaaaaaaaaaaaaaaaaaaa6", "ts": 1384954004},
    {"event": "unsub", "msg": msg(), "_id": "exampleaaaaaaaaaaaaaaaaaaaaaaaaa7", "ts": 1384954004},
    {"event": "reject", "msg": msg(), "_id": "exampleaaaaaaaaaaaaaaaaaaaaaaaaa8", "ts": 1384954004},
    {"type": "blacklist", "action": "add", "reject": {"email": ADDRESS}},  # a sync event
]


def signed(events: Any, key: str = ENV["MANDRILL_WEBHOOK_KEY"], url: str = URL) -> WebhookRequest:
    fields = {"mandrill_events": orjson.dumps(events).decode()}
    data = url + "".join(k + v for k, v in sorted(fields.items()))
    sig = base64.b64encode(hmac.new(key.encode(), data.encode(), hashlib.sha1).digest()).decode()
    headers = {"x-mandrill-signature": sig, "content-type": "application/x-www-form-urlencoded"}
    return WebhookRequest(urlencode(fields).encode(), headers, "http://10.0.0.5:8080/webhooks/mandrill")


def test_documented_batch() -> None:
    request = signed(EVENTS)
    md.verify(request, ENV, NOW)
    result = md.parse(request, SALT)
    assert [e["type"] for e in result.events] == ["send", "bounce", "bounce", "open", "click"]
    assert result.ignored == 5 and result.malformed == 0
    for event in result.events:
        assert_email_event(event, "mandrill", ADDRESS)
        assert event["timestamp"] == 1384954004.0 and event["campaign_id"] == "webhook-example"
        assert event["event_id"].startswith("mandrill:example")
    assert result.events[4]["url"] == "http://mandrill.com"
    assert result.events[0]["event_id"] == "mandrill:exampleaaaaaaaaaaaaaaaaaaaaaaaaa:send:1384954004"
    assert ADDRESS not in repr(result)


def test_campaign_from_metadata_first() -> None:
    event = dict(EVENTS[0], msg=msg(metadata={"campaign_id": "promo-7"}))
    assert md.parse(signed([event]), SALT).events[0]["campaign_id"] == "promo-7"


def test_empty_batch_is_the_setup_check() -> None:
    request = signed([])
    md.verify(request, ENV, NOW)
    assert md.parse(request, SALT).events == []


def test_signature_uses_configured_url_not_request_url() -> None:
    with pytest.raises(SignatureError):
        md.verify(signed(EVENTS), {"MANDRILL_WEBHOOK_KEY": ENV["MANDRILL_WEBHOOK_KEY"]}, NOW)
    request = signed(EVENTS, url="http://10.0.0.5:8080/webhooks/mandrill")
    md.verify(request, {"MANDRILL_WEBHOOK_KEY": ENV["MANDRILL_WEBHOOK_KEY"]}, NOW)


def test_tampered_wrong_key_missing() -> None:
    request = signed(EVENTS)
    tampered = WebhookRequest(request.body.replace(b"hard_bounce", b"open"), request.headers, request.url)
    for bad in (tampered, signed(EVENTS, key="other-key")):
        with pytest.raises(SignatureError) as exc:
            md.verify(bad, ENV, NOW)
        assert exc.value.status == 403
    with pytest.raises(SignatureError) as exc:
        md.verify(WebhookRequest(request.body, {}, URL), ENV, NOW)
    assert exc.value.status == 401
    md.verify(WebhookRequest(request.body, {}, URL), {}, NOW)


def test_malformed_events_skipped() -> None:
    bad = [EVENTS[0], {"event": "open", "msg": msg(email=None), "_id": "x", "ts": 1}, {"event": "open"}, 7]
    result = md.parse(signed(bad), SALT)
    assert len(result.events) == 1 and result.malformed == 3


@pytest.mark.parametrize("body", [b"", b"other=1", b"mandrill_events=%7Bnot", b"mandrill_events=%7B%7D"])
def test_unparseable(body: bytes) -> None:
    with pytest.raises(PayloadError):
        md.parse(WebhookRequest(body, {}, URL), SALT)


def test_round_trip() -> None:
    events = [
        {"type": t, "email": "q@x.test", "campaign_id": "c", "timestamp": NOW + i, "event_id": f"m{i}"}
        for i, t in enumerate(["send", "bounce", "open", "click"])
    ]
    events[3]["url"] = "https://shop.test/"
    parsed = round_trip(
        md,
        events,
        {"MANDRILL_WEBHOOK_KEY": "k"},
        base_url="http://localhost:8080",
        url="http://localhost:8080/webhooks/mandrill",
    )
    assert [(e["type"], e["timestamp"], e["campaign_id"]) for e in parsed] == [
        (ev["type"], ev["timestamp"], "c") for ev in events
    ]
    assert parsed[3]["url"] == "https://shop.test/"
    assert len({e["event_id"] for e in parsed}) == 4
