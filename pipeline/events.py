"""Canonical events: parsing request bodies and validating against ``schemas/``.

The JSON Schema file is the contract: ``schemas/`` at the top of the repository is the source,
and ``pipeline/schemas`` is a link to it, so the built package carries that very file. The
validator is compiled from it once at import (jsonschema-rs, in Rust), so nothing here restates
a field rule. A request's events are validated in one call for the whole batch (the schema
wrapped in an array); only a batch with an invalid event is gone through event by event, to
say which and why. What the schema cannot say (a timestamp too far in the future, normalising
an RFC 3339 time to epoch seconds) is checked after it.
"""

from __future__ import annotations

import math
from datetime import datetime
from importlib.resources import files
from typing import Any

import jsonschema_rs
import orjson

EVENT_SCHEMA_PATH = files("pipeline") / "schemas" / "event.schema.json"
EVENT_SCHEMA: dict[str, Any] = orjson.loads(EVENT_SCHEMA_PATH.read_bytes())
EVENT_TYPES: tuple[str, ...] = tuple(EVENT_SCHEMA["properties"]["type"]["enum"])
CHANNELS: tuple[str, ...] = tuple(EVENT_SCHEMA["properties"]["channel"]["enum"])
FIELDS: frozenset[str] = frozenset(EVENT_SCHEMA["properties"])

_VALIDATOR = jsonschema_rs.validator_for(EVENT_SCHEMA, validate_formats=True)
_BATCH_VALIDATOR = jsonschema_rs.validator_for(
    {"type": "array", "items": EVENT_SCHEMA}, validate_formats=True
)
# a value JSON Schema has no type for (an integer beyond 64 bits, an EventError from NDJSON)
_UNCHECKABLE = (ValueError, TypeError, OverflowError)


class BodyError(ValueError):
    """The request body cannot be read as JSON, a JSON array or NDJSON at all (HTTP 400)."""


class EventError(ValueError):
    """One event is invalid; ``reason`` is short, stable and free of personal data."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_body(body: bytes) -> list[Any]:
    """Split a body into items: one JSON object, a JSON array, or NDJSON (one object a line).

    Items are returned as decoded JSON values, or as :class:`EventError` for an NDJSON line
    that is not JSON, so one bad line does not sink the good ones around it.
    """
    text = body.strip()
    if not text:
        raise BodyError("empty body")
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError:
        doc = None
        lines = [line for line in text.split(b"\n") if line.strip()]
        if len(lines) < 2:
            raise BodyError("body is not JSON, a JSON array or NDJSON") from None
        items: list[Any] = []
        for line in lines:
            try:
                items.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                items.append(EventError("malformed_json"))
        if all(isinstance(item, EventError) for item in items):
            raise BodyError("body is not JSON, a JSON array or NDJSON") from None
        return items
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict):
        return [doc]
    raise BodyError("body must be a JSON object, an array of objects, or NDJSON")


def _epoch_seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise EventError("invalid_timestamp")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        try:
            seconds = datetime.fromisoformat(str(value)).timestamp()
        except ValueError:
            raise EventError("invalid_timestamp") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise EventError("invalid_timestamp")
    return seconds


# jsonschema-rs error kinds -> the schema keyword they report, for reasons like invalid_url:type
_KEYWORDS = {"OneOfNotValid": "oneOf", "OneOfMultipleValid": "oneOf", "AnyOf": "anyOf"}


def _reason(item: Any) -> str:
    """A short reason from the first schema error: which field, which rule; never the value."""
    try:
        error = next(_VALIDATOR.iter_errors(item), None)
    except _UNCHECKABLE:
        return "invalid_event:type"
    if error is None:
        return "invalid_event"
    path = ".".join(str(p) for p in error.instance_path)
    kind = type(error.kind).__name__
    if kind == "Required":
        return f"missing_field:{error.kind.property}"
    if kind in ("Enum", "Constant") and path:
        return f"unknown_{path}" if path in ("type", "channel") else f"invalid_{path}"
    if kind == "AdditionalProperties":
        return "unknown_field"
    rule = _KEYWORDS.get(kind) or (kind[:1].lower() + kind[1:])
    return f"invalid_{path}:{rule}" if path else f"invalid_event:{rule}"


def _schema_valid(item: Any) -> bool:
    try:
        return bool(_VALIDATOR.is_valid(item))
    except _UNCHECKABLE:
        return False


def validate_event(item: Any, now: float, max_future_skew: float) -> dict[str, Any]:
    """Return the normalised event (known fields only, epoch-seconds timestamp) or raise."""
    if isinstance(item, EventError):
        raise item
    if not isinstance(item, dict):
        raise EventError("not_an_object")
    if not _schema_valid(item):
        raise EventError(_reason(item))
    return _normalised({key: value for key, value in item.items() if key in FIELDS}, now + max_future_skew)


def _normalised(event: dict[str, Any], latest: float) -> dict[str, Any]:
    """What the schema cannot say, on an event it accepted (known fields only): epoch seconds,
    not too far in the future, a finite value."""
    timestamp = event["timestamp"]
    if type(timestamp) is not float:
        timestamp = event["timestamp"] = _epoch_seconds(timestamp)
    if timestamp > latest:
        raise EventError("timestamp_in_future")
    if "value" in event and not math.isfinite(event["value"]):
        raise EventError("invalid_value")
    return event


def validate_events(
    items: list[Any], now: float, max_future_skew: float
) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """Validate and normalise a request's items: (valid events in order, (index, reason) of the rest).

    The schema is checked once for the whole list; the items are normalised in place (they are
    the request's own, freshly decoded). Only when some item fails the schema is the list gone
    through item by item, with :func:`validate_event`'s rules and reasons.
    """
    latest = now + max_future_skew
    valid: list[dict[str, Any]] = []
    rejected: list[tuple[int, str]] = []
    if not schema_valid_all(items):
        for index, item in enumerate(items):
            try:
                valid.append(validate_event(item, now, max_future_skew))
            except EventError as exc:
                rejected.append((index, exc.reason))
        return valid, rejected
    append = valid.append
    for index, item in enumerate(items):
        try:
            append(normalise_schema_valid(item, latest))
        except EventError as exc:
            rejected.append((index, exc.reason))
    return valid, rejected


def schema_valid_all(items: list[Any]) -> bool:
    """Whether every item passes the schema, checked in one call for the whole list."""
    try:
        return bool(_BATCH_VALIDATOR.is_valid(items))
    except _UNCHECKABLE:
        return False


def normalise_schema_valid(item: dict[str, Any], latest: float) -> dict[str, Any]:
    """:func:`validate_event` for an item the schema accepted (:func:`schema_valid_all`):
    known fields only, epoch seconds, no later than ``latest``; normalised in place."""
    event = item if item.keys() <= FIELDS else {k: v for k, v in item.items() if k in FIELDS}
    return _normalised(event, latest)


def routing_key(event: dict[str, Any]) -> str:
    """The key that decides an event's partition: its subscriber, else its own id.

    Every event of one subscriber lands on one partition, so redelivery and per-subscriber
    uniqueness are decided locally, while one campaign spreads over all partitions.
    """
    return event.get("subscriber_id") or "#" + event["event_id"]
