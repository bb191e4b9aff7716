"""Publish validated events to the raw topics and acknowledge only what the broker acked.

Events are grouped by the partition Kafka's default partitioner gives their routing key, and
each group travels as one message holding an array of events: the stream processor pays its
per-message cost once per group, not once per event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import ClusterAuthorizationFailedError, KafkaError, NoError, for_code
from aiokafka.protocol.transaction import InitProducerIdRequest

from pipeline.events import routing_key
from pipeline.kafka.security import client_options
from pipeline.kafka.topics import (
    DEAD_LETTER_TOPIC,
    RAW_TOPIC_OF,
    VALIDATED_HEADER,
    VALIDATED_VALUE,
    partition_for,
)
from pipeline.settings import Settings

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 900_000  # under the broker's default 1 MB message limit
# the events of these messages passed validate_event here: the dedupe stage need not repeat it
HEADERS = [(VALIDATED_HEADER, VALIDATED_VALUE)]


class BrokerUnavailable(RuntimeError):
    """The broker did not acknowledge in time: the client should retry (HTTP 503)."""


class EventProducer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._partitions: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._healthy = False
        self.on_health: Callable[[bool], None] | None = None  # told every time `healthy` is set
        self.idempotent: bool | None = None  # decided once, at the first connection

    @property
    def healthy(self) -> bool:
        """The last exchange with the broker succeeded."""
        return self._healthy

    @healthy.setter
    def healthy(self, value: bool) -> None:
        self._healthy = value
        if self.on_health is not None:
            self.on_health(value)

    async def _broker_gives_producer_ids(self) -> bool:
        """Ask the broker once for a producer id, as the idempotent producer would.

        Apache Kafka answers with an id. The embedded broker (Tansu) answers UnknownError; an
        idempotent producer would then retry InitProducerId forever and every send would time
        out, so ingest falls back to a plain producer (acks=all still) and says so once.
        Retriable answers (a coordinator still loading) are retried until the send timeout.
        """
        client = AIOKafkaClient(
            bootstrap_servers=self.settings.broker,
            request_timeout_ms=int(self.settings.send_timeout * 1000),
            **client_options(self.settings),
        )
        deadline = time.monotonic() + self.settings.send_timeout
        try:
            await asyncio.wait_for(client.bootstrap(), self.settings.send_timeout)
            while True:
                try:
                    response = await client.send(
                        client.get_random_node(), InitProducerIdRequest(None, 60_000)
                    )
                    error = for_code(response.error_code)
                except KafkaError as exc:
                    error = type(exc)
                if error is NoError:
                    return True
                if not error.retriable:
                    break
                if time.monotonic() > deadline:
                    raise BrokerUnavailable(f"no producer id from the broker: {error.__name__}")
                await asyncio.sleep(0.2)
        except (TimeoutError, KafkaError, OSError) as exc:
            raise BrokerUnavailable(f"broker not reachable: {exc.__class__.__name__}") from exc
        finally:
            await client.close()
        if error is ClusterAuthorizationFailedError:
            log.warning(
                "missing ACL: InitProducerId refused (ClusterAuthorizationFailed): grant Write on the "
                "raw topics (or IdempotentWrite on the cluster) for the idempotent producer; ingest "
                "uses a non-idempotent producer meanwhile"
            )
            return False
        log.warning(
            "the broker at %s does not give out producer ids (InitProducerId answered %s): ingest "
            "uses a non-idempotent producer (acks=all; a send retried after a lost "
            "acknowledgement can store an event twice, and the event-id dedupe drops the copy). "
            "PIPELINE_IDEMPOTENT_PRODUCER=false chooses this without asking the broker.",
            self.settings.broker,
            error.__name__,
        )
        return False

    async def _ensure(self) -> AIOKafkaProducer:
        if self._producer is not None:
            return self._producer
        async with self._lock:
            if self._producer is None:
                if self.idempotent is None:
                    self.idempotent = self.settings.idempotent_producer and (
                        await self._broker_gives_producer_ids()
                    )
                producer = AIOKafkaProducer(
                    bootstrap_servers=self.settings.broker,
                    acks="all",
                    enable_idempotence=self.idempotent,
                    linger_ms=2,
                    max_batch_size=1024 * 1024,
                    max_request_size=4 * 1024 * 1024,
                    request_timeout_ms=int(self.settings.send_timeout * 1000),
                    compression_type=None,
                    **client_options(self.settings),
                )
                try:
                    await asyncio.wait_for(producer.start(), self.settings.send_timeout)
                except (TimeoutError, KafkaError, OSError) as exc:
                    await producer.stop()
                    raise BrokerUnavailable(f"broker not reachable: {exc.__class__.__name__}") from exc
                self._producer = producer
                self.healthy = True
        return self._producer

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def _partition_count(self, producer: AIOKafkaProducer, topic: str) -> int:
        count = self._partitions.get(topic)
        if count is None:
            partitions = await producer.partitions_for(topic)
            count = self._partitions[topic] = len(partitions) if partitions else self.settings.partitions
        return count

    async def publish(self, events: list[dict[str, Any]]) -> None:
        """Send every event; return once the broker acknowledged all of them, else raise.

        ``events`` must be what :func:`pipeline.events.validate_event` returned: the messages
        are marked validated, and the dedupe stage trusts the mark.
        """
        try:
            producer = await self._ensure()
            # one pass: events grouped by (type, partition) in order, C hashing per event; the
            # key hashed is pipeline.events.routing_key's, written out here
            groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
            counts: dict[str, int] = {}
            for event in events:
                kind = event["type"]
                count = counts.get(kind)
                if count is None:
                    count = counts[kind] = await self._partition_count(producer, RAW_TOPIC_OF[kind])
                where = (kind, partition_for(event.get("subscriber_id") or "#" + event["event_id"], count))
                group = groups.get(where)
                if group is None:
                    groups[where] = [event]
                else:
                    group.append(event)
            futures = []
            for (kind, partition), group in groups.items():
                for chunk, value in _chunks(group, self.settings.events_per_message):
                    futures.append(
                        await producer.send(
                            RAW_TOPIC_OF[kind],
                            value=value,
                            key=routing_key(chunk[0]).encode(),
                            partition=partition,
                            headers=HEADERS,
                        )
                    )
            await asyncio.wait_for(asyncio.gather(*futures), self.settings.send_timeout)
            self.healthy = True
        except BrokerUnavailable:
            self.healthy = False
            raise
        except (TimeoutError, KafkaError, OSError) as exc:
            await self._reset()
            raise BrokerUnavailable(f"broker did not acknowledge: {exc.__class__.__name__}") from exc

    async def dead_letter(self, items: Iterable[tuple[Any, str, dict[str, Any]]]) -> None:
        try:
            producer = await self._ensure()
            futures = [
                await producer.send(
                    DEAD_LETTER_TOPIC,
                    value=orjson.dumps({"reason": reason, "where": where, "event": item}, default=str),
                )
                for item, reason, where in items
            ]
            await asyncio.wait_for(asyncio.gather(*futures), self.settings.send_timeout)
            self.healthy = True
        except BrokerUnavailable:
            self.healthy = False
            raise
        except (TimeoutError, KafkaError, OSError) as exc:
            await self._reset()
            raise BrokerUnavailable(f"broker did not acknowledge: {exc.__class__.__name__}") from exc

    async def _reset(self) -> None:
        """Drop a producer that failed, so the next request reconnects from scratch."""
        self.healthy = False
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await asyncio.wait_for(producer.stop(), 5)
            except Exception:
                log.warning("producer did not stop cleanly")


def _chunks(events: list[dict[str, Any]], size: int) -> Iterable[tuple[list[dict[str, Any]], bytes]]:
    """Split into messages of at most ``size`` events and ``MAX_MESSAGE_BYTES`` bytes.

    Each piece is encoded once as a whole; only a piece over the byte limit is halved and
    encoded again, so the common case costs one ``orjson.dumps`` per message, not per event.
    """
    stack = [events[i : i + size] for i in range(0, len(events), size)][::-1]
    while stack:
        chunk = stack.pop()
        value = orjson.dumps(chunk)
        if len(value) <= MAX_MESSAGE_BYTES or len(chunk) == 1:
            yield chunk, value
        else:
            half = len(chunk) // 2
            stack.append(chunk[half:])
            stack.append(chunk[:half])
