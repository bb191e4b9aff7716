"""Amazon SES event publishing through an SNS topic subscribed over HTTPS.

The body is an SNS envelope (sent as ``text/plain``) whose ``Message`` is the SES event as a JSON
*string*. The SNS signature is always verified, configured or not: SignatureVersion 1
(SHA1withRSA) or 2 (SHA256withRSA) over the canonical "name\\nvalue\\n" lines, with the certificate
from ``SigningCertURL``, which must be ``https://sns.<region>.amazonaws.com/...pem`` (checked before
anything is fetched). ``SES_SNS_TOPIC_ARNS`` (comma list), when set, restricts accepted topics.
"""

from __future__ import annotations

import base64
import binascii
import re
import threading
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .common import (
    Collector,
    ParsedWebhook,
    PayloadError,
    Skip,
    UpstreamError,
    WebhookRequest,
    campaign,
    dumps,
    env_get,
    epoch,
    header,
    iso,
    load_json,
    make_event,
    missing,
    obj,
    refused,
    same,
    text,
)

NAME = "ses"
TOPICS_ENV = "SES_SNS_TOPIC_ARNS"
# test/simulate only: the key and certificate URL build_request signs with
TEST_KEY_ENV = "SES_SNS_TEST_SIGNING_KEY"
TEST_CERT_URL_ENV = "SES_SNS_TEST_CERT_URL"
TEST_VERSION_ENV = "SES_SNS_TEST_SIGNATURE_VERSION"
DEFAULT_TEST_CERT_URL = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-test.pem"

# SNS retries for at most an hour; a signed message is only harmful when replayed after event_id
# dedupe (>= 48 h) forgot it, so anything signed more than a day ago is refused.
MAX_AGE = 24 * 3600.0
MAX_FUTURE = 300.0

SNS_HOST = re.compile(r"sns\.[a-z]{2}(?:-[a-z]+)+-\d\.amazonaws\.com")
SIGNED_FIELDS = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
}
SIGNED_FIELDS["SubscriptionConfirmation"] = SIGNED_FIELDS["UnsubscribeConfirmation"] = (
    "Message",
    "MessageId",
    "SubscribeURL",
    "Timestamp",
    "Token",
    "TopicArn",
    "Type",
)
HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {"1": hashes.SHA1, "2": hashes.SHA256}

TYPES = {"Send": "send", "Delivery": "delivery", "Bounce": "bounce", "Open": "open", "Click": "click"}

CertFetcher = Callable[[str], bytes]


def sns_url_ok(url: Any) -> bool:
    """https, host ``sns.<region>.amazonaws.com``, default port, no userinfo."""
    if not isinstance(url, str):
        return False
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    return (
        parts.scheme == "https"
        and parts.hostname is not None
        and SNS_HOST.fullmatch(parts.hostname) is not None
        and parts.netloc == parts.hostname
        and port is None
    )


def fetch_certificate(url: str) -> bytes:
    """Default fetcher: HTTPS GET with certificate verification, small and quick."""
    with urllib.request.urlopen(url, timeout=5) as response:  # url already checked by sns_url_ok
        return response.read(65536)


