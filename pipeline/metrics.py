"""Prometheus exposition: funnel metrics read from the processing state at scrape time.

The collector walks the campaigns this worker owns (the aggregate table's active partitions)
and derives every counter, gauge and rate from them, so nothing on the hot path touches a
metric and a restarted or rebalanced worker exports exactly what its state says.
Ingest-side health counters are ordinary process counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pipeline.aggregate import CampaignView
from pipeline.dedupe import TOTAL_EVENTS, UNIQUE_EVENTS
from pipeline.rates import compute_rates
from pipeline.settings import Settings

# the contract's event labels: every total the dedupe stage keeps except its internal bot_click
TOTAL_LABELS = tuple(name for name in TOTAL_EVENTS if name != "bot_click")
UNIQUE_LABELS = UNIQUE_EVENTS
WINDOW_COUNT_LABELS = TOTAL_LABELS + tuple(f"unique_{name}" for name in UNIQUE_LABELS)


def select_campaigns(views: list[CampaignView], limit: int) -> tuple[list[CampaignView], int]:
    """The ``limit`` most recently active campaigns, and how many were left out."""
    if len(views) <= limit:
        return views, 0
    ranked = sorted(views, key=lambda v: v.watermark, reverse=True)
    return ranked[:limit], len(views) - limit


class FunnelCollector(Collector):
    def __init__(
        self,
        settings: Settings,
        views: Callable[[], list[CampaignView]],
        unsupported: Callable[[CampaignView], frozenset[str]] = lambda view: frozenset(),
        diagnose: Callable[[CampaignView], tuple[str, str]] | None = None,
    ) -> None:
        self.settings = settings
        self.views = views
        self.unsupported = unsupported
        self.diagnose = diagnose

    def describe(self) -> Iterable[Metric]:
        return []  # collected lazily: no scrape at registration time

    def collect(self) -> Iterator[Metric]:
        settings = self.settings
        views, overflow = select_campaigns(self.views(), settings.max_campaigns)
        events = CounterMetricFamily(
            "funnel_events", "Events after event_id deduplication", labels=["channel", "campaign", "event"]
        )
        uniques = CounterMetricFamily(
            "funnel_unique_events",
            "Distinct subscribers with at least one such event (open includes clickers)",
            labels=["channel", "campaign", "event"],
        )
        rates = GaugeMetricFamily(
            "funnel_rate",
            "Funnel rate (0..1); absent without a sample",
            labels=["channel", "campaign", "rate", "window"],
        )
        window_events = GaugeMetricFamily(
            "funnel_window_events",
            "Counts in the most recent complete event-time window",
            labels=["channel", "campaign", "window", "event"],
        )
        window_end = GaugeMetricFamily(
            "funnel_window_end_seconds",
            "Event-time end of the window shown",
            labels=["channel", "campaign", "window"],
        )
        diagnosis = GaugeMetricFamily(
            "funnel_diagnosis", "1 for the current bottleneck", labels=["channel", "campaign", "bottleneck"]
        )
        diagnosis_info = GaugeMetricFamily(
            "funnel_diagnosis_info",
            "1, carrying the advice for the current bottleneck",
            labels=["channel", "campaign", "bottleneck", "advice"],
        )
        duplicates: dict[str, int] = {}
        late: dict[str, int] = {}
        for view in views:
            ch, camp = view.channel, view.campaign
            for name in TOTAL_LABELS:
                events.add_metric([ch, camp, name], view.totals.get(name, 0))
            for name in UNIQUE_LABELS:
                uniques.add_metric([ch, camp, name], view.totals.get(f"unique_{name}", 0))
            unsupported = self.unsupported(view)
            windows: list[tuple[str, dict[str, int]]] = [("all", view.totals)]
            for label, shown in view.complete_windows(settings.window_labels, settings.allowed_lateness):
                windows.append((label, shown.counts))
                window_end.add_metric([ch, camp, label], shown.end)
                for name in WINDOW_COUNT_LABELS:
                    window_events.add_metric([ch, camp, label, name], shown.counts.get(name, 0))
            for label, counts in windows:
                for rate, value in compute_rates(ch, counts, settings.email_denominator, unsupported).items():
                    if value is not None:
                        rates.add_metric([ch, camp, rate, label], value)
            if self.diagnose is not None:
                bottleneck, advice = self.diagnose(view)
                diagnosis.add_metric([ch, camp, bottleneck], 1)
                diagnosis_info.add_metric([ch, camp, bottleneck, advice], 1)
            duplicates[ch] = duplicates.get(ch, 0) + view.duplicates
            late[ch] = late.get(ch, 0) + view.late
        dup_family = CounterMetricFamily(
            "pipeline_duplicates_dropped", "Redeliveries and repeated orders dropped", labels=["channel"]
        )
        late_family = CounterMetricFamily(
            "pipeline_late_events",
            "Events later than the allowed lateness (counted in window=all only)",
            labels=["channel"],
        )
        for ch, value in duplicates.items():
            dup_family.add_metric([ch], value)
        for ch, value in late.items():
            late_family.add_metric([ch], value)
        overflow_family = GaugeMetricFamily(
            "pipeline_campaigns_overflow", "Campaigns owned but not exported (PIPELINE_MAX_CAMPAIGNS)"
        )
        overflow_family.add_metric([], overflow)
        families: list[Any] = [
            events,
            uniques,
            rates,
            window_events,
            window_end,
            dup_family,
            late_family,
            overflow_family,
        ]
        if self.diagnose is not None:
            families += [diagnosis, diagnosis_info]
        yield from families


class LagCollector(Collector):
    """Consumer lag per owned partition, and whether this process's ingest reaches the broker
    (``broker_up`` None: ingest runs in processes of its own, which export that gauge)."""

    def __init__(
        self, lag: Callable[[], dict[tuple[str, int], int]], broker_up: Callable[[], bool] | None
    ) -> None:
        self.lag = lag
        self.broker_up = broker_up

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "pipeline_consumer_lag",
            "Messages not yet processed, per owned partition",
            labels=["topic", "partition"],
        )
        for (topic, partition), lag in sorted(self.lag().items()):
            family.add_metric([topic, str(partition)], lag)
        yield family
        if self.broker_up is not None:
            up = GaugeMetricFamily("pipeline_broker_up", BROKER_UP_HELP)
            up.add_metric([], 1 if self.broker_up() else 0)
            yield up


BROKER_UP_HELP = "1 when the broker acknowledges this worker"


class HealthCounters:
    """Counters of the ingest side.

    ``registry`` None: the counters are not registered anywhere, because this process shares
    them with its sibling processes through prometheus_client's multiprocess files, and the
    stream worker's ``/metrics`` sums those (:mod:`pipeline.ingest.processes`).
    """

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.ingested = Counter(
            "pipeline_events_ingested",
            "Events accepted and acknowledged by the broker",
            ["source"],
            registry=registry,
        )
        self.rejected = Counter(
            "pipeline_events_rejected", "Events rejected at ingest", ["reason"], registry=registry
        )
        self.dead_lettered = Counter(
            "pipeline_dead_lettered", "Events written to the dead-letter topic", ["reason"], registry=registry
        )
        self.requests = Counter(
            "pipeline_http_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=registry,
        )
        self.signature_failures = Counter(
            "pipeline_webhook_signature_failures",
            "Webhook requests refused for their signature",
            ["provider"],
            registry=registry,
        )
        self.ignored = Counter(
            "pipeline_webhook_events_ignored",
            "Provider events with no funnel meaning",
            ["provider"],
            registry=registry,
        )


def broker_up_gauge() -> Gauge:
    """``pipeline_broker_up`` of an ingest process, shared with the others: the lowest value
    over the live processes, so one that cannot reach the broker shows as 0."""
    return Gauge("pipeline_broker_up", BROKER_UP_HELP, registry=None, multiprocess_mode="livemin")
