"""Shared pieces of the e-mail-provider webhook adapters: request/result types, errors, helpers.

Everything here is pure (no I/O, no clock) so the HTTP layer, the tests and ``pipeline simulate``
can all call it. Error reasons are short fixed strings: they end up in logs and HTTP bodies, so
they never carry a value taken from the request (which could be an e-mail address).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import orjson

from pipeline.ingest.identity import pseudonymise

UNKNOWN_CAMPAIGN = "unknown"
MAX_ID = 256  # schema maxLength of event_id / campaign_id
MAX_URL = 4096  # schema maxLength of url
MAX_EPOCH = 253402300799.0  # 9999-12-31T23:59:59Z: anything later is garbage, not a time


# --------------------------------------------------------------------------- errors


class WebhookError(Exception):
    """Base of every error verify()/parse() may raise; ``reason`` is short and PII-free."""

    status: int = 400

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if status is not None:
            self.status = status


class SignatureError(WebhookError):
    """Authentication failed: 401 when credentials are missing, 403 when they are wrong/stale."""

    status = 403


class PayloadError(WebhookError):
    """The body can never be turned into events (400; Mailgun uses 406 = "do not retry")."""

    status = 400


class ConfigError(WebhookError):
    """The server's own provider settings are unusable (e.g. a malformed public key): 500, so the
    provider retries and nothing is lost once the operator fixes the setting."""

    status = 500


class UpstreamError(WebhookError):
    """A dependency needed to verify (the SNS signing certificate) is unreachable: 503, retry."""

    status = 503


def missing(reason: str) -> SignatureError:
    return SignatureError(reason, 401)


def refused(reason: str) -> SignatureError:
    return SignatureError(reason, 403)


# --------------------------------------------------------------------------- types


@dataclass(frozen=True)
class WebhookRequest:
    body: bytes  # raw bytes exactly as received
    headers: Mapping[str, str]  # keys lower-cased
    url: str  # full URL as the provider called it (Mandrill signs it)
    remote_addr: str | None = None


@dataclass
class ParsedWebhook:
    events: list[dict[str, Any]] = field(default_factory=list)  # canonical, not yet schema-validated
    ignored: int = 0  # provider events with no funnel meaning (unsubscribe, spamreport, deferred...)
    confirm_url: str | None = None  # SNS SubscriptionConfirmation: the caller GETs this URL
    unsupported_rates: frozenset[str] = frozenset()  # e.g. {"total_ctr"} for postmark
    malformed: int = 0  # provider events skipped because a required field was missing/wrong


class Adapter(Protocol):
    name: str
    max_batch: int  # how many events one native request may carry (build_request input size)

    def configured(self, env: Mapping[str, str]) -> bool: ...

    def verify(self, req: WebhookRequest, env: Mapping[str, str], now: float) -> None: ...

    def parse(self, req: WebhookRequest, salt: bytes) -> ParsedWebhook: ...

    def build_request(
        self, events: list[dict[str, Any]], env: Mapping[str, str], now: float, base_url: str
    ) -> tuple[dict[str, str], bytes]: ...


class Skip(Exception):  # control flow only, never leaves this package
    """One provider event is malformed: skip it and count it, keep the rest of the batch."""


# --------------------------------------------------------------------------- request helpers


def header(req: WebhookRequest, name: str) -> str | None:
    """Header value by lower-case name (tolerates a caller that forgot to lower-case keys)."""
    value = req.headers.get(name)
    if value is None:
        for key, val in req.headers.items():
            if isinstance(key, str) and key.lower() == name:
                value = val
                break
    return value if isinstance(value, str) else None


def env_get(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "")
    return value.strip() if isinstance(value, str) else ""


def env_float(env: Mapping[str, str], name: str, default: float) -> float:
    try:
        value = float(env_get(env, name) or default)
    except ValueError:
        raise ConfigError(f"{name.lower()}_invalid") from None
    return value if math.isfinite(value) and value > 0 else default


def same(a: str | bytes, b: str | bytes) -> bool:
    """Constant-time comparison of two secrets/signatures (str compared as UTF-8 bytes)."""
    ab = a.encode("utf-8", "surrogateescape") if isinstance(a, str) else a
    bb = b.encode("utf-8", "surrogateescape") if isinstance(b, str) else b
    return hmac.compare_digest(ab, bb)


def check_basic_or_bearer(
    req: WebhookRequest,
    user: str,
    password: str,
    token: str = "",
    token_headers: Iterable[str] = (),
) -> None:
    """Accept ``Authorization: Basic`` matching user/password, or a bearer/custom-header token.

    Only the credentials that are configured are accepted; with none configured the caller
    never gets here (verify accepts and the HTTP layer warns at start).
    """
    auth = header(req, "authorization") or ""
    scheme, _, value = auth.strip().partition(" ")
    scheme = scheme.lower()
    value = value.strip()
    presented = False
    if token:
        candidates = [value] if scheme == "bearer" else []
        candidates += [h for h in (header(req, n) for n in token_headers) if h]
        presented = bool(candidates)
        # evaluate every candidate: no early exit on the first mismatch
        if any([same(c.strip(), token) for c in candidates]):
            return
    if user or password:
        if scheme == "basic":
            presented = True
            try:
                decoded = base64.b64decode(value, validate=True).decode("utf-8")
            except (binascii.Error, ValueError):
                raise refused("bad_basic_auth") from None
            got_user, sep, got_password = decoded.partition(":")
            ok_user = same(got_user, user)
            ok_password = same(got_password, password)
            if sep and ok_user and ok_password:
                return
    if not presented:
        raise missing("missing_credentials")
    raise refused("bad_credentials")


def basic_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


# --------------------------------------------------------------------------- body helpers


def load_json(body: bytes | str) -> Any:
    """Parse JSON; orjson first (fast), stdlib as fallback for integers beyond 64 bits."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body)
    except (ValueError, RecursionError, TypeError):
        raise PayloadError("body_not_json") from None