def canonical(message: Mapping[str, Any]) -> bytes:
    kind = message.get("Type")
    lines = []
    for name in SIGNED_FIELDS[str(kind)]:
        value = message.get(name)
        if value is None and name == "Subject":
            continue  # Subject is signed only when present
        if not isinstance(value, str):
            raise missing("missing_signed_field")
        lines.append(f"{name}\n{value}\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


class SesAdapter:
    name = NAME
    max_batch = 1  # one SNS message per SES event

    def __init__(self, cert_fetcher: CertFetcher | None = None, cache_size: int = 32) -> None:
        # the trust store: tests inject a fetcher returning a generated self-signed certificate
        self.cert_fetcher: CertFetcher = cert_fetcher or fetch_certificate
        self._certs: dict[str, x509.Certificate] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def configured(self, env: Mapping[str, str]) -> bool:
        return bool(env_get(env, TOPICS_ENV))

    # ---------------------------------------------------------------- verify

    def verify(self, req: WebhookRequest, env: Mapping[str, str], now: float) -> None:
        message = _envelope(req)
        kind = message.get("Type")
        if not isinstance(kind, str) or kind not in SIGNED_FIELDS:
            raise PayloadError("unknown_sns_type")
        signature, cert_url = message.get("Signature"), message.get("SigningCertURL")
        if not isinstance(signature, str) or not signature or not isinstance(cert_url, str) or not cert_url:
            raise missing("missing_signature")
        algorithm = HASHES.get(str(message.get("SignatureVersion")))
        if algorithm is None:
            raise refused("unsupported_signature_version")
        if not sns_url_ok(cert_url):
            raise refused("untrusted_cert_url")  # before any fetch: no SSRF through this field
        allowed = [a.strip() for a in env_get(env, TOPICS_ENV).split(",") if a.strip()]
        topic = message.get("TopicArn")
        if allowed and not (isinstance(topic, str) and any([same(topic, a) for a in allowed])):
            raise refused("topic_not_allowed")
        try:
            raw_sig = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            raise refused("bad_signature") from None
        public_key = self._public_key(cert_url, now)
        try:
            public_key.verify(raw_sig, canonical(message), padding.PKCS1v15(), algorithm())
        except InvalidSignature:
            raise refused("bad_signature") from None
        try:
            sent = epoch(message.get("Timestamp"))
        except Skip:
            raise refused("stale_timestamp") from None
        if sent < now - MAX_AGE or sent > now + MAX_FUTURE:
            raise refused("stale_timestamp")

    def _public_key(self, url: str, now: float) -> rsa.RSAPublicKey:
        with self._lock:
            cert = self._certs.get(url)
        if cert is None:
            try:
                pem = self.cert_fetcher(url)
            except Exception:  # network, TLS, HTTP errors: retryable, and never leak details
                raise UpstreamError("cert_unavailable") from None
            try:
                cert = x509.load_pem_x509_certificate(pem)
            except (ValueError, TypeError):
                raise refused("bad_certificate") from None
            with self._lock:
                if len(self._certs) >= self._cache_size:
                    self._certs.pop(next(iter(self._certs)))
                self._certs[url] = cert
        if not cert.not_valid_before_utc.timestamp() <= now <= cert.not_valid_after_utc.timestamp():
            raise refused("certificate_expired")
        key = cert.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise refused("bad_certificate")
        return key

    # ---------------------------------------------------------------- parse

    def parse(self, req: WebhookRequest, salt: bytes) -> ParsedWebhook:
        message = _envelope(req)
        kind = message.get("Type")
        if kind == "SubscriptionConfirmation":
            url = message.get("SubscribeURL")
            if not sns_url_ok(url):  # the caller will GET it: only ever an SNS endpoint
                raise PayloadError("bad_subscribe_url")
            return ParsedWebhook(confirm_url=url)
        if kind == "UnsubscribeConfirmation":
            return ParsedWebhook()
        if kind != "Notification":
            raise PayloadError("unknown_sns_type")
        sns_id = text(message.get("MessageId"))
        if not sns_id:
            raise PayloadError("no_message_id")
        out = Collector()
        raw = message.get("Message")
        try:
            event = load_json(raw.encode("utf-8", "surrogateescape")) if isinstance(raw, str) else None
        except PayloadError:
            event = None
        if not isinstance(event, dict):
            out.result.ignored += 1  # e.g. SES's own setup test notification: no SES event inside
            return out.result
        kind = text(event.get("eventType")) or text(event.get("notificationType"))
        if kind not in TYPES:
            out.result.ignored += 1  # Complaint, Reject, DeliveryDelay, Subscription, ...
            return out.result
        try:
            recipients = _recipients(kind, event)
        except (Skip, TypeError, AttributeError):
            out.result.malformed += 1
            return out.result
        for index, recipient in enumerate(recipients):
            # one SNS message can cover several recipients (a bounce, a delivery to two
            # addresses): the index keeps their ids apart and stable across redelivery
            event_id = f"{NAME}:{sns_id}" if len(recipients) == 1 else f"{NAME}:{sns_id}:{index}"
            out.add(self._event, kind, event, recipient, event_id, salt)
        return out.result

    @staticmethod
    def _event(
        kind: str, event: dict[str, Any], recipient: Any, event_id: str, salt: bytes
    ) -> dict[str, Any]:
        mail = obj(event.get("mail"))
        detail = obj(event.get(kind.lower()))
        tags = obj(mail.get("tags"))
        when = detail.get("timestamp") or mail.get("timestamp")
        return make_event(
            NAME,
            event_id=event_id[:256],
            type_=TYPES[kind],
            recipient=recipient,
            timestamp=when,
            campaign_id=campaign([tags.get("campaign_id"), tags.get("campaign")], salt),
            salt=salt,
            url=detail.get("link"),
        )

    # ---------------------------------------------------------------- build

    def build_request(
        self, events: list[dict[str, Any]], env: Mapping[str, str], now: float, base_url: str
    ) -> tuple[dict[str, str], bytes]:
        """An SNS Notification signed with ``SES_SNS_TEST_SIGNING_KEY`` (PEM RSA private key).

        The receiving server only accepts it if its certificate fetcher returns the matching
        certificate for ``SES_SNS_TEST_CERT_URL``: i.e. in tests, never against real AWS trust.
        """
        if len(events) != 1:
            raise ValueError("SNS carries exactly one SES event per message")
        ev = events[0]
        kind = {v: k for k, v in TYPES.items()}.get(ev["type"])
        if kind is None:
            raise ValueError("event type has no SES form")
        when = iso(float(ev["timestamp"]))
        cid = ev.get("campaign_id") or "unknown"
        mail = {
            "timestamp": when,
            "source": "sender@example.com",
            "messageId": ev["event_id"],
            "destination": [ev["email"]],
            "tags": {"ses:configuration-set": ["funnel"], "campaign_id": [cid]},
        }
        detail: dict[str, Any] = {"timestamp": when}
        if kind == "Delivery":
            detail["recipients"] = [ev["email"]]
        elif kind == "Bounce":
            detail.update(bounceType="Permanent", bouncedRecipients=[{"emailAddress": ev["email"]}])
        elif kind == "Click":
            detail["link"] = ev.get("url") or "https://example.com/"
        elif kind == "Send":
            detail = {}
        ses_event = {"eventType": kind, "mail": mail, kind.lower(): detail}
        topics = [a.strip() for a in env_get(env, TOPICS_ENV).split(",") if a.strip()]
        message: dict[str, Any] = {
            "Type": "Notification",
            "MessageId": ev["event_id"],
            "TopicArn": topics[0] if topics else "arn:aws:sns:us-east-1:123456789012:ses-events",
            "Message": dumps(ses_event).decode("utf-8"),
            "Timestamp": iso(now),
            "SignatureVersion": env_get(env, TEST_VERSION_ENV) or "2",
            "SigningCertURL": env_get(env, TEST_CERT_URL_ENV) or DEFAULT_TEST_CERT_URL,
            "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe",
        }
        message["Signature"] = sign(message, env_get(env, TEST_KEY_ENV))
        headers = {
            "content-type": "text/plain; charset=UTF-8",
            "x-amz-sns-message-type": "Notification",
            "x-amz-sns-message-id": ev["event_id"],
            "x-amz-sns-topic-arn": message["TopicArn"],
        }
        return headers, dumps(message)


def sign(message: Mapping[str, Any], private_pem: str) -> str:
    """Sign an SNS message as AWS does (used by build_request and the tests)."""
    key = serialization.load_pem_private_key(private_pem.encode("ascii"), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("SNS test signing key must be RSA")
    algorithm = HASHES[str(message["SignatureVersion"])]
    return base64.b64encode(key.sign(canonical(message), padding.PKCS1v15(), algorithm())).decode("ascii")


def _envelope(req: WebhookRequest) -> dict[str, Any]:
    message = load_json(req.body)
    if not isinstance(message, dict):
        raise PayloadError("body_not_sns_message")
    declared = header(req, "x-amz-sns-message-type")
    if declared is not None and declared != message.get("Type"):
        raise PayloadError("sns_type_mismatch")
    return message


def _recipients(kind: str, event: dict[str, Any]) -> list[Any]:
    mail = obj(event.get("mail"))
    if kind == "Delivery":
        found = obj(event.get("delivery")).get("recipients")
    elif kind == "Bounce":
        found = [obj(r).get("emailAddress") for r in obj(event.get("bounce")).get("bouncedRecipients") or []]
    elif kind in ("Open", "Click"):
        # SES does not say which recipient opened: the mail's first destination is attributed
        dest = mail.get("destination")
        found = dest[:1] if isinstance(dest, list) else None
    else:
        found = mail.get("destination")
    if not isinstance(found, list) or not found:
        raise Skip("no_recipient")
    return found


ADAPTER = SesAdapter()
