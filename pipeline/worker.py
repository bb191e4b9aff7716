"""One stream worker: the Faust app and its HTTP endpoints, with ingest in processes of its own
beside it (:mod:`pipeline.ingest.processes`), or in the same process on one CPU."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping
from typing import Any

import faust
import mode
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from pipeline.diagnosis.benchmarks import table_for_env
from pipeline.diagnosis.diagnose import diagnose_view
from pipeline.http.security import check_listeners, warn_open_endpoints
from pipeline.http.server import PUBLIC, STREAM, WebApp
from pipeline.http.webhooks import add_webhook_routes, unsupported_for_sources
from pipeline.ingest.processes import (
    SHARED_COUNTERS_DIR,
    IngestProcesses,
    ingest_process_count,
    share_counters,
)
from pipeline.ingest.producer import EventProducer
from pipeline.ingest.service import IngestService
from pipeline.kafka import compat
from pipeline.kafka.declare import TopicsError, declare_pipeline_topics
from pipeline.kafka.security import KafkaAccessError, client_options, describe, explain, run_check_connection
from pipeline.kafka.topics import PARTIALS_TOPIC, RAW_TOPICS
from pipeline.metrics.collector import FunnelCollector, HealthCounters, LagCollector, MovedCollector
from pipeline.rules.aggregate import CampaignView
from pipeline.settings import Settings
from pipeline.stages.topology import Pipeline, create_pipeline

log = logging.getLogger(__name__)


def unsupported_rates(view: CampaignView) -> frozenset[str]:
    """Rates a campaign's sources cannot support, so they are reported as such, not wrong."""
    return unsupported_for_sources(view.sources)


