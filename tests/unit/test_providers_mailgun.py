"""Mailgun webhooks: mapping, HMAC signature, stale timestamps, token replay, round trip."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from provider_helpers import SALT, assert_email_event, mailgun_signature, round_trip

from pipeline.ingest.identity import pseudonymise
from pipeline.ingest.providers import PayloadError, ReplayCache, SignatureError, WebhookRequest
from pipeline.ingest.providers.mailgun import MailgunAdapter

KEY = "key-3ax6xnjp29jd6fds4gc373sgvjxteol0"
ENV = {"MAILGUN_WEBHOOK_SIGNING_KEY": KEY}
NOW = 1529006854.0  # the documented event's own time
ADDRESS = "alice@example.com"
TOKEN = "a8ce0edb2dd8301dee6c2405235584e45aa91d1e9f979f3de0"


@pytest.fixture
def mg() -> MailgunAdapter:
    return MailgunAdapter(replay_cache=ReplayCache(max_entries=1000))


def opened() -> dict[str, Any]:
    """The documented "opened" event-data (Mailgun webhook payload examples)."""
    return {
        "event": "opened",
        "timestamp": 1529006854.329574,
        "id": "DACSsAdVSeGpLid7TN03WA",
        "log-level": "info",
        "recipient": ADDRESS,
        "recipient-domain": "example.com",
        "geolocation": {"country": "US", "region": "CA", "city": "San Francisco"},
        "tags": ["my_tag_1", "my_tag_2"],
        "campaigns": [],
        "client-info": {
            "client-name": "Chrome",
            "client-os": "Linux",
            "client-type": "browser",
            "device-type": "desktop",
            "user-agent": "Mozilla/5.0 (X11; Linux x86_64)",
        },
        "message": {"headers": {"message-id": "20130503182626.18666.16540@sandboxb.mailgun.org"}},
        "user-variables": {"my_var_1": "Mailgun Variable #1", "my-var-2": "awesome"},
    }


def request(data: dict[str, Any], key: str = KEY, ts: float = NOW, token: str = TOKEN) -> WebhookRequest:
    timestamp = str(int(ts))
    sig = mailgun_signature(key, timestamp, token)
    body = orjson.dumps(
        {"signature": {"timestamp": timestamp, "token": token, "signature": sig}, "event-data": data}
    )
    return WebhookRequest(body, {"content-type": "application/json"}, "https://x.test/webhooks/mailgun")


def one(mg: MailgunAdapter, data: dict[str, Any]) -> dict[str, Any]:
    result = mg.parse(request(data), SALT)
    assert len(result.events) == 1, result
    return result.events[0]


def test_documented_open_maps_every_field(mg: MailgunAdapter) -> None:
    mg.verify(request(opened()), ENV, NOW + 10)
    event = one(mg, opened())
    assert event == {
        "event_id": "mailgun:2018-06-14:DACSsAdVSeGpLid7TN03WA",
        "type": "open",
        "channel": "email",
        "campaign_id": "my_tag_1",
        "subscriber_id": pseudonymise(ADDRESS, SALT),
        "timestamp": 1529006854.329574,
        "machine": False,
        "bot": False,
        "source": "mailgun",
    }
    assert_email_event(event, "mailgun", ADDRESS, now=NOW)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"event": "accepted"}, "send"),
        ({"event": "delivered"}, "delivery"),
        ({"event": "failed", "severity": "permanent"}, "bounce"),
        ({"event": "clicked", "url": "https://example.com/x"}, "click"),
    ],
)
def test_type_mapping(mg: MailgunAdapter, changes: dict[str, Any], expected: str) -> None:
    data = opened() | changes
    event = one(mg, data)
    assert event["type"] == expected
    if expected == "click":
        assert event["url"] == "https://example.com/x"


@pytest.mark.parametrize(
    "changes",
    [{"event": "failed", "severity": "temporary"}, {"event": "unsubscribed"}, {"event": "complained"}],
)
def test_ignored(mg: MailgunAdapter, changes: dict[str, Any]) -> None:
    result = mg.parse(request(opened() | changes), SALT)
    assert result.events == [] and result.ignored == 1


def test_bot_flags(mg: MailgunAdapter) -> None:
    apple = opened()
    apple["client-info"]["bot"] = "apple"
    assert one(mg, apple)["machine"] is True
    for scanner in ("gmail", "generic"):
        click = opened() | {"event": "clicked", "url": "https://e.test/"}
        click["client-info"]["bot"] = scanner
        event = one(mg, click)
        assert event["bot"] is True and event["machine"] is False
    human = opened()
    human["client-info"]["bot"] = ""
    assert one(mg, human)["machine"] is False


def test_campaign_precedence(mg: MailgunAdapter) -> None:
    data = opened()
    data["user-variables"]["campaign_id"] = "spring"
    assert one(mg, data)["campaign_id"] == "spring"
    data = opened() | {"tags": [], "campaigns": [{"id": "cmp1", "name": "Campaign 1"}]}
    assert one(mg, data)["campaign_id"] == "cmp1"
    assert one(mg, opened() | {"tags": []})["campaign_id"] == "unknown"


def test_wrong_key_refused(mg: MailgunAdapter) -> None:
    with pytest.raises(SignatureError) as exc:
        mg.verify(request(opened(), key="key-other"), ENV, NOW)
    assert exc.value.status == 403


def test_missing_signature_401(mg: MailgunAdapter) -> None:
    body = orjson.dumps({"event-data": opened()})
    with pytest.raises(SignatureError) as exc:
        mg.verify(WebhookRequest(body, {}, ""), ENV, NOW)
    assert exc.value.status == 401


@pytest.mark.parametrize("offset", [301, -301, 86400])
def test_stale_timestamp_refused(mg: MailgunAdapter, offset: float) -> None:
    with pytest.raises(SignatureError) as exc:
        mg.verify(request(opened(), ts=NOW - offset), ENV, NOW)
    assert exc.value.status == 403 and exc.value.reason == "stale_timestamp"


def test_tolerance_is_configurable(mg: MailgunAdapter) -> None:
    mg.verify(request(opened(), ts=NOW - 3600), ENV | {"MAILGUN_WEBHOOK_TOLERANCE_SECONDS": "7200"}, NOW)


def test_replayed_token_with_other_body_refused(mg: MailgunAdapter) -> None:
    mg.verify(request(opened()), ENV, NOW)
    forged = opened() | {"event": "clicked", "url": "https://evil.test/"}
    with pytest.raises(SignatureError) as exc:
        mg.verify(request(forged), ENV, NOW + 1)
    assert exc.value.status == 403 and exc.value.reason == "replayed_token"


def test_identical_redelivery_accepted(mg: MailgunAdapter) -> None:
    # Mailgun resends the same signed body after a 5xx: dedupe by event_id handles it
    mg.verify(request(opened()), ENV, NOW)
    mg.verify(request(opened()), ENV, NOW + 5)


def test_replay_cache_reset_and_bounded() -> None:
    cache = ReplayCache(max_entries=3)
    for i in range(10):
        assert not cache.seen(f"t{i}", "fp", NOW + 300, NOW)
    assert len(cache) == 3
    assert cache.seen("t9", "other", NOW + 300, NOW)
    cache.reset()
    assert not cache.seen("t9", "other", NOW + 300, NOW)
    assert not cache.seen("t9", "later", NOW + 900, NOW + 600)  # expired entries are forgotten


def test_parent_signature_accepted(mg: MailgunAdapter) -> None:
    req = request(opened())
    doc = orjson.loads(req.body)
    doc["signature"]["parent-signature"] = doc["signature"]["signature"]
    doc["signature"]["signature"] = "0" * 64
    mg.verify(WebhookRequest(orjson.dumps(doc), {}, ""), ENV, NOW)


def test_unconfigured_accepts(mg: MailgunAdapter) -> None:
    mg.verify(WebhookRequest(b"anything", {}, ""), {}, NOW)


@pytest.mark.parametrize("body", [b"[]", b"{}", b"\xff", b'{"event-data": []}'])
def test_never_acceptable_payload_is_406(mg: MailgunAdapter, body: bytes) -> None:
    with pytest.raises(PayloadError) as exc:
        mg.parse(WebhookRequest(body, {}, ""), SALT)
    assert exc.value.status == 406


def test_malformed_event_counted(mg: MailgunAdapter) -> None:
    data = opened()
    del data["recipient"]
    result = mg.parse(request(data), SALT)
    assert result.events == [] and result.malformed == 1


def test_same_id_other_day_is_other_event(mg: MailgunAdapter) -> None:
    later = copy.deepcopy(opened()) | {"timestamp": 1529006854.3 + 86400}
    assert one(mg, opened())["event_id"] != one(mg, later)["event_id"]


def test_round_trip(mg: MailgunAdapter) -> None:
    cases = [
        {"type": "send", "event_id": "id-1"},
        {"type": "delivery", "event_id": "id-2"},
        {"type": "bounce", "event_id": "id-3"},
        {"type": "open", "event_id": "id-4", "machine": True},
        {"type": "click", "event_id": "id-5", "bot": True, "url": "https://shop.test/a"},
    ]
    for i, case in enumerate(cases):
        ev = {"email": "Bob@X.test", "campaign_id": "c9", "timestamp": NOW - 60 + i} | case
        (event,) = round_trip(mg, [ev], ENV, NOW + i, "http://localhost", "http://localhost/webhooks/mailgun")
        assert event["type"] == ev["type"] and event["campaign_id"] == "c9"
        assert event["subscriber_id"] == pseudonymise("bob@x.test", SALT)
        assert event["timestamp"] == ev["timestamp"] and event["event_id"].endswith(":" + ev["event_id"])
        assert event["machine"] is bool(ev.get("machine")) and event["bot"] is bool(ev.get("bot"))
        assert event.get("url") == ev.get("url")
