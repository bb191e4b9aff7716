"""Mandrill (Mailchimp Transactional) webhooks: form field ``mandrill_events`` = JSON array.

Signature: ``X-Mandrill-Signature`` = base64 HMAC-SHA1(``MANDRILL_WEBHOOK_KEY``, webhook URL +
each POST key and value, sorted by key). The URL is the one registered at Mandrill
(``MANDRILL_WEBHOOK_URL``): behind a proxy the URL we see differs from the one Mandrill signed.
There is no event id: one is composed from the message ``_id``, the event and ``ts`` (+ link).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

from .common import (
    Collector,
    ParsedWebhook,
    PayloadError,
    Skip,
    WebhookRequest,
    campaign,
    compose_id,
    dumps,
    env_get,
    form_body,
    header,
    load_json,
    make_event,
    missing,
    obj,
    parse_form,
    refused,
    same,
    short_hash,
    text,
)

NAME = "mandrill"
KEY_ENV = "MANDRILL_WEBHOOK_KEY"
URL_ENV = "MANDRILL_WEBHOOK_URL"
FIELD = "mandrill_events"

TYPES = {
    "send": "send",
    "hard_bounce": "bounce",
    "soft_bounce": "bounce",
    "open": "open",
    "click": "click",
}


def sign(key: str, url: str, fields: Mapping[str, str]) -> str:
    signed = url + "".join(k + fields[k] for k in sorted(fields))
    digest = hmac.new(key.encode("utf-8"), signed.encode("utf-8", "surrogateescape"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


class MandrillAdapter:
    name = NAME
    max_batch = 1000

    def configured(self, env: Mapping[str, str]) -> bool:
        return bool(env_get(env, KEY_ENV))

    def verify(self, req: WebhookRequest, env: Mapping[str, str], now: float) -> None:
        if not self.configured(env):
            return
        signature = header(req, "x-mandrill-signature")
        if not signature:
            raise missing("missing_signature")
        try:
            fields = parse_form(req.body)
        except PayloadError:
            raise refused("bad_signature") from None
        url = env_get(env, URL_ENV) or req.url
        if not same(signature.strip(), sign(env_get(env, KEY_ENV), url, fields)):
            raise refused("bad_signature")

    def parse(self, req: WebhookRequest, salt: bytes) -> ParsedWebhook:
        fields = parse_form(req.body)
        raw = fields.get(FIELD)
        if raw is None:
            raise PayloadError("no_mandrill_events")
        doc = load_json(raw.encode("utf-8", "surrogateescape"))
        if not isinstance(doc, list):
            raise PayloadError("mandrill_events_not_array")
        out = Collector()  # an empty list is Mandrill's check when the webhook is added
        for item in doc:
            out.add(self._event, item, salt)
        return out.result

    @staticmethod
    def _event(item: Any, salt: bytes) -> dict[str, Any] | None:
        if not isinstance(item, dict):
            raise Skip("not_an_object")
        kind = text(item.get("event"))
        if kind is None:
            # sync events (whitelist/blacklist) carry "type", not "event": no funnel meaning
            if text(item.get("type")):
                return None
            raise Skip("no_event")
        if kind not in TYPES:
            return None  # deferral, spam, unsub, reject, ...
        msg = obj(item.get("msg"))
        message_id = text(item.get("_id")) or text(msg.get("_id"))
        ts = item.get("ts")
        if not message_id or isinstance(ts, bool) or not isinstance(ts, int | float | str):
            raise Skip("missing_field")
        type_ = TYPES[kind]
        parts = [message_id, kind, str(ts)]
        if type_ == "click":
            parts.append(short_hash(text(item.get("url")) or ""))
        return make_event(
            NAME,
            event_id=compose_id(NAME, *parts),
            type_=type_,
            recipient=msg.get("email"),
            timestamp=ts,
            campaign_id=campaign([obj(msg.get("metadata")).get("campaign_id"), msg.get("tags")], salt),
            salt=salt,
            url=item.get("url"),
        )

    def build_request(
        self, events: list[dict[str, Any]], env: Mapping[str, str], now: float, base_url: str
    ) -> tuple[dict[str, str], bytes]:
        """Signed over ``MANDRILL_WEBHOOK_URL``, else ``base_url + /webhooks/mandrill``."""
        reverse = {"send": "send", "bounce": "hard_bounce", "open": "open", "click": "click"}
        items = []
        for ev in events:
            if ev["type"] not in reverse:
                continue
            cid = ev.get("campaign_id") or "unknown"
            ts = int(ev["timestamp"])
            item: dict[str, Any] = {
                "event": reverse[ev["type"]],
                "_id": ev["event_id"],
                "ts": ts,
                "msg": {
                    "ts": ts,
                    "_id": ev["event_id"],
                    "email": ev["email"],
                    "sender": "sender@example.com",
                    "subject": "Example",
                    "tags": [cid],
                    "metadata": {"campaign_id": cid},
                    "state": "bounced" if ev["type"] == "bounce" else "sent",
                    "opens": [],
                    "clicks": [],
                },
            }
            if ev["type"] == "click":
                item["url"] = ev.get("url") or "https://example.com/"
            items.append(item)
        fields = {FIELD: dumps(items).decode("utf-8")}
        headers = {"content-type": "application/x-www-form-urlencoded"}
        key = env_get(env, KEY_ENV)
        if key:
            url = env_get(env, URL_ENV) or base_url.rstrip("/") + "/webhooks/mandrill"
            headers["x-mandrill-signature"] = sign(key, url, fields)
        return headers, form_body(fields)


ADAPTER = MandrillAdapter()