def load_items(body: bytes, reason: str) -> list[Any]:
    """A JSON array of provider events, or one event object taken as an array of one."""
    doc = load_json(body)
    if isinstance(doc, dict):
        return [doc]
    if not isinstance(doc, list):
        raise PayloadError(reason)
    return doc


def parse_form(body: bytes) -> dict[str, str]:
    """``application/x-www-form-urlencoded`` body to a dict (last value wins, as PHP's $_POST)."""
    text = body.decode("utf-8", "replace")
    try:
        return dict(parse_qsl(text, keep_blank_values=True))
    except ValueError:
        raise PayloadError("body_not_form") from None


def form_body(fields: Mapping[str, str]) -> bytes:
    return urlencode(list(fields.items())).encode("ascii")


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


# --------------------------------------------------------------------------- value helpers


def text(value: Any) -> str | None:
    """A non-empty string from a str or an int (ids are sometimes numbers); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and abs(value) < 10**30:
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def first_text(value: Any) -> str | None:
    """First usable string of a list (tags, categories), or the value itself if scalar."""
    if isinstance(value, list):
        for item in value:
            found = text(item)
            if found:
                return found
        return None
    return text(value)


def obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def epoch(value: Any) -> float:
    """Epoch seconds from a number, a numeric string or an ISO-8601 string; Skip if unusable."""
    if isinstance(value, bool) or value is None:
        raise Skip("no_timestamp")
    seconds: float
    if isinstance(value, int | float):
        seconds = float(value) if abs(value) < 1e300 else math.inf
    elif isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            try:
                parsed = datetime.fromisoformat(value.strip())
            except ValueError:
                raise Skip("bad_timestamp") from None
            if parsed.tzinfo is None:  # provider times without offset are UTC
                parsed = parsed.replace(tzinfo=UTC)
            try:
                seconds = parsed.timestamp()
            except (OverflowError, ValueError, OSError):
                raise Skip("bad_timestamp") from None
    else:
        raise Skip("bad_timestamp")
    if not math.isfinite(seconds) or seconds < 0 or seconds > MAX_EPOCH:
        raise Skip("bad_timestamp")
    return seconds


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def short_hash(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:24]


_SAFE_ID = re.compile(r"[A-Za-z0-9._:=+/\-]{1,100}")


def id_part(value: str) -> str:
    """A provider id as part of an event_id: kept if plainly safe, else hashed.

    Message-IDs look like ``<x@host>``: not a person's address, but they would trip any
    "no @ in output" check and can be long, so anything unusual is hashed (stable, so
    redelivery still maps to the same id).
    """
    return value if _SAFE_ID.fullmatch(value) else "h" + short_hash(value)


def compose_id(provider: str, *parts: str) -> str:
    return ":".join([provider, *(id_part(p) for p in parts)])


def bounded(value: str, salt: bytes) -> str:
    """A campaign id that is schema-safe and never an e-mail address."""
    if "@" in value:  # somebody tagged mails with an address: keep it countable, not readable
        return pseudonymise(value, salt)
    if len(value) > MAX_ID:
        return value[:200] + "~" + short_hash(value)
    return value


def campaign(candidates: Iterable[Any], salt: bytes) -> str:
    """First usable candidate in precedence order, else ``unknown``."""
    for candidate in candidates:
        found = first_text(candidate)
        if found:
            return bounded(found, salt)
    return UNKNOWN_CAMPAIGN


def scrub_url(value: Any, salt: bytes) -> str | None:
    """The clicked link without personal data.

    Unsubscribe and tracking links often carry the recipient's address in a query parameter
    or path segment; those parts are replaced by the keyed hash, userinfo is dropped, and a
    fragment containing an address is dropped. Other parts (utm_* etc.) are kept.
    """
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        parts = urlsplit(value.strip())
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return None
    netloc = host if port is None else f"{host}:{port}"
    if ":" in host:  # IPv6 literal
        netloc = f"[{host}]" if port is None else f"[{host}]:{port}"

    def clean(piece: str) -> str:
        return pseudonymise(piece, salt) if "@" in piece else piece

    segments = parts.path.split("/")
    path = "/".join(quote(clean(unquote(s)), safe=":") if "@" in unquote(s) else s for s in segments)
    query = parts.query
    if "@" in unquote(query):
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(clean(k), clean(v)) for k, v in pairs], safe=":")
    fragment = "" if "@" in unquote(parts.fragment) else parts.fragment
    out = urlunsplit((parts.scheme, netloc, path, query, fragment))
    return out[:MAX_URL]


# --------------------------------------------------------------------------- canonical events

FUNNEL_TYPES = frozenset({"send", "delivery", "bounce", "open", "click"})


def make_event(
    provider: str,
    *,
    event_id: str,
    type_: str,
    recipient: Any,
    timestamp: Any,
    campaign_id: str,
    salt: bytes,
    machine: bool = False,
    bot: bool = False,
    url: Any = None,
) -> dict[str, Any]:
    """One canonical event (``schemas/event.schema.json``); Skip when a required value is unusable."""
    address = text(recipient)
    if not address:
        raise Skip("no_recipient")
    if len(event_id) > MAX_ID:
        event_id = event_id[:200] + "~" + short_hash(event_id)
    event: dict[str, Any] = {
        "event_id": event_id,
        "type": type_,
        "channel": "email",
        "campaign_id": campaign_id,
        # always hashed, even without "@": a provider recipient field is an address, and a
        # mangled one must not leak either
        "subscriber_id": pseudonymise(address, salt),
        "timestamp": epoch(timestamp),
        "machine": bool(machine and type_ == "open"),
        "bot": bool(bot and type_ == "click"),
        "source": provider,
    }
    if type_ == "click":
        link = scrub_url(url, salt)
        if link:
            event["url"] = link
    return event


class Collector:
    """Accumulates a batch's outcome: events, ignored (no funnel meaning), malformed."""

    def __init__(self) -> None:
        self.result = ParsedWebhook()

    def add(self, build: Any, *args: Any, **kwargs: Any) -> None:
        """Call ``build`` for one provider event: it returns an event, None (ignored) or Skips.

        Any error inside one event's mapping (Skip, or a wrong type the mapper did not expect)
        only drops that event: one odd event must not cost the whole batch.
        """
        try:
            event = build(*args, **kwargs)
        except (Skip, WebhookError, ValueError, TypeError, KeyError, AttributeError, OverflowError):
            self.result.malformed += 1
            return
        if event is None:
            self.result.ignored += 1
        else:
            self.result.events.append(event)


