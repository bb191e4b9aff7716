"""SparkPost event webhooks: JSON array of ``{"msys": {"<class>_event": {...}}}``.

SparkPost does not sign event webhooks. Authentication is HTTP basic auth
(``SPARKPOST_WEBHOOK_USER`` / ``SPARKPOST_WEBHOOK_PASSWORD``) or a static token
(``SPARKPOST_WEBHOOK_TOKEN``) sent as ``Authorization: Bearer <token>`` or as the custom header
``X-Webhook-Token`` configured on the webhook. ``{"msys": {}}`` is SparkPost's test ping.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .common import (
    Collector,
    ParsedWebhook,
    Skip,
    WebhookRequest,
    basic_header,
    campaign,
    check_basic_or_bearer,
    dumps,
    env_get,
    load_items,
    make_event,
    obj,
    text,
)

NAME = "sparkpost"
USER_ENV = "SPARKPOST_WEBHOOK_USER"
PASSWORD_ENV = "SPARKPOST_WEBHOOK_PASSWORD"
TOKEN_ENV = "SPARKPOST_WEBHOOK_TOKEN"
TOKEN_HEADER = "x-webhook-token"

# "initial_open" (pixel at the top) and "open" (pixel at the bottom) both fire for one render
# of a full message: counting both would double total opens. "open" is SparkPost's own
# "rendered" count, so it is the one mapped; initial_open is counted as ignored.
TYPES = {
    "injection": "send",
    "delivery": "delivery",
    "bounce": "bounce",
    "out_of_band": "bounce",  # a bounce that arrives after the receiving server accepted
    "open": "open",
    "amp_open": "open",
    "click": "click",
    "amp_click": "click",
}


class SparkPostAdapter:
    name = NAME
    max_batch = 1000

    def configured(self, env: Mapping[str, str]) -> bool:
        return any(env_get(env, n) for n in (USER_ENV, PASSWORD_ENV, TOKEN_ENV))

    def verify(self, req: WebhookRequest, env: Mapping[str, str], now: float) -> None:
        if self.configured(env):
            check_basic_or_bearer(
                req,
                env_get(env, USER_ENV),
                env_get(env, PASSWORD_ENV),
                token=env_get(env, TOKEN_ENV),
                token_headers=(TOKEN_HEADER,),
            )

    def parse(self, req: WebhookRequest, salt: bytes) -> ParsedWebhook:
        doc = load_items(req.body, "body_not_event_array")
        out = Collector()
        for item in doc:
            msys = item.get("msys") if isinstance(item, dict) else None
            if not isinstance(msys, dict):
                out.result.malformed += 1
                continue
            for event in msys.values():  # one "<class>_event" key; an empty msys is the ping
                out.add(self._event, event, salt)
        return out.result

    @staticmethod
    def _event(event: Any, salt: bytes) -> dict[str, Any] | None:
        if not isinstance(event, dict):
            raise Skip("not_an_object")
        kind = text(event.get("type"))
        if kind is None:
            raise Skip("no_type")
        if kind not in TYPES:
            return None  # initial_open, delay, spam_complaint, policy_rejection, unsubscribes...
        event_id = text(event.get("event_id"))
        if not event_id:
            raise Skip("no_event_id")
        meta = obj(event.get("rcpt_meta"))
        return make_event(
            NAME,
            event_id=f"{NAME}:{event_id}"[:256],
            type_=TYPES[kind],
            recipient=event.get("raw_rcpt_to") or event.get("rcpt_to"),
            timestamp=event.get("timestamp"),
            campaign_id=campaign(
                [event.get("campaign_id"), meta.get("campaign_id"), event.get("rcpt_tags")],
                salt,
            ),
            salt=salt,
            url=event.get("target_link_url"),
        )

    def build_request(
        self, events: list[dict[str, Any]], env: Mapping[str, str], now: float, base_url: str
    ) -> tuple[dict[str, str], bytes]:
        classes = {"send": ("message_event", "injection"), "delivery": ("message_event", "delivery")}
        classes |= {"bounce": ("message_event", "bounce"), "open": ("track_event", "open")}
        classes["click"] = ("track_event", "click")
        batch = []
        for ev in events:
            if ev["type"] not in classes:
                continue
            cls, kind = classes[ev["type"]]
            cid = ev.get("campaign_id") or "unknown"
            body: dict[str, Any] = {
                "type": kind,
                "event_id": ev["event_id"],
                "timestamp": str(int(ev["timestamp"])),
                "campaign_id": cid,
                "rcpt_meta": {"campaign_id": cid},
                "rcpt_tags": [cid],
                "raw_rcpt_to": ev["email"],
                "rcpt_to": ev["email"].lower(),
                "message_id": ev["event_id"][:20],
                "transmission_id": "1",
                "customer_id": "1",
            }
            if ev["type"] == "click":
                body["target_link_url"] = ev.get("url") or "https://example.com/"
            batch.append({"msys": {cls: body}})
        headers = {"content-type": "application/json"}
        user, password, token = (env_get(env, n) for n in (USER_ENV, PASSWORD_ENV, TOKEN_ENV))
        if token:
            headers["authorization"] = f"Bearer {token}"
        elif user or password:
            headers["authorization"] = basic_header(user, password)
        return headers, dumps(batch)


ADAPTER = SparkPostAdapter()
