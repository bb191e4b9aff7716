"""Create every topic the pipeline uses before a worker subscribes, and wait until brokers show them.

Faust creates only the topics it calls internal (table changelogs), and only just before the
consumer subscribes. On Apache Kafka that raced: a topic created a moment earlier was not yet
in the broker's metadata when the group was assigned, Faust's assignor skipped it ("Ignoring
missing topic"), and the worker consumed nothing until the next metadata refresh five minutes
later. The raw topics were not declared at all: the first ingest request created them through
the broker's auto-creation, with the broker's partition count and replication factor instead
of ``PIPELINE_PARTITIONS`` / ``PIPELINE_REPLICATION``, and a broker with auto-creation off (the
usual production setting) refused them. Here every topic is created with the pipeline's
settings, and the worker starts only once every broker lists every partition with a leader.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, TopicAuthorizationFailedError, for_code
from aiokafka.protocol.metadata import MetadataRequest
from mode.utils.times import want_seconds


class TopicsError(RuntimeError):
    """A topic could not be created, or exists with a partition count the pipeline cannot use."""


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication: int
    config: dict[str, str] = field(default_factory=dict)


def specs_of(topic: Any, default_partitions: int, default_replication: int) -> list[TopicSpec]:
    """What Faust's own ``Topic.declare`` would ask the broker for, for each name of ``topic``."""
    config: dict[str, str] = {}
    policies = [name for name, on in (("compact", topic.compacting), ("delete", topic.deleting)) if on]
    if policies:
        config["cleanup.policy"] = ",".join(sorted(policies))
    if topic.retention:
        config["retention.ms"] = str(int(want_seconds(topic.retention) * 1000))
    config.update({k: str(v) for k, v in (topic.config or {}).items()})
    partitions = topic.partitions or default_partitions
    replication = topic.replicas or default_replication
    return [TopicSpec(name, partitions, replication, config) for name in topic.topics]


async def declare_topics(
    bootstrap: str, specs: list[TopicSpec], timeout: float = 60.0, options: Mapping[str, Any] | None = None
) -> None:
    """Create what is missing, check what exists, wait until every broker lists all of it.
    ``options``: the TLS and SASL options of :func:`pipeline.kafka.security.client_options`."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000), **(options or {})
    )
    await admin.start()
    try:
        wanted = {spec.name: spec for spec in specs}
        existing = set(await admin.list_topics())
        new = [
            NewTopic(s.name, s.partitions, s.replication, topic_configs=s.config)
            for s in specs
            if s.name not in existing
        ]
        if new:
            response = await admin.create_topics(new, timeout_ms=int(timeout * 1000))
            for name, code, message, *_ in response.topic_errors:
                error = for_code(code)
                if error is TopicAuthorizationFailedError:
                    raise TopicsError(
                        f"missing ACL: Create on topic {name} (a worker declares its topics at every "
                        "start, and Faust its own: see deploy/README.md, Secured Kafka)"
                    )
                if code and error is not TopicAlreadyExistsError:  # another worker was first
                    raise TopicsError(f"cannot create topic {name}: {error.__name__} {message or ''}")
        deadline = time.monotonic() + timeout
        while True:
            missing = await _not_ready_everywhere(admin, wanted)
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TopicsError(f"brokers did not list {sorted(missing)} within {timeout:.0f} s")
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def _not_ready_everywhere(admin: AIOKafkaAdminClient, wanted: dict[str, TopicSpec]) -> set[str]:
    """Topics some broker does not yet list with all partitions led; raises on a count mismatch."""
    client = admin._client
    await client.force_metadata_update()
    missing: set[str] = set()
    for broker in client.cluster.brokers():
        response = await client.send(broker.nodeId, MetadataRequest(list(wanted), False))
        for code, name, _internal, partitions, *_ in response.topics:
            led = [p for p in partitions if p[2] >= 0]
            if for_code(code) is TopicAuthorizationFailedError:
                raise TopicsError(f"missing ACL: Describe on topic {name}")
            if code or len(led) < len(partitions) or not partitions:
                missing.add(name)
            elif len(partitions) != wanted[name].partitions:
                raise TopicsError(
                    f"topic {name} has {len(partitions)} partitions, the pipeline wants "
                    f"{wanted[name].partitions} (PIPELINE_PARTITIONS): the count is fixed when the "
                    "topics are first created; use the count they were created with, or new topics"
                )
    return missing


def declare_pipeline_topics(
    bootstrap: str,
    topics: list[Any],
    partitions: int,
    replication: int,
    options: Mapping[str, Any] | None = None,
) -> None:
    """Blocking form for a worker about to start: runs on a loop of its own, not Faust's."""
    specs = [spec for topic in topics for spec in specs_of(topic, partitions, replication)]
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(declare_topics(bootstrap, specs, options=options))
    finally:
        loop.close()
