"""One stream worker: the Faust app, its HTTP endpoints and the ingest producer together."""

from __future__ import annotations

import logging
from typing import Any

import faust
import mode
from prometheus_client import CollectorRegistry

from pipeline.diagnosis.benchmarks import table_for_env
from pipeline.diagnosis.diagnose import diagnose_view
from pipeline.http.security import check_listeners, warn_open_endpoints
from pipeline.http.server import IngestService, WebApp
from pipeline.ingest.producer import EventProducer
from pipeline.ingest.webhooks import add_webhook_routes, unsupported_for_sources
from pipeline.kafka import compat
from pipeline.kafka.declare import TopicsError, declare_pipeline_topics
from pipeline.kafka.topics import PARTIALS_TOPIC, RAW_TOPICS
from pipeline.metrics.collector import FunnelCollector, HealthCounters, LagCollector
from pipeline.rules.aggregate import CampaignView
from pipeline.settings import Settings
from pipeline.stages.topology import Pipeline, create_pipeline

log = logging.getLogger(__name__)


def unsupported_rates(view: CampaignView) -> frozenset[str]:
    """Rates a campaign's sources cannot support, so they are reported as such, not wrong."""
    return unsupported_for_sources(view.sources)


class HttpService(mode.Service):
    def __init__(self, web: WebApp, producer: EventProducer, pipeline: Pipeline, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.web = web
        self.producer = producer
        self.pipeline = pipeline

    async def on_start(self) -> None:
        await self.web.start()

    async def on_stop(self) -> None:
        await self.web.stop()
        await self.producer.stop()


def consumer_lag(app: faust.App) -> dict[tuple[str, int], int]:
    lags: dict[tuple[str, int], int] = {}
    consumer = app.consumer
    watched = (*RAW_TOPICS, PARTIALS_TOPIC)
    for tp in consumer.assignment():
        if tp.topic not in watched:
            continue
        try:
            highwater = consumer.highwater(tp)
        except Exception:
            continue
        if highwater is None:
            continue
        read = compat.read_offset(consumer, tp)
        lags[(tp.topic, tp.partition)] = max(0, highwater - ((read + 1) if read is not None else 0))
    return lags


def build_worker(settings: Settings) -> tuple[Pipeline, HttpService]:
    check_listeners(settings)  # before anything starts: a refused start leaves nothing behind
    warn_open_endpoints(settings)
    if settings.env.get("PIPELINE_BENCHMARKS"):
        table_for_env(settings.env)  # a broken benchmarks file stops the start, not a scrape
    pipeline = create_pipeline(settings)
    registry = CollectorRegistry(auto_describe=False)
    counters = HealthCounters(registry)
    producer = EventProducer(settings)
    ingest = IngestService(settings, producer, counters)

    def diagnose_metric(view: CampaignView) -> tuple[str, str]:
        doc = diagnose_view(view, settings, unsupported_rates(view))
        return doc["bottleneck"], doc["advice"]

    registry.register(FunnelCollector(settings, pipeline.aggregate.views, unsupported_rates, diagnose_metric))
    registry.register(LagCollector(lambda: consumer_lag(pipeline.app), lambda: producer.healthy))
    web = WebApp(
        settings,
        ingest,
        registry,
        pipeline.aggregate.views,
        pipeline.consuming,
        unsupported_rates,
        diagnose=lambda view: diagnose_view(view, settings, unsupported_rates(view)),
        extra_routes=lambda web_app: add_webhook_routes(web_app, ingest, settings),
    )
    return pipeline, HttpService(web, producer, pipeline)


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    """Run until interrupted (SIGINT/SIGTERM stop it cleanly)."""
    pipeline, http = build_worker(settings)
    try:
        declare_pipeline_topics(
            settings.broker or "", pipeline.topics, settings.partitions, settings.replication
        )
    except TopicsError as exc:
        raise SystemExit(f"the worker cannot start: {exc}") from exc
    worker = faust.Worker(pipeline.app, http, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
