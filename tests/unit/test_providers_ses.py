"""Amazon SES via SNS: signature v1/v2 with an injected self-signed certificate, URL and topic
checks, subscription confirmation, SES event mapping, round trip. No network is used."""

from __future__ import annotations

import datetime as dt
from typing import Any

import orjson
import pytest
from provider_helpers import (
    NOW,
    SALT,
    assert_email_event,
    json_request,
    private_pem,
    round_trip,
    rsa_key,
    sns_certificate,
)

from pipeline.ingest.identity import pseudonymise
from pipeline.ingest.providers import PayloadError, SignatureError, UpstreamError, WebhookRequest
from pipeline.ingest.providers.ses import SesAdapter, sign

CERT_URL = (
    "https://sns.us-west-2.amazonaws.com/SimpleNotificationService-7506a1e35b36ef5a444dd1a8e7cc3ed8.pem"
)
TOPIC = "arn:aws:sns:us-west-2:123456789012:ses-events"
ADDRESS = "recipient@example.com"


KEY = rsa_key()
KEY_PEM = private_pem(KEY)
CERT = sns_certificate(KEY, NOW - 86400, days=365)


class Fetcher:
    """The injected trust store: records every URL asked for."""

    def __init__(self, pem: bytes = CERT) -> None:
        self.pem = pem
        self.calls: list[str] = []

    def __call__(self, url: str) -> bytes:
        self.calls.append(url)
        return self.pem


@pytest.fixture
def fetcher() -> Fetcher:
    return Fetcher()


@pytest.fixture
def ses(fetcher: Fetcher) -> SesAdapter:
    return SesAdapter(cert_fetcher=fetcher)


def ses_event(kind: str, **detail: Any) -> dict[str, Any]:
    """SES event-publishing record shaped like the documented examples."""
    mail = {
        "timestamp": "2017-08-09T21:59:49.927Z",
        "source": "sender@example.com",
        "sendingAccountId": "123456789012",
        "messageId": "EXAMPLE7c191be45-e9aedb9a-02f9-4d12-a87d-dd0099a07f8a-000000",
        "destination": [ADDRESS],
        "headersTruncated": False,
        "tags": {"ses:configuration-set": ["ConfigSet"], "campaign_id": ["book-launch"]},
    }
    return {"eventType": kind, "mail": mail, kind.lower(): detail}


OPEN = ses_event("Open", ipAddress="192.0.2.1", timestamp="2017-08-09T22:00:19.652Z", userAgent="Mozilla/5.0")
CLICK = ses_event(
    "Click",
    ipAddress="192.0.2.1",
    link="http://docs.aws.amazon.com/ses/latest/DeveloperGuide/send-email-smtp.html",
    linkTags={"samplekey0": ["samplevalue0"]},
    timestamp="2017-08-09T23:51:25.570Z",
    userAgent="Mozilla/5.0",
)
DELIVERY = ses_event(
    "Delivery",
    timestamp="2016-10-19T23:21:04.133Z",
    processingTimeMillis=11893,
    recipients=[ADDRESS],
    smtpResponse="250 2.6.0 Message received",
    reportingMTA="mta.example.com",
)
BOUNCE = ses_event(
    "Bounce",
    bounceType="Permanent",
    bounceSubType="General",
    bouncedRecipients=[
        {"emailAddress": ADDRESS, "action": "failed", "status": "5.1.1"},
        {"emailAddress": "second@example.com", "action": "failed", "status": "5.1.1"},
    ],
    timestamp="2017-08-05T00:41:02.669Z",
    feedbackId="01000157c44f053b-61b59c11-9236-11e6-8f96-7be8aexample-000000",
)
SEND = ses_event("Send")
COMPLAINT = ses_event("Complaint", complainedRecipients=[{"emailAddress": ADDRESS}])


def envelope(
    message: Any,
    version: str = "1",
    kind: str = "Notification",
    key_pem: str = KEY_PEM,
    ts: float = NOW,
    **extra: Any,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "Type": kind,
        "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
        "TopicArn": TOPIC,
        "Message": message if isinstance(message, str) else orjson.dumps(message).decode(),
        "Timestamp": dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z"),
        "SignatureVersion": version,
        "SigningCertURL": CERT_URL,
        "UnsubscribeURL": "https://sns.us-west-2.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=x",
    }
    doc.update(extra)
    doc["Signature"] = sign(doc, key_pem)
    return doc


def req(doc: Any, **headers: str) -> WebhookRequest:
    """As SNS posts it (a JSON document sent as text/plain); keywords add headers, _ for -."""
    hdrs = {"content-type": "text/plain; charset=UTF-8"} | {
        k.replace("_", "-"): v for k, v in headers.items()
    }
    return json_request("ses", doc, hdrs)


@pytest.mark.parametrize("version", ["1", "2"])
def test_signature_versions(ses: SesAdapter, fetcher: Fetcher, version: str) -> None:
    ses.verify(req(envelope(OPEN, version=version)), {}, NOW)
    assert fetcher.calls == [CERT_URL]


