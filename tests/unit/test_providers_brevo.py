"""Brevo webhooks: documented transactional events, proxy (machine) opens, token/basic auth."""

from __future__ import annotations

from typing import Any

import pytest
from provider_helpers import NOW, SALT, assert_email_event, basic_auth, json_request, round_trip

from pipeline.ingest.identity import pseudonymise
from pipeline.ingest.providers import ADAPTERS, PayloadError, SignatureError, WebhookRequest

bv = ADAPTERS["brevo"]
ADDRESS = "example@domain.com"


def ev(event: str, **extra: Any) -> dict[str, Any]:
    """Shaped like Brevo's documented transactional webhook samples."""
    base = {
        "event": event,
        "email": ADDRESS,
        "id": 26224,
        "date": "2020-08-28 19:08:29",
        "ts": 1598634509,
        "message-id": "<202008281908.12345678901@smtp-relay.mailin.fr>",
        "ts_event": 1598634509,
        "subject": "Subject Line",
        "tag": '["transactionalTag"]',
        "sending_ip": "185.41.28.109",
        "ts_epoch": 1598634509223,
        "tags": ["myFirstTransactional"],
    }
    return base | extra


def req(doc: Any, headers: dict[str, str] | None = None) -> WebhookRequest:
    return json_request("brevo", doc, headers)


@pytest.mark.parametrize(
    ("event", "type_", "machine"),
    [
        ("request", "send", False),
        ("delivered", "delivery", False),
        ("hard_bounce", "bounce", False),
        ("soft_bounce", "bounce", False),
        ("opened", "open", False),
        ("unique_opened", "open", False),
        ("proxy_open", "open", True),
        ("unique_proxy_open", "open", True),
        ("click", "click", False),
    ],
)
def test_documented_events(event: str, type_: str, machine: bool) -> None:
    extra = {"link": "https://example.com/page"} if event == "click" else {}
    (out,) = bv.parse(req(ev(event, **extra)), SALT).events
    assert_email_event(out, "brevo", ADDRESS)
    sid = pseudonymise(ADDRESS, SALT)
    assert out["type"] == type_ and out["machine"] is machine and out["bot"] is False
    assert out["timestamp"] == 1598634509.223 and out["campaign_id"] == "myFirstTransactional"
    assert out["event_id"].startswith("brevo:h") and f":{sid}:{event}:1598634509223" in out["event_id"]
    assert "@" not in out["event_id"]
    if event == "click":
        assert out["url"] == "https://example.com/page"


@pytest.mark.parametrize("event", ["deferred", "blocked", "spam", "invalid_email", "unsubscribed", "error"])
def test_ignored(event: str) -> None:
    result = bv.parse(req(ev(event)), SALT)
    assert result.events == [] and result.ignored == 1


def test_tag_fallback_and_batched_array() -> None:
    batch = [
        ev("delivered", tags=[]),
        ev("delivered", tags=None, tag="plain"),
        ev("opened", tags=None, tag=""),
    ]
    events = bv.parse(req(batch), SALT).events
    assert [e["campaign_id"] for e in events] == ["transactionalTag", "plain", "unknown"]


def test_marketing_campaign_event() -> None:
    doc = {
        "id": 1,
        "camp_id": 42,
        "email": ADDRESS,
        "campaign name": "Spring",
        "event": "click",
        "ts_event": 1598634509,
        "URL": "https://example.com/x",
        "tag": "",
    }
    (out,) = bv.parse(req(doc), SALT).events
    assert (
        out["campaign_id"] == "42"
        and out["url"] == "https://example.com/x"
        and out["timestamp"] == 1598634509
    )


def test_malformed_and_unparseable() -> None:
    result = bv.parse(req([ev("opened", ts_epoch="soon"), ev("opened", email=""), "x", ev("opened")]), SALT)
    assert len(result.events) == 1 and result.malformed == 3
    for body in (b"", b"\xff", b"true"):
        with pytest.raises(PayloadError):
            bv.parse(WebhookRequest(body, {}, ""), SALT)


def test_token_and_basic_auth() -> None:
    env = {"BREVO_WEBHOOK_TOKEN": "brevo-tok", "BREVO_WEBHOOK_USER": "u", "BREVO_WEBHOOK_PASSWORD": "p"}
    bv.verify(req(ev("opened"), {"authorization": "Bearer brevo-tok"}), env, NOW)
    bv.verify(req(ev("opened"), basic_auth("u", "p")), env, NOW)
    for headers in ({"authorization": "Bearer nope"}, basic_auth("u", "x")):
        with pytest.raises(SignatureError) as exc:
            bv.verify(req(ev("opened"), headers), env, NOW)
        assert exc.value.status == 403
    with pytest.raises(SignatureError) as exc:
        bv.verify(req(ev("opened")), env, NOW)
    assert exc.value.status == 401
    bv.verify(req(ev("opened")), {}, NOW)


def test_round_trip() -> None:
    env = {"BREVO_WEBHOOK_TOKEN": "t"}
    events = [
        {"type": t, "email": "v@x.test", "campaign_id": "c", "timestamp": NOW + i + 0.5, "event_id": f"b{i}"}
        for i, t in enumerate(["send", "delivery", "bounce", "open", "open", "click"])
    ]
    events[4]["machine"] = True
    parsed = round_trip(bv, events, env)
    assert [(e["type"], e["timestamp"], e["machine"]) for e in parsed] == [
        (x["type"], x["timestamp"], bool(x.get("machine"))) for x in events
    ]
    assert len({e["event_id"] for e in parsed}) == 6
