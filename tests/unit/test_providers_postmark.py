"""Postmark webhooks: documented records, basic auth, composite ids, total CTR unsupported."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from provider_helpers import NOW, SALT, assert_email_event, basic_auth, json_request, round_trip

from pipeline.ingest.identity import pseudonymise
from pipeline.ingest.providers import ADAPTERS, PayloadError, SignatureError, WebhookRequest

ENV = {"POSTMARK_WEBHOOK_USER": "hook", "POSTMARK_WEBHOOK_PASSWORD": "s3cret:pw"}
pm = ADAPTERS["postmark"]
MSG = "883953f4-6105-42a2-a16a-77a8eac79483"

# shaped like Postmark's documented webhook examples
DELIVERY = {
    "RecordType": "Delivery",
    "ServerID": 23,
    "MessageStream": "outbound",
    "MessageID": MSG,
    "Recipient": "john@example.com",
    "Tag": "welcome-email",
    "DeliveredAt": "2019-11-05T16:33:54.9070259Z",
    "Details": "Test delivery webhook details",
    "Metadata": {"a_key": "a_value", "b_key": "b_value"},
}
BOUNCE = {
    "RecordType": "Bounce",
    "ID": 42,
    "Type": "HardBounce",
    "TypeCode": 1,
    "Name": "Hard bounce",
    "Tag": "Test",
    "MessageID": MSG,
    "ServerID": 1234,
    "MessageStream": "outbound",
    "Description": "The server was unable to deliver your message (ex: unknown user, mailbox not found).",
    "Details": "Test bounce details",
    "Email": "john@example.com",
    "From": "sender@example.com",
    "BouncedAt": "2014-08-01T13:28:10.2735393-04:00",
    "DumpAvailable": True,
    "Inactive": True,
    "CanActivate": True,
    "Subject": "Test subject",
    "Content": "Test content",
    "Metadata": {"campaign_id": "autumn"},
}
OPEN = {
    "RecordType": "Open",
    "MessageStream": "outbound",
    "Metadata": {"example": "value"},
    "FirstOpen": True,
    "Recipient": "john@example.com",
    "MessageID": MSG,
    "ReceivedAt": "2019-11-05T16:33:54.9070259Z",
    "Platform": "WebMail",
    "ReadSeconds": 5,
    "Tag": "welcome-email",
    "UserAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_7_5)",
    "OS": {"Name": "OS X 10.7 Lion", "Family": "OS X 10", "Company": "Apple Computer, Inc."},
    "Client": {"Name": "Chrome 35.0.1916.153", "Family": "Chrome", "Company": "Google"},
    "Geo": {"IP": "188.2.95.4", "City": "Novi Sad", "Country": "Serbia"},
}
CLICK = {
    "RecordType": "Click",
    "MessageStream": "outbound",
    "ClickLocation": "HTML",
    "Client": {"Name": "Chrome 35.0.1916.153", "Family": "Chrome", "Company": "Google"},
    "OS": {"Name": "OS X 10.7 Lion", "Family": "OS X 10", "Company": "Apple Computer, Inc."},
    "Platform": "Desktop",
    "UserAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_7_5)",
    "OriginalLink": "https://example.com",
    "Geo": {"IP": "188.2.95.4", "City": "Novi Sad", "Country": "Serbia"},
    "MessageID": MSG,
    "Metadata": {"a_key": "a_value"},
    "ReceivedAt": "2017-10-25T15:21:11.0000000Z",
    "Tag": "welcome-email",
    "Recipient": "john@example.com",
}


def req(doc: Any, headers: dict[str, str] | None = None) -> WebhookRequest:
    return json_request("postmark", doc, headers)


@pytest.mark.parametrize(
    ("doc", "type_", "ts", "cid"),
    [
        (DELIVERY, "delivery", 1572971634.907025, "welcome-email"),
        (BOUNCE, "bounce", 1406914090.273539, "autumn"),
        (OPEN, "open", 1572971634.907025, "welcome-email"),
        (CLICK, "click", 1508944871.0, "welcome-email"),
    ],
)
def test_documented_records(doc: dict[str, Any], type_: str, ts: float, cid: str) -> None:
    result = pm.parse(req(doc), SALT)
    assert result.unsupported_rates == frozenset({"total_ctr"})
    (event,) = result.events
    assert_email_event(event, "postmark", "john@example.com")
    sid = pseudonymise("john@example.com", SALT)
    assert event["type"] == type_ and event["campaign_id"] == cid
    assert event["timestamp"] == pytest.approx(ts)
    assert event["event_id"].startswith(f"postmark:{doc['RecordType']}:{MSG}:{sid}:")
    assert event["machine"] is False and event["bot"] is False
    assert "john@" not in orjson.dumps(event).decode()
    if type_ == "click":
        assert event["url"] == "https://example.com"


def test_click_ids_differ_per_link() -> None:
    other = CLICK | {"OriginalLink": "https://example.com/other"}
    assert (
        pm.parse(req(CLICK), SALT).events[0]["event_id"] != pm.parse(req(other), SALT).events[0]["event_id"]
    )


@pytest.mark.parametrize(
    "doc",
    [
        {"RecordType": "SpamComplaint", "MessageID": MSG, "Email": "john@example.com"},
        {"RecordType": "SubscriptionChange", "MessageID": MSG, "Recipient": "john@example.com"},
        BOUNCE | {"Type": "AutoResponder", "TypeCode": 1024},
    ],
)
def test_ignored(doc: dict[str, Any]) -> None:
    result = pm.parse(req(doc), SALT)
    assert result.events == [] and result.ignored == 1


def test_malformed_record_counted() -> None:
    result = pm.parse(req({k: v for k, v in OPEN.items() if k != "ReceivedAt"}), SALT)
    assert result.events == [] and result.malformed == 1


@pytest.mark.parametrize("body", [b"[]", b"\xc3\x28", b"null"])
def test_unparseable(body: bytes) -> None:
    with pytest.raises(PayloadError):
        pm.parse(WebhookRequest(body, {}, ""), SALT)


def test_basic_auth() -> None:
    pm.verify(req(OPEN, basic_auth("hook", "s3cret:pw")), ENV, NOW)
    with pytest.raises(SignatureError) as exc:
        pm.verify(req(OPEN), ENV, NOW)
    assert exc.value.status == 401
    for headers in (
        basic_auth("hook", "wrong"),
        basic_auth("other", "s3cret:pw"),
        {"authorization": "Basic !!!"},
    ):
        with pytest.raises(SignatureError) as exc:
            pm.verify(req(OPEN, headers), ENV, NOW)
        assert exc.value.status == 403
    pm.verify(req(OPEN), {}, NOW)  # unconfigured: accepted (the HTTP layer warns at start)


def test_round_trip() -> None:
    for i, type_ in enumerate(["delivery", "bounce", "open", "click"]):
        ev = {
            "type": type_,
            "email": "z@x.test",
            "campaign_id": "c",
            "timestamp": NOW + i,
            "event_id": f"m{i}",
        }
        (event,) = round_trip(pm, [ev], ENV)
        assert (event["type"], event["campaign_id"], event["timestamp"]) == (type_, "c", NOW + i)
        assert event["subscriber_id"] == pseudonymise("z@x.test", SALT)
    with pytest.raises(ValueError):
        pm.build_request(
            [{"type": "send", "email": "z@x.test", "timestamp": NOW, "event_id": "s"}], ENV, NOW, ""
        )