def test_subject_is_signed_when_present(ses: SesAdapter) -> None:
    doc = envelope(OPEN, Subject="Amazon SES Email Event Notification")
    ses.verify(req(doc), {}, NOW)
    doc["Subject"] = "changed"
    with pytest.raises(SignatureError):
        ses.verify(req(doc), {}, NOW)


def test_tampered_message_refused(ses: SesAdapter) -> None:
    doc = envelope(OPEN)
    doc["Message"] = doc["Message"].replace("book-launch", "other")
    with pytest.raises(SignatureError) as exc:
        ses.verify(req(doc), {}, NOW)
    assert exc.value.status == 403


def test_wrong_key_refused(ses: SesAdapter) -> None:
    with pytest.raises(SignatureError) as exc:
        ses.verify(req(envelope(OPEN, key_pem=private_pem(rsa_key()))), {}, NOW)
    assert exc.value.status == 403


@pytest.mark.parametrize(
    "url",
    [
        "http://sns.us-west-2.amazonaws.com/cert.pem",
        "https://sns.us-west-2.amazonaws.com.evil.test/cert.pem",
        "https://evil.test/sns.us-west-2.amazonaws.com/cert.pem",
        "https://user@sns.us-west-2.amazonaws.com/cert.pem",
        "https://sns.us-west-2.amazonaws.com:8443/cert.pem",
        "https://s3.us-west-2.amazonaws.com/cert.pem",
        "https://sns.amazonaws.com/cert.pem",
        "https://[::1/cert.pem",
    ],
)
def test_untrusted_cert_url_refused_before_fetch(ses: SesAdapter, fetcher: Fetcher, url: str) -> None:
    with pytest.raises(SignatureError) as exc:
        ses.verify(req(envelope(OPEN, SigningCertURL=url)), {}, NOW)
    assert exc.value.status == 403 and exc.value.reason == "untrusted_cert_url"
    assert fetcher.calls == []


def test_topic_allow_list(ses: SesAdapter) -> None:
    ses.verify(req(envelope(OPEN)), {"SES_SNS_TOPIC_ARNS": f"arn:aws:sns:eu-west-1:1:x, {TOPIC}"}, NOW)
    with pytest.raises(SignatureError) as exc:
        ses.verify(req(envelope(OPEN)), {"SES_SNS_TOPIC_ARNS": "arn:aws:sns:eu-west-1:1:x"}, NOW)
    assert exc.value.status == 403 and exc.value.reason == "topic_not_allowed"


def test_signature_always_required(ses: SesAdapter) -> None:
    doc = envelope(OPEN)
    del doc["Signature"]
    with pytest.raises(SignatureError) as exc:
        ses.verify(req(doc), {}, NOW)
    assert exc.value.status == 401
    with pytest.raises(SignatureError) as exc:
        ses.verify(req(envelope(OPEN) | {"SignatureVersion": "3"}), {}, NOW)
    assert exc.value.status == 403


def test_stale_timestamp_refused(ses: SesAdapter) -> None:
    with pytest.raises(SignatureError) as exc:
        ses.verify(req(envelope(OPEN, ts=NOW - 2 * 86400)), {}, NOW)
    assert exc.value.reason == "stale_timestamp" and exc.value.status == 403


def test_expired_certificate_refused() -> None:
    adapter = SesAdapter(cert_fetcher=Fetcher(sns_certificate(KEY, NOW - 86400, days=1)))
    with pytest.raises(SignatureError) as exc:
        adapter.verify(req(envelope(OPEN, ts=NOW + 3 * 86400)), {}, NOW + 3 * 86400)
    assert exc.value.reason == "certificate_expired"


def test_fetch_failure_is_retryable(fetcher: Fetcher) -> None:
    def broken(url: str) -> bytes:
        raise OSError("network down")

    with pytest.raises(UpstreamError) as exc:
        SesAdapter(cert_fetcher=broken).verify(req(envelope(OPEN)), {}, NOW)
    assert exc.value.status == 503
    with pytest.raises(SignatureError):
        SesAdapter(cert_fetcher=lambda url: b"not a pem").verify(req(envelope(OPEN)), {}, NOW)


def test_certificate_cached(ses: SesAdapter, fetcher: Fetcher) -> None:
    for _ in range(3):
        ses.verify(req(envelope(OPEN)), {}, NOW)
    assert len(fetcher.calls) == 1


