"""Brevo (ex-Sendinblue) webhooks: one JSON object per event (an array when "batched").

Brevo does not sign webhooks. Authentication is a bearer token (``BREVO_WEBHOOK_TOKEN``, set as
the webhook's ``auth`` token) or HTTP basic auth (``BREVO_WEBHOOK_USER`` / ``BREVO_WEBHOOK_PASSWORD``,
in the webhook URL). Apple Mail Privacy Protection opens arrive as their own event types
(``proxy_open`` / ``unique_proxy_open``) and become machine opens.
There is no event id: one is composed from message-id (campaign id for marketing webhooks), the hashed
recipient, event, ``ts_epoch`` (+ link for clicks).
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
    load_items,
    load_json,
    make_event,
    short_hash,
    text,
)

NAME = "brevo"
TOKEN_ENV = "BREVO_WEBHOOK_TOKEN"
USER_ENV = "BREVO_WEBHOOK_USER"
PASSWORD_ENV = "BREVO_WEBHOOK_PASSWORD"

# event -> (canonical type, machine)
TYPES = {
    "request": ("send", False),
    "sent": ("send", False),  # marketing-campaign webhooks say "sent"
    "delivered": ("delivery", False),
    "hard_bounce": ("bounce", False),
    "soft_bounce": ("bounce", False),
    "opened": ("open", False),
    "unique_opened": ("open", False),
    "proxy_open": ("open", True),
    "unique_proxy_open": ("open", True),
    "click": ("click", False),
}


class BrevoAdapter:
    name = NAME
    max_batch = 100

    def configured(self, env: Mapping[str, str]) -> bool:
        return any(env_get(env, n) for n in (TOKEN_ENV, USER_ENV, PASSWORD_ENV))

    def verify(self, req: WebhookRequest, env: Mapping[str, str], now: float) -> None:
        if self.configured(env):
            check_basic_or_bearer(
                req, env_get(env, USER_ENV), env_get(env, PASSWORD_ENV), token=env_get(env, TOKEN_ENV)
            )

    def parse(self, req: WebhookRequest, salt: bytes) -> ParsedWebhook:
        doc = load_items(req.body, "body_not_object")
        out = Collector()
        for item in doc:
            out.add(self._event, item, salt)
        return out.result

    @staticmethod
    def _event(item: Any, salt: bytes) -> dict[str, Any] | None:
        if not isinstance(item, dict):
            raise Skip("not_an_object")
        kind = text(item.get("event"))
        if kind is None:
            raise Skip("no_event")
        if kind not in TYPES:
            return None  # deferred, blocked, spam, invalid_email, unsubscribed, error, ...
        type_, machine = TYPES[kind]
        message_id = text(item.get("message-id")) or text(item.get("camp_id"))
        if "ts_epoch" in item:  # milliseconds, the precise one
            ts_key, when = str(item["ts_epoch"]), _seconds(item["ts_epoch"], 1000.0)
        else:
            raw = item.get("ts_event", item.get("ts"))
            ts_key, when = str(raw), _seconds(raw, 1.0)
        if not message_id:
            raise Skip("no_message_id")
        link = text(item.get("link")) or text(item.get("URL"))
        email = text(item.get("email"))
        if not email:
            raise Skip("no_recipient")
        # the hashed recipient too: one message-id (or campaign) can reach several recipients
        parts = [message_id, pseudonymise(email, salt), kind, ts_key]
        if type_ == "click":
            parts.append(short_hash(link or ""))
        tag = item.get("tag")
        return make_event(
            NAME,
            event_id=compose_id(NAME, *parts),
            type_=type_,
            recipient=email,
            timestamp=when,
            # marketing campaign id, then the tags array, then "tag" (sometimes a JSON-encoded array)
            campaign_id=campaign([item.get("camp_id"), item.get("tags"), _tag(tag)], salt),
            salt=salt,
            machine=machine,
            url=link,
        )

    def build_request(
        self, events: list[dict[str, Any]], env: Mapping[str, str], now: float, base_url: str
    ) -> tuple[dict[str, str], bytes]:
        reverse = {"send": "request", "delivery": "delivered", "bounce": "hard_bounce", "click": "click"}
        items = []
        for ev in events:
            if ev["type"] == "open":
                kind = "proxy_open" if ev.get("machine") else "opened"
            elif ev["type"] in reverse:
                kind = reverse[ev["type"]]
            else:
                continue
            cid = ev.get("campaign_id") or "unknown"
            ts_ms = round(float(ev["timestamp"]) * 1000)
            item: dict[str, Any] = {
                "event": kind,
                "email": ev["email"],
                "id": 26224,
                "ts": ts_ms // 1000,
                "ts_event": ts_ms // 1000,
                "ts_epoch": ts_ms,
                "message-id": f"<{ev['event_id']}@smtp-relay.mailin.fr>",
                "subject": "Example",
                "tag": dumps([cid]).decode(),
                "tags": [cid],
                "sending_ip": "185.41.28.109",
            }
            if ev["type"] == "click":
                item["link"] = ev.get("url") or "https://example.com/"
            items.append(item)
        body = dumps(items[0] if len(items) == 1 else items)
        headers = {"content-type": "application/json"}
        token, user, password = (env_get(env, n) for n in (TOKEN_ENV, USER_ENV, PASSWORD_ENV))
        if token:
            headers["authorization"] = f"Bearer {token}"
        elif user or password:
            headers["authorization"] = basic_header(user, password)
        return headers, body


def _seconds(value: Any, per_second: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise Skip("bad_timestamp")
    try:
        return float(value) / per_second
    except (ValueError, OverflowError):
        raise Skip("bad_timestamp") from None


def _tag(value: Any) -> Any:
    """``tag`` is a plain string or a JSON-encoded array of strings."""
    if isinstance(value, str) and value.startswith("["):
        try:
            return load_json(value.encode("utf-8", "surrogateescape"))
        except PayloadError:
            return value
    return value


ADAPTER = BrevoAdapter()
