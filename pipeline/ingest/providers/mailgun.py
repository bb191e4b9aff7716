"""Mailgun webhooks (current, JSON): ``{"signature": {...}, "event-data": {...}}``, one event each.

Signature: hex HMAC-SHA256(``MAILGUN_WEBHOOK_SIGNING_KEY``, timestamp + token). The body is not
covered, so a captured signature block could carry any event-data: tokens are remembered (see
:class:`ReplayCache`) and timestamps outside a tolerance are refused.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from .common import (
    Collector,
    ParsedWebhook,
    PayloadError,
    ReplayCache,
    Skip,
    WebhookRequest,
    campaign,
    compose_id,
    dumps,
    env_float,
    env_get,
    epoch,
    load_json,
    make_event,
    missing,
    obj,
    refused,
    same,
    text,
)

NAME = "mailgun"
KEY_ENV = "MAILGUN_WEBHOOK_SIGNING_KEY"
TOLERANCE_ENV = "MAILGUN_WEBHOOK_TOLERANCE_SECONDS"
DEFAULT_TOLERANCE = 300.0
NEVER_RETRY = 406  # Mailgun's documented "rejected, do not retry" status

TYPES = {"accepted": "send", "delivered": "delivery", "opened": "open", "clicked": "click"}


def sign(key: str, timestamp: str, token: str) -> str:
    return hmac.new(key.encode("utf-8"), (timestamp + token).encode("utf-8"), hashlib.sha256).hexdigest()


class MailgunAdapter:
    name = NAME
    max_batch = 1  # Mailgun posts one event per request

    def __init__(self, replay_cache: ReplayCache | None = None) -> None:
        # in-process: with several workers a token replayed to another worker is not caught;
        # the tolerance window bounds that exposure (documented in README.md, Providers)
        self.replay_cache = replay_cache if replay_cache is not None else ReplayCache()

    def configured(self, env: Mapping[str, str]) -> bool:
        return bool(env_get(env, KEY_ENV))

    def verify(self, req: WebhookRequest, env: Mapping[str, str], now: float) -> None:
        if not self.configured(env):
            return
        key = env_get(env, KEY_ENV)
        try:
            doc = _document(req.body, status=NEVER_RETRY)
        except PayloadError:
            raise missing("missing_signature") from None
        block = obj(doc.get("signature"))
        timestamp, token, signature = (block.get(k) for k in ("timestamp", "token", "signature"))
        if isinstance(timestamp, int) and not isinstance(timestamp, bool):
            timestamp = str(timestamp)  # documented as int, sent as a string: accept both
        if not all(isinstance(v, str) and v for v in (timestamp, token, signature)):
            raise missing("missing_signature")
        assert isinstance(timestamp, str) and isinstance(token, str) and isinstance(signature, str)
        expected = sign(key, timestamp, token)
        parent = block.get("parent-signature")  # subaccount events: signed by the primary account
        ok = same(signature.lower(), expected)
        ok_parent = isinstance(parent, str) and same(parent.lower(), expected)
        if not (ok or ok_parent):
            raise refused("bad_signature")
        tolerance = env_float(env, TOLERANCE_ENV, DEFAULT_TOLERANCE)
        try:
            ts = epoch(timestamp)
        except Skip:
            raise refused("stale_timestamp") from None
        if abs(now - ts) > tolerance:
            raise refused("stale_timestamp")
        fingerprint = hashlib.sha256(req.body).hexdigest()
        if self.replay_cache.seen(token, fingerprint, ts + tolerance, now):
            raise refused("replayed_token")

    def parse(self, req: WebhookRequest, salt: bytes) -> ParsedWebhook:
        doc = _document(req.body, status=NEVER_RETRY)
        data = doc.get("event-data")
        if not isinstance(data, dict):
            raise PayloadError("no_event_data", NEVER_RETRY)
        out = Collector()
        out.add(self._event, data, salt)
        return out.result

    @staticmethod
    def _event(data: dict[str, Any], salt: bytes) -> dict[str, Any] | None:
        kind = text(data.get("event"))
        if kind == "failed":
            # temporary failures are retried by Mailgun and end in delivered or a permanent
            # failure: only the permanent one is a bounce (like SendGrid's deferred)
            if data.get("severity") != "permanent":
                return None
            type_ = "bounce"
        elif kind in TYPES:
            type_ = TYPES[kind]
        elif kind is None:
            raise Skip("no_event")
        else:
            return None  # rejected, unsubscribed, complained, stored, ...
        mg_id = text(data.get("id"))
        if not mg_id:
            raise Skip("no_event_id")
        ts = epoch(data.get("timestamp"))
        # event-data.id is unique per day only: the UTC day makes it globally unique
        day = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")
        bot_kind = text(obj(data.get("client-info")).get("bot"))
        campaigns = data.get("campaigns")
        first_campaign = campaigns[0] if isinstance(campaigns, list) and campaigns else None
        if isinstance(first_campaign, dict):
            first_campaign = first_campaign.get("id") or first_campaign.get("name")
        return make_event(
            NAME,
            event_id=compose_id(NAME, day, mg_id),
            type_=type_,
            recipient=data.get("recipient"),
            timestamp=ts,
            campaign_id=campaign(
                [obj(data.get("user-variables")).get("campaign_id"), data.get("tags"), first_campaign], salt
            ),
            salt=salt,
            # client-info.bot: "apple" = Mail Privacy Protection pre-fetch; "gmail"/"generic" =
            # a scanner. Any of them on an open is a machine open, on a click a bot click.
            machine=bool(bot_kind),
            bot=bool(bot_kind),
            url=data.get("url"),
        )

    def build_request(
        self, events: list[dict[str, Any]], env: Mapping[str, str], now: float, base_url: str
    ) -> tuple[dict[str, str], bytes]:
        if len(events) != 1:
            raise ValueError("mailgun sends exactly one event per request")
        ev = events[0]
        kind = {v: k for k, v in TYPES.items()}.get(ev["type"])
        data: dict[str, Any] = {
            "id": ev["event_id"],
            "timestamp": float(ev["timestamp"]),
            "event": kind or "failed",
            "recipient": ev["email"],
            "tags": [ev.get("campaign_id") or "unknown"],
            "user-variables": {"campaign_id": ev.get("campaign_id") or "unknown"},
            "log-level": "info",
        }
        if ev["type"] == "bounce":
            data.update({"severity": "permanent", "log-level": "error"})
        elif kind is None:
            raise ValueError("event type has no mailgun form")
        if ev["type"] in ("open", "click"):
            bot = "apple" if ev["type"] == "open" and ev.get("machine") else ""
            bot = "generic" if ev["type"] == "click" and ev.get("bot") else bot
            data["client-info"] = {"client-type": "browser", "device-type": "desktop", "bot": bot}
        if ev["type"] == "click":
            data["url"] = ev.get("url") or "https://example.com/"
        timestamp = str(int(now))
        # deterministic but unique per event and moment: pure, yet never a reused token
        token = hashlib.sha256(dumps(data) + timestamp.encode()).hexdigest()[:50]
        key = env_get(env, KEY_ENV)
        signature = {"timestamp": timestamp, "token": token, "signature": sign(key, timestamp, token)}
        return {"content-type": "application/json"}, dumps({"signature": signature, "event-data": data})


def _document(body: bytes, status: int) -> dict[str, Any]:
    try:
        doc = load_json(body)
    except PayloadError:
        raise PayloadError("body_not_json", status) from None
    if not isinstance(doc, dict):
        raise PayloadError("body_not_object", status)
    return doc


ADAPTER = MailgunAdapter()