def test_subscription_confirmation(ses: SesAdapter) -> None:
    subscribe = (
        f"https://sns.us-west-2.amazonaws.com/?Action=ConfirmSubscription&TopicArn={TOPIC}&Token=2336412f37"
    )
    doc = envelope(
        "You have chosen to subscribe to the topic.\nTo confirm the subscription, visit the SubscribeURL.",
        kind="SubscriptionConfirmation",
        Token="2336412f37",
        SubscribeURL=subscribe,
    )
    request = req(doc, x_amz_sns_message_type="SubscriptionConfirmation")
    ses.verify(request, {}, NOW)
    result = ses.parse(request, SALT)
    assert result.confirm_url == subscribe and result.events == []
    doc["Token"] = "forged"
    with pytest.raises(SignatureError):
        ses.verify(req(doc), {}, NOW)


def test_confirmation_with_foreign_subscribe_url_rejected(ses: SesAdapter) -> None:
    doc = envelope("x", kind="SubscriptionConfirmation", Token="t", SubscribeURL="https://evil.test/")
    with pytest.raises(PayloadError):
        ses.parse(req(doc), SALT)


@pytest.mark.parametrize(
    ("record", "type_", "ts"),
    [
        (OPEN, "open", "2017-08-09T22:00:19.652Z"),
        (CLICK, "click", "2017-08-09T23:51:25.570Z"),
        (DELIVERY, "delivery", "2016-10-19T23:21:04.133Z"),
        (SEND, "send", "2017-08-09T21:59:49.927Z"),
    ],
)
def test_event_mapping(ses: SesAdapter, record: dict[str, Any], type_: str, ts: str) -> None:
    request = req(envelope(record))
    ses.verify(request, {}, NOW)
    (event,) = ses.parse(request, SALT).events
    assert_email_event(event, "ses", ADDRESS)
    assert event["event_id"] == "ses:22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324"
    assert event["type"] == type_ and event["campaign_id"] == "book-launch"
    assert event["timestamp"] == dt.datetime.fromisoformat(ts).timestamp()
    assert event["machine"] is False and event["bot"] is False
    if type_ == "click":
        assert event["url"] == "http://docs.aws.amazon.com/ses/latest/DeveloperGuide/send-email-smtp.html"


def test_bounce_with_two_recipients(ses: SesAdapter) -> None:
    events = ses.parse(req(envelope(BOUNCE)), SALT).events
    assert [e["event_id"][-2:] for e in events] == [":0", ":1"]
    assert [e["subscriber_id"] for e in events] == [
        pseudonymise(ADDRESS, SALT),
        pseudonymise("second@example.com", SALT),
    ]


def test_ignored_and_non_ses_messages(ses: SesAdapter) -> None:
    assert ses.parse(req(envelope(COMPLAINT)), SALT).ignored == 1
    assert (
        ses.parse(
            req(envelope("Successfully validated SNS topic for Amazon SES event publishing.")), SALT
        ).ignored
        == 1
    )
    no_tags = ses_event("Open", timestamp="2017-08-09T22:00:19.652Z")
    no_tags["mail"]["tags"] = {}
    assert ses.parse(req(envelope(no_tags)), SALT).events[0]["campaign_id"] == "unknown"
    broken = ses_event("Delivery", timestamp="2017-08-09T22:00:19.652Z")
    assert ses.parse(req(envelope(broken)), SALT).malformed == 1


def test_raw_delivery_and_garbage_rejected(ses: SesAdapter) -> None:
    # raw message delivery (no SNS envelope) cannot be authenticated
    for body in (orjson.dumps(OPEN), b"[]", b"\xff"):
        with pytest.raises(PayloadError):
            ses.verify(WebhookRequest(body, {}, ""), {}, NOW)
        with pytest.raises(PayloadError):
            ses.parse(WebhookRequest(body, {}, ""), SALT)
    with pytest.raises(PayloadError):
        ses.parse(req(envelope(OPEN), x_amz_sns_message_type="SubscriptionConfirmation"), SALT)


def test_round_trip(ses: SesAdapter) -> None:
    env = {
        "SES_SNS_TEST_SIGNING_KEY": KEY_PEM,
        "SES_SNS_TEST_CERT_URL": CERT_URL,
        "SES_SNS_TOPIC_ARNS": TOPIC,
    }
    for i, type_ in enumerate(["send", "delivery", "bounce", "open", "click"]):
        ev = {
            "type": type_,
            "email": "u@x.test",
            "campaign_id": "c",
            "timestamp": NOW - 9 + i,
            "event_id": f"uuid-{i}",
        }
        (event,) = round_trip(ses, [ev], env)
        assert (event["event_id"], event["type"], event["campaign_id"]) == (f"ses:uuid-{i}", type_, "c")
        assert event["timestamp"] == NOW - 9 + i and event["subscriber_id"] == pseudonymise("u@x.test", SALT)


def test_non_string_type_is_a_payload_error() -> None:
    """Found by hypothesis: a JSON object as Type must be refused, not crash (unhashable)."""
    req = WebhookRequest(body=b'{"Type":{"":""}}', headers={}, url="http://x/webhooks/ses")
    with pytest.raises(PayloadError):
        SesAdapter(cert_fetcher=lambda url: b"").verify(req, {}, 0.0)
