"""The ingest service: validate, pseudonymise, dead-letter and publish a batch of events.

Shared by ``POST /events`` and every provider's webhook (:mod:`pipeline.http.webhooks`); it
answers nothing over HTTP itself, so the listeners decide status codes.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pipeline.events import validate_events
from pipeline.ingest.identity import looks_like_address, pseudonymise
from pipeline.ingest.producer import EventProducer
from pipeline.metrics.collector import HealthCounters
from pipeline.settings import Settings


class Overloaded(RuntimeError):
    """More events are waiting for the broker than the bound allows: answer 503, retry later."""


class IngestService:
    """Validate, pseudonymise, dead-letter and publish; shared by ``/events`` and the webhooks."""

    def __init__(self, settings: Settings, producer: EventProducer, counters: HealthCounters) -> None:
        self.settings = settings
        self.producer = producer
        self.counters = counters
        self.in_flight = 0  # events accepted from clients and not yet acknowledged by the broker

    def prepare(self, items: list[Any]) -> tuple[list[dict[str, Any]], list[tuple[int, Any, str]]]:
        """(valid events, (index, item, reason) of the rejected ones): one validation per batch."""
        salt = self.settings.id_salt
        for item in items:
            # an address must not reach a topic in clear, not even the dead-letter topic
            if type(item) is dict:
                value = item.get("subscriber_id")
                if type(value) is str and looks_like_address(value):
                    item["subscriber_id"] = pseudonymise(value, salt)
        valid, reasons = validate_events(items, time.time(), self.settings.max_future_skew)
        return valid, [(index, items[index], reason) for index, reason in reasons]

    async def submit(
        self, valid: list[dict[str, Any]], rejected: list[tuple[int, Any, str]], source: str
    ) -> None:
        """Publish and dead-letter; returns only when the broker acknowledged all of it.

        Memory is bounded: past ``max_in_flight_events`` waiting for the broker, new requests
        get 503 at once (back-pressure) instead of queueing without limit.
        """
        size = len(valid) + len(rejected)
        if self.in_flight and self.in_flight + size > self.settings.max_in_flight_events:
            raise Overloaded(f"{self.in_flight} events already waiting for the broker")
        self.in_flight += size
        try:
            await self._submit(valid, rejected, source)
        finally:
            self.in_flight -= size

    async def _submit(
        self, valid: list[dict[str, Any]], rejected: list[tuple[int, Any, str]], source: str
    ) -> None:
        tasks = []
        if valid:
            tasks.append(self.producer.publish(valid))
        if rejected:
            tasks.append(
                self.producer.dead_letter(
                    (_jsonable(item), reason, {"source": source, "index": index})
                    for index, item, reason in rejected
                )
            )
        await asyncio.gather(*tasks)
        self.counters.ingested.labels(source).inc(len(valid))
        for _, _, reason in rejected:
            self.counters.rejected.labels(reason).inc()
            self.counters.dead_lettered.labels(reason).inc()


def _jsonable(item: Any) -> Any:
    return item.reason if isinstance(item, Exception) else item
