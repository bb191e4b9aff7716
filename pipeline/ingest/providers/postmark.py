"""Postmark webhooks: one JSON object per request, ``RecordType`` says which kind.

Postmark does not sign webhooks; it sends HTTP basic auth taken from the webhook URL
(``https://user:pass@host/webhooks/postmark``), checked against ``POSTMARK_WEBHOOK_USER`` /
``POSTMARK_WEBHOOK_PASSWORD``. Postmark has no event id: one is composed from RecordType,
MessageID, the hashed recipient and the event time (plus the link for clicks).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.ingest.identity import pseudonymise

from .common import (
    Collector,
    ParsedWebhook,
    PayloadError,
    Skip,
    WebhookRequest,
    basic_header,
    campaign,
    check_basic_or_bearer,
    compose_id,
    dumps,
    env_get,
    iso,
    load_json,
    make_event,
    obj,
    short_hash,
    text,
)

NAME = "postmark"
USER_ENV = "POSTMARK_WEBHOOK_USER"
PASSWORD_ENV = "POSTMARK_WEBHOOK_PASSWORD"
# Postmark posts a click only for the first click per recipient and link: total clicks, and so
# total CTR, cannot be computed from Postmark alone. Said in the output rather than reported wrong.
UNSUPPORTED = frozenset({"total_ctr"})

# RecordType -> (canonical type, field holding the time)
TYPES = {
    "Delivery": ("delivery", "DeliveredAt"),
    "Bounce": ("bounce", "BouncedAt"),
    "Open": ("open", "ReceivedAt"),
    "Click": ("click", "ReceivedAt"),
}
# Bounce records that are not a failed delivery (auto-replies, list requests, ...)
NOT_BOUNCES = frozenset(
    {
        "AutoResponder",
        "Unsubscribe",
        "Subscribe",
        "SubscribeRequest",
        "OpenRelayTest",
        "ChallengeVerification",
        "SpamNotification",
        "VirusNotification",
        "InboundError",
        "ManuallyDeactivated",
        "SpamComplaint",
    }
)


class PostmarkAdapter:
    name = NAME
    max_batch = 1

    def configured(self, env: Mapping[str, str]) -> bool:
        return bool(env_get(env, USER_ENV) or env_get(env, PASSWORD_ENV))

    def verify(self, req: WebhookRequest, env: Mapping[str, str], now: float) -> None:
        if self.configured(env):
            check_basic_or_bearer(req, env_get(env, USER_ENV), env_get(env, PASSWORD_ENV))

    def parse(self, req: WebhookRequest, salt: bytes) -> ParsedWebhook:
        doc = load_json(req.body)
        if not isinstance(doc, dict):
            raise PayloadError("body_not_object")
        out = Collector()
        out.add(self._event, doc, salt)
        out.result.unsupported_rates = UNSUPPORTED
        return out.result

    @staticmethod
    def _event(doc: dict[str, Any], salt: bytes) -> dict[str, Any] | None:
        record = text(doc.get("RecordType"))
        if record is None:
            raise Skip("no_record_type")
        if record not in TYPES:
            return None  # SpamComplaint, SubscriptionChange, ...
        if record == "Bounce" and text(doc.get("Type")) in NOT_BOUNCES:
            return None
        type_, time_field = TYPES[record]
        message_id = text(doc.get("MessageID"))
        recipient = text(doc.get("Recipient") or doc.get("Email"))  # bounces say Email
        when = text(doc.get(time_field))
        if not message_id or not recipient or not when:
            raise Skip("missing_field")
        parts = [record, message_id, pseudonymise(recipient, salt), when]
        if type_ == "click":
            parts.append(short_hash(text(doc.get("OriginalLink")) or ""))
        return make_event(
            NAME,
            event_id=compose_id(NAME, *parts),
            type_=type_,
            recipient=recipient,
            timestamp=when,
            campaign_id=campaign([obj(doc.get("Metadata")).get("campaign_id"), doc.get("Tag")], salt),
            salt=salt,
            url=doc.get("OriginalLink"),
        )

    def build_request(
        self, events: list[dict[str, Any]], env: Mapping[str, str], now: float, base_url: str
    ) -> tuple[dict[str, str], bytes]:
        """One Postmark record. ``send`` has no Postmark webhook and raises ValueError."""
        if len(events) != 1:
            raise ValueError("postmark sends exactly one record per request")
        ev = events[0]
        record = {v[0]: k for k, v in TYPES.items()}.get(ev["type"])
        if record is None:
            raise ValueError("event type has no postmark form")
        cid = ev.get("campaign_id") or "unknown"
        when = iso(float(ev["timestamp"]))
        doc: dict[str, Any] = {
            "RecordType": record,
            "MessageStream": "outbound",
            "MessageID": ev["event_id"],
            "Tag": cid,
            "Metadata": {"campaign_id": cid},
            TYPES[record][1]: when,
        }
        if record == "Bounce":
            doc.update({"ID": 42, "Type": "HardBounce", "TypeCode": 1, "Email": ev["email"]})
        else:
            doc["Recipient"] = ev["email"]
        if record == "Open":
            doc.update({"FirstOpen": True, "Platform": "WebMail", "ReadSeconds": 5})
        if record == "Click":
            doc.update({"ClickLocation": "HTML", "OriginalLink": ev.get("url") or "https://example.com/"})
        headers = {"content-type": "application/json"}
        user, password = env_get(env, USER_ENV), env_get(env, PASSWORD_ENV)
        if user or password:
            headers["authorization"] = basic_header(user, password)
        return headers, dumps(doc)


ADAPTER = PostmarkAdapter()