class HttpService(mode.Service):
    def __init__(
        self,
        web: WebApp,
        producer: EventProducer | None,
        pipeline: Pipeline,
        ingest_processes: IngestProcesses | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.web = web
        self.producer = producer
        self.pipeline = pipeline
        self.ingest_processes = ingest_processes

    async def on_start(self) -> None:
        await self.web.start()
        if self.ingest_processes is not None:
            settings = self.pipeline.settings
            # without an admin port, the ingest processes forward /health, /metrics and
            # /campaigns from the public port to this process's loopback-only listener
            upstream = (
                None if settings.admin_port is not None else f"http://127.0.0.1:{self.web.internal_port}"
            )
            self.ingest_processes.start(upstream)
            log.info("%d ingest process(es) on port %d", self.ingest_processes.count, settings.port)

    @mode.Service.task
    async def _watch_ingest_processes(self) -> None:
        processes = self.ingest_processes
        if processes is None:
            return
        while not self.should_stop:
            processes.poll()
            if processes.failed:
                log.critical("the worker stops: %s", processes.failed)
                os.kill(os.getpid(), signal.SIGTERM)  # a clean stop; run_worker exits non-zero
                return
            await self.sleep(0.2)

    async def on_stop(self) -> None:
        if self.ingest_processes is not None:
            self.ingest_processes.stop()  # they finish the requests they hold first
        await self.web.stop()
        if self.producer is not None:
            await self.producer.stop()


def consumer_lag(app: faust.App, processed: Mapping[Any, int]) -> dict[tuple[str, int], int]:
    """Messages not yet processed, per owned partition: the log's end minus the first offset
    not yet processed. For a raw partition that is what the dedupe stage made durable
    (``processed``), so the messages Faust has fetched and holds in its buffers, up to
    thousands under a backlog, count as the lag they are; for the others, what Faust read."""
    lags: dict[tuple[str, int], int] = {}
    consumer = app.consumer
    watched = (*RAW_TOPICS, PARTIALS_TOPIC)
    for tp in consumer.assignment():
        if tp.topic not in watched:
            continue
        highwater = compat.end_offset(app, tp)
        if highwater is None:
            continue
        done = processed.get(tp)
        if done is None:
            read = compat.read_offset(consumer, tp)
            done = read + 1 if read is not None else 0
        lags[(tp.topic, tp.partition)] = max(0, highwater - done)
    return lags


def build_worker(settings: Settings, loglevel: str = "info") -> tuple[Pipeline, HttpService]:
    check_listeners(settings)  # before anything starts: a refused start leaves nothing behind
    warn_open_endpoints(settings)
    if settings.env.get("PIPELINE_BENCHMARKS"):
        table_for_env(settings.env)  # a broken benchmarks file stops the start, not a scrape
    pipeline = create_pipeline(settings)
    registry = CollectorRegistry(auto_describe=False)
    count = ingest_process_count(settings)
    processes: IngestProcesses | None = None
    producer: EventProducer | None = None
    ingest: IngestService | None = None
    if count:
        directory = settings.data_dir.resolve() / SHARED_COUNTERS_DIR
        share_counters(directory)
        counters = HealthCounters(None)
        MultiProcessCollector(registry, path=str(directory))
        processes = IngestProcesses(settings, count, directory, loglevel)
    else:
        counters = HealthCounters(registry)
        producer = EventProducer(settings)
        ingest = IngestService(settings, producer, counters)

    def diagnose_metric(view: CampaignView) -> tuple[str, str]:
        doc = diagnose_view(view, settings, unsupported_rates(view))
        return doc["bottleneck"], doc["advice"]

    def consuming() -> bool:
        return pipeline.consuming() and (processes is None or processes.ready)

    # the funnel families are written by the collector itself (fast, cached per campaign)
    funnel = FunnelCollector(settings, pipeline.aggregate.views, unsupported_rates, diagnose_metric)
    broker_up = (lambda: producer.healthy) if producer is not None else None
    sequencer = pipeline.dedupe.sequencer  # a new account at each assignment: read at scrape time
    registry.register(LagCollector(lambda: consumer_lag(pipeline.app, sequencer.durable), broker_up))
    registry.register(MovedCollector(lambda: dict(pipeline.dedupe.moved)))
    # events the stream stages dead-letter (a direct producer's invalid ones) count as the ingest's do
    pipeline.dead_lettered = lambda reason, n: counters.dead_lettered.labels(reason).inc(n)
    extra_routes = None
    if ingest is not None:
        service = ingest
        extra_routes = lambda web_app: add_webhook_routes(web_app, service, settings)  # noqa: E731
    web = WebApp(
        settings,
        counters,
        registry,
        pipeline.aggregate.views,
        consuming,
        unsupported_rates,
        diagnose=lambda view: diagnose_view(view, settings, unsupported_rates(view)),
        extra_routes=extra_routes,
        ingest=ingest,
        role=STREAM if processes is not None else PUBLIC,
        exposition=funnel.exposition,
    )
    return pipeline, HttpService(web, producer, pipeline, processes)


def quiet_faust_worker(worker: faust.Worker) -> None:
    """No terminal spinner. At log levels of WARNING and above, Faust's worker sets the root
    logger to DEBUG so that its spinner turns on every log record: then every debug call of
    Faust and aiokafka (several per message sent) builds a record, about 7 % of the stream
    worker's time under load, and the log file gets the spinner's terminal codes."""
    worker.spinner = None


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    """Run until interrupted (SIGINT/SIGTERM stop it cleanly)."""
    try:
        pipeline, http = build_worker(settings, loglevel)
        # a wrong password, an untrusted certificate, a missing ACL: said now, by name
        run_check_connection(settings)
        declare_pipeline_topics(
            settings.broker or "",
            pipeline.topics,
            settings.partitions,
            settings.replication,
            client_options(settings),
        )
    except (TopicsError, KafkaAccessError) as exc:
        raise SystemExit(f"the worker cannot start: {exc}") from exc
    except KafkaError as exc:
        reason = explain(exc, settings)
        if reason is None:
            raise
        raise SystemExit(f"the worker cannot start: Kafka ({describe(settings)}): {reason}") from exc
    worker = faust.Worker(pipeline.app, http, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    quiet_faust_worker(worker)
    try:
        worker.execute_from_commandline()
    finally:
        if http.ingest_processes is not None and http.ingest_processes.failed:
            raise SystemExit(f"the worker stopped: {http.ingest_processes.failed}")
