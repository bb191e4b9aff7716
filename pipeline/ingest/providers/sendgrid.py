"""SendGrid (Twilio) Event Webhook: JSON array, ECDSA P-256/SHA-256 signed.

Signature: ``X-Twilio-Email-Event-Webhook-Signature`` = base64 DER ECDSA signature over
``X-Twilio-Email-Event-Webhook-Timestamp`` + raw body (bytes exactly as received), verified
with the account's verification key ``SENDGRID_WEBHOOK_PUBLIC_KEY`` (base64 DER or PEM).
"""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .common import (
    Collector,
    ConfigError,
    ParsedWebhook,
    Skip,
    WebhookRequest,
    campaign,
    dumps,
    env_float,
    env_get,
    header,
    load_items,
    make_event,
    missing,
    refused,
    text,
)

NAME = "sendgrid"
KEY_ENV = "SENDGRID_WEBHOOK_PUBLIC_KEY"
SIG_HEADER = "x-twilio-email-event-webhook-signature"
TS_HEADER = "x-twilio-email-event-webhook-timestamp"
# SendGrid retries for up to 24 h and may resend the original signature, so a 5-minute window
# would drop retries. The body is signed, so an exact replay is only harmful once event_id
# dedupe (kept >= 48 h) has forgotten it: 25 h stays inside that.
MAX_AGE_ENV = "SENDGRID_WEBHOOK_MAX_AGE_SECONDS"
DEFAULT_MAX_AGE = 25 * 3600.0
MAX_FUTURE = 300.0

TYPES = {"processed": "send", "delivered": "delivery", "bounce": "bounce", "open": "open", "click": "click"}
IGNORED = frozenset(
    {"dropped", "deferred", "spamreport", "unsubscribe", "group_unsubscribe", "group_resubscribe"}
)


@functools.lru_cache(maxsize=8)
def load_public_key(value: str) -> ec.EllipticCurvePublicKey:
    """The verification key from the dashboard: base64 DER (SubjectPublicKeyInfo) or PEM."""
    try:
        if "BEGIN" in value:
            key = serialization.load_pem_public_key(value.encode("ascii"))
        else:
            key = serialization.load_der_public_key(base64.b64decode("".join(value.split()), validate=True))
    except (ValueError, TypeError, binascii.Error, UnicodeEncodeError):
        raise ConfigError("sendgrid_public_key_invalid") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError("sendgrid_public_key_not_p256")
    return key


class SendGridAdapter:
    name = NAME
    max_batch = 1000

    def configured(self, env: Mapping[str, str]) -> bool:
        return bool(env_get(env, KEY_ENV))

    def verify(self, req: WebhookRequest, env: Mapping[str, str], now: float) -> None:
        if not self.configured(env):
            return
        key = load_public_key(env_get(env, KEY_ENV))
        signature = header(req, SIG_HEADER)
        timestamp = header(req, TS_HEADER)
        if not signature or not timestamp:
            raise missing("missing_signature")
        try:
            sig = base64.b64decode(signature.strip(), validate=True)
            ts = float(timestamp.strip())
        except (binascii.Error, ValueError):
            raise refused("bad_signature") from None
        if not ts == ts:  # NaN
            raise refused("stale_timestamp")
        try:
            key.verify(sig, timestamp.encode("utf-8") + req.body, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError, UnicodeEncodeError):
            raise refused("bad_signature") from None
        max_age = env_float(env, MAX_AGE_ENV, DEFAULT_MAX_AGE)
        if ts < now - max_age or ts > now + MAX_FUTURE:
            raise refused("stale_timestamp")

    def parse(self, req: WebhookRequest, salt: bytes) -> ParsedWebhook:
        doc = load_items(req.body, "body_not_event_array")
        out = Collector()
        for item in doc:
            out.add(self._event, item, salt)
        return out.result

    @staticmethod
    def _event(item: Any, salt: bytes) -> dict[str, Any] | None:
        if not isinstance(item, dict):
            raise Skip("not_an_object")
        kind = text(item.get("event"))
        if kind not in TYPES:
            if kind is None:
                raise Skip("no_event")
            return None  # IGNORED and any future event type: no funnel meaning
        sg_id = text(item.get("sg_event_id"))
        if not sg_id:
            raise Skip("no_event_id")
        return make_event(
            NAME,
            event_id=f"{NAME}:{sg_id}",
            type_=TYPES[kind],
            recipient=item.get("email"),
            timestamp=item.get("timestamp"),
            # precedence: Marketing Campaigns id, then our custom arg, then the first category
            campaign_id=campaign(
                [item.get("marketing_campaign_id"), item.get("campaign_id"), item.get("category")], salt
            ),
            salt=salt,
            machine=item.get("sg_machine_open") is True,
            url=item.get("url"),
        )

    def build_request(
        self, events: list[dict[str, Any]], env: Mapping[str, str], now: float, base_url: str
    ) -> tuple[dict[str, str], bytes]:
        """Native SendGrid batch, signed with ``SENDGRID_WEBHOOK_PRIVATE_KEY`` (PEM) if given."""
        reverse = {v: k for k, v in TYPES.items()}
        items = []
        for ev in events:
            if ev["type"] not in reverse:
                continue  # conversions/impressions have no SendGrid form
            item: dict[str, Any] = {
                "email": ev["email"],
                "timestamp": int(ev["timestamp"]),
                "event": reverse[ev["type"]],
                "sg_event_id": ev["event_id"],
                "sg_message_id": f"{ev['event_id']}.filter0001.1.0",
                "category": [ev.get("campaign_id") or "unknown"],
                "campaign_id": ev.get("campaign_id") or "unknown",
            }
            if ev["type"] == "open":
                item["sg_machine_open"] = bool(ev.get("machine"))
            if ev["type"] == "click":
                item["url"] = ev.get("url") or "https://example.com/"
            items.append(item)
        body = dumps(items) + b"\r\n"  # SendGrid's bodies end with CRLF; the signature covers it
        headers = {"content-type": "application/json"}
        private_pem = env_get(env, "SENDGRID_WEBHOOK_PRIVATE_KEY")
        if private_pem:
            key = serialization.load_pem_private_key(private_pem.encode("ascii"), password=None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            timestamp = str(int(now))
            sig = key.sign(timestamp.encode("ascii") + body, ec.ECDSA(hashes.SHA256()))
            headers[SIG_HEADER] = base64.b64encode(sig).decode("ascii")
            headers[TS_HEADER] = timestamp
        return headers, body


ADAPTER = SendGridAdapter()