# --------------------------------------------------------------------------- replay protection


class ReplayCache:
    """Remembers recently seen one-time tokens, bounded in size and time.

    ``seen(token, fingerprint, expires_at, now)`` returns True when the token was already used
    with a *different* fingerprint (the body hash): that is a forgery riding on a captured
    signature, because Mailgun's signature does not cover the body. The same token with the
    same body is a provider redelivery (e.g. after our 503) and is let through: event_id
    dedupe makes it harmless, and refusing it would lose the events.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def seen(self, token: str, fingerprint: str, expires_at: float, now: float) -> bool:
        with self._lock:
            entry = self._entries.get(token)
            if entry is not None and entry[0] > now:
                return not same(entry[1], fingerprint)
            self._entries.pop(token, None)
            if len(self._entries) >= self.max_entries:
                self._evict(now)
            self._entries[token] = (expires_at, fingerprint)
            return False

    def _evict(self, now: float) -> None:
        expired = [k for k, (exp, _) in self._entries.items() if exp <= now]
        for key in expired:
            del self._entries[key]
        # still full: drop the oldest insertions (dicts keep insertion order); these are the
        # ones closest to going stale anyway
        overflow = len(self._entries) - self.max_entries + 1
        for key in list(self._entries)[: max(overflow, 0)]:
            del self._entries[key]
