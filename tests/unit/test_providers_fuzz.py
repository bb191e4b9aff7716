"""Arbitrary bodies, headers and encodings against verify() and parse() of every adapter:
only WebhookError may ever escape, and every event that comes out is schema-valid and free of
e-mail addresses."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from provider_helpers import NOW, SALT, mailgun_signature, private_pem, rsa_key, sns_certificate

from pipeline.events import validate_event
from pipeline.ingest.providers import ADAPTERS, ReplayCache, WebhookError, WebhookRequest
from pipeline.ingest.providers.mailgun import MailgunAdapter
from pipeline.ingest.providers.ses import SesAdapter, sign

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEY = rsa_key(1024)  # small: speed, tests only
KEY_PEM = private_pem(KEY)
CERT = sns_certificate(KEY, NOW - 86400, days=30, serial=1)
CERT_URL = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-x.pem"

ENVS: dict[str, dict[str, str]] = {
    "sendgrid": {"SENDGRID_WEBHOOK_PUBLIC_KEY": "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE" + "A" * 86 + "=="},
    "mailgun": {"MAILGUN_WEBHOOK_SIGNING_KEY": "k"},
    "postmark": {"POSTMARK_WEBHOOK_USER": "u", "POSTMARK_WEBHOOK_PASSWORD": "p"},
    "ses": {"SES_SNS_TOPIC_ARNS": "arn:aws:sns:us-east-1:1:t"},
    "mandrill": {"MANDRILL_WEBHOOK_KEY": "k", "MANDRILL_WEBHOOK_URL": "https://x.test/webhooks/mandrill"},
    "sparkpost": {"SPARKPOST_WEBHOOK_TOKEN": "t"},
    "brevo": {"BREVO_WEBHOOK_TOKEN": "t", "BREVO_WEBHOOK_USER": "u"},
}


def adapters() -> dict[str, Any]:
    out = dict(ADAPTERS)
    out["ses"] = SesAdapter(cert_fetcher=lambda url: CERT)
    out["mailgun"] = MailgunAdapter(replay_cache=ReplayCache(1000))
    return out


ALL = adapters()


def enc(value: Any) -> bytes:
    """stdlib JSON: unlike orjson it writes integers beyond 64 bits and NaN/Infinity."""
    return json.dumps(value).encode()


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from(["", "a@b.c", "1700000000", "2024-01-01T00:00:00Z", "9" * 400, "nan", "-1", "open"])
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)
KEYS = [
    "event",
    "email",
    "timestamp",
    "sg_event_id",
    "category",
    "url",
    "id",
    "recipient",
    "tags",
    "RecordType",
    "MessageID",
    "Recipient",
    "ReceivedAt",
    "DeliveredAt",
    "Type",
    "Email",
    "Tag",
    "Metadata",
    "msys",
    "message_event",
    "track_event",
    "type",
    "event_id",
    "raw_rcpt_to",
    "target_link_url",
    "message-id",
    "ts_epoch",
    "ts",
    "link",
    "tag",
    "_id",
    "msg",
    "client-info",
    "user-variables",
    "campaigns",
    "severity",
    "camp_id",
    "OriginalLink",
    "rcpt_meta",
]
EVENT_TYPES = [
    "processed",
    "delivered",
    "open",
    "click",
    "bounce",
    "opened",
    "clicked",
    "failed",
    "accepted",
    "Delivery",
    "Bounce",
    "Open",
    "Click",
    "send",
    "hard_bounce",
    "injection",
    "delivery",
    "proxy_open",
    "request",
    "initial_open",
]
# provider-shaped objects: the right keys with wild values reach the mapping code
shaped = st.fixed_dictionaries(
    {
        "event": st.sampled_from(EVENT_TYPES),
        "RecordType": st.sampled_from(EVENT_TYPES),
        "type": st.sampled_from(EVENT_TYPES),
    },
    optional={k: json_values for k in KEYS if k not in ("event", "RecordType", "type")},
)
shaped_nested = st.recursive(
    shaped,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=3),
    max_leaves=6,
)
bodies = (
    st.binary(max_size=300)
    | json_values.map(enc)
    | shaped_nested.map(enc)
    | shaped_nested.map(lambda v: b"mandrill_events=" + enc(v))
    | st.text(max_size=100).map(lambda t: t.encode("utf-16"))
    | st.sampled_from([b"[" * 5000, b"1" * 5000, b'{"a":' + b"9" * 5000 + b"}", b"\xef\xbb\xbf[]", b"NaN"])
)
header_values = st.text(max_size=60) | st.sampled_from(["Basic dTpw", "Bearer t", "Basic !!", "Bearer "])
headers = st.dictionaries(
    st.sampled_from(
        [
            "authorization",
            "x-mandrill-signature",
            "x-twilio-email-event-webhook-signature",
            "x-twilio-email-event-webhook-timestamp",
            "x-amz-sns-message-type",
            "x-webhook-token",
            "Authorization",
        ]
    ),
    header_values,
    max_size=4,
)


def check(result: Any) -> None:
    text = orjson.dumps([result.events, result.confirm_url]).decode()
    for event in result.events:
        validate_event(event, NOW, 10**12)
        for field in ("subscriber_id", "campaign_id", "event_id"):
            assert "@" not in event[field]
        assert "@" not in event.get("url", "")
    assert isinstance(result.ignored, int) and isinstance(result.malformed, int)
    assert "a@b.c" not in text


def exercise(name: str, req: WebhookRequest) -> None:
    adapter = ALL[name]
    for env in (ENVS[name], {}):
        try:
            adapter.verify(req, env, NOW)
        except WebhookError as exc:
            assert isinstance(exc.status, int) and "@" not in exc.reason
    try:
        check(adapter.parse(req, SALT))
    except WebhookError as exc:
        assert isinstance(exc.status, int) and "@" not in exc.reason


@pytest.mark.parametrize("name", sorted(ADAPTERS))
@FUZZ
@given(body=bodies, hdrs=headers)
def test_arbitrary_requests(name: str, body: bytes, hdrs: dict[str, str]) -> None:
    exercise(name, WebhookRequest(body, hdrs, "https://x.test/webhooks/" + name))


@FUZZ
@given(data=json_values | shaped_nested, token=st.text(min_size=1, max_size=20))
def test_signed_mailgun_with_wild_event_data(data: Any, token: str) -> None:
    # a valid signature takes the request past verify: the parser then sees wild content
    timestamp = str(int(NOW))
    sig = mailgun_signature("k", timestamp, token)
    body = enc({"signature": {"timestamp": timestamp, "token": token, "signature": sig}, "event-data": data})
    exercise("mailgun", WebhookRequest(body, {}, ""))


@FUZZ
@given(
    message=(json_values | shaped_nested).map(lambda v: enc(v).decode()) | st.text(max_size=50),
    kind=st.sampled_from(["Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation"]),
    extra=st.dictionaries(
        st.sampled_from(["Subject", "SubscribeURL", "Token", "MessageId"]), st.text(max_size=40)
    ),
)
def test_signed_sns_with_wild_message(message: str, kind: str, extra: dict[str, str]) -> None:
    doc: dict[str, Any] = {
        "Type": kind,
        "MessageId": "m-1",
        "TopicArn": "arn:aws:sns:us-east-1:1:t",
        "Message": message,
        "Timestamp": "2023-11-14T22:13:20.000Z",
        "SignatureVersion": "2",
        "SigningCertURL": CERT_URL,
        "Token": "tok",
        "SubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription",
    } | extra
    doc["Signature"] = sign(doc, KEY_PEM)
    exercise("ses", WebhookRequest(orjson.dumps(doc), {}, ""))


def test_sendgrid_fuzz_key_is_rejected_as_config() -> None:
    # the garbage ENVS key above must surface as a 500 config error, never an exception
    with pytest.raises(WebhookError) as exc:
        ALL["sendgrid"].verify(WebhookRequest(b"[]", {}, ""), ENVS["sendgrid"], NOW)
    assert exc.value.status in (401, 500)
