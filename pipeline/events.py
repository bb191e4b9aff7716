"""Canonical events: parsing request bodies and validating against ``schemas/``.

The JSON Schema file is the contract: ``schemas/`` at the top of the repository is the source,
and ``pipeline/schemas`` is a link to it, so the built package carries that very file. The
validator is compiled from it once at import (fastjsonschema generates Python code from the
schema), so nothing here restates a field rule.
What the schema cannot say (a timestamp too far in the future, normalising an RFC 3339 time to
epoch seconds) is checked after it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime
from importlib.resources import files
from typing import Any

import fastjsonschema
import orjson

EVENT_SCHEMA_PATH = files("pipeline") / "schemas" / "event.schema.json"
EVENT_SCHEMA: dict[str, Any] = orjson.loads(EVENT_SCHEMA_PATH.read_bytes())
EVENT_TYPES: tuple[str, ...] = tuple(EVENT_SCHEMA["properties"]["type"]["enum"])
CHANNELS: tuple[str, ...] = tuple(EVENT_SCHEMA["properties"]["channel"]["enum"])
FIELDS: frozenset[str] = frozenset(EVENT_SCHEMA["properties"])

_validate = fastjsonschema.compile(EVENT_SCHEMA)


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


def _reason(exc: fastjsonschema.JsonSchemaValueException) -> str:
    """A short reason from the schema error: which field, which rule; never the value."""
    path = ".".join(str(p) for p in exc.path[1:]) if exc.path else ""
    rule = exc.rule or "invalid"
    if rule == "required":
        return f"missing_field:{exc.message.split('must contain [')[-1].split(']')[0]}".replace("'", "")
    if rule in ("enum", "const") and path:
        return f"unknown_{path}" if path in ("type", "channel") else f"invalid_{path}"
    if rule == "additionalProperties":
        return "unknown_field"
    if path:
        return f"invalid_{path}:{rule}"
    return f"invalid_event:{rule}"


def validate_event(item: Any, now: float, max_future_skew: float) -> dict[str, Any]:
    """Return the normalised event (known fields only, epoch-seconds timestamp) or raise."""
    if isinstance(item, EventError):
        raise item
    if not isinstance(item, dict):
        raise EventError("not_an_object")
    try:
        _validate(item)
    except fastjsonschema.JsonSchemaValueException as exc:
        raise EventError(_reason(exc)) from None
    event = {key: value for key, value in item.items() if key in FIELDS}
    event["timestamp"] = _epoch_seconds(item["timestamp"])
    if event["timestamp"] > now + max_future_skew:
        raise EventError("timestamp_in_future")
    if "value" in event and not math.isfinite(event["value"]):
        raise EventError("invalid_value")
    return event


def routing_key(event: dict[str, Any]) -> str:
    """The key that decides an event's partition: its subscriber, else its own id.

    Every event of one subscriber lands on one partition, so redelivery and per-subscriber
    uniqueness are decided locally, while one campaign spreads over all partitions.
    """
    return event.get("subscriber_id") or "#" + event["event_id"]


def iter_valid(
    items: Iterable[Any], now: float, skew: float
) -> Iterable[tuple[int, dict | None, str | None]]:
    for index, item in enumerate(items):
        try:
            yield index, validate_event(item, now, skew), None
        except EventError as exc:
            yield index, None, exc.reason
