"""Prometheus exposition: funnel metrics read from the processing state at scrape time.

The collector walks the campaigns this worker owns (the aggregate table's active partitions)
and derives every counter, gauge and rate from them, so nothing on the hot path touches a
metric and a restarted or rebalanced worker exports exactly what its state says.
Ingest-side health counters are ordinary process counters.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from pipeline.rules.aggregate import CampaignView
from pipeline.rules.dedupe import TOTAL_EVENTS, UNIQUE_EVENTS
from pipeline.rules.rates import compute_rates
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


# (name as exported, type, help, label names) of the per-campaign families, in output order
CAMPAIGN_FAMILIES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    (
        "funnel_events_total",
        "counter",
        "Events after event_id deduplication",
        ("channel", "campaign", "event"),
    ),
    (
        "funnel_unique_events_total",
        "counter",
        "Distinct subscribers with at least one such event (open includes clickers)",
        ("channel", "campaign", "event"),
    ),
    (
        "funnel_rate",
        "gauge",
        "Funnel rate (0..1); absent without a sample",
        ("channel", "campaign", "rate", "window"),
    ),
    (
        "funnel_window_events",
        "gauge",
        "Counts in the most recent complete event-time window",
        ("channel", "campaign", "window", "event"),
    ),
    (
        "funnel_window_end_seconds",
        "gauge",
        "Event-time end of the window shown",
        ("channel", "campaign", "window"),
    ),
    ("funnel_diagnosis", "gauge", "1 for the current bottleneck", ("channel", "campaign", "bottleneck")),
    (
        "funnel_diagnosis_info",
        "gauge",
        "1, carrying the advice for the current bottleneck",
        ("channel", "campaign", "bottleneck", "advice"),
    ),
)
EVENTS, UNIQUES, RATES, WINDOW_EVENTS, WINDOW_END, DIAGNOSIS, DIAGNOSIS_INFO = range(len(CAMPAIGN_FAMILIES))
Samples = list[list[tuple[tuple[str, ...], float]]]  # per family: (label values, value)


@functools.lru_cache(maxsize=65536)  # campaign names, labels and advice repeat on every line
def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _line_template(family: int) -> tuple[str, tuple[int, ...]]:
    """``name{a="%s",b="%s"} %s`` with the labels in name order (as prometheus_client writes
    them), and the order in which a sample's label values fill it."""
    name, _, _, labels = CAMPAIGN_FAMILIES[family]
    order = tuple(sorted(range(len(labels)), key=lambda i: labels[i]))
    return name + "{" + ",".join(f'{labels[i]}="%s"' for i in order) + "} %s\n", order


TEMPLATES = [_line_template(family) for family in range(len(CAMPAIGN_FAMILIES))]


def _number(value: float) -> str:
    if type(value) is int and -(10**15) < value < 10**15:
        return f"{value}.0"  # what floatToGoString gives for these, without its float detour
    return floatToGoString(value)


def _sample_lines(family: int, samples: list[tuple[tuple[str, ...], float]]) -> bytes:
    """Text-format lines of one family's samples."""
    template, order = TEMPLATES[family]
    escape = _escape
    return "".join(
        [template % (*[escape(values[i]) for i in order], _number(value)) for values, value in samples]
    ).encode("utf-8")


class FunnelCollector(Collector):
    """The funnel families, computed from the campaign views at scrape time.

    :meth:`exposition` writes them as Prometheus text itself, and keeps each campaign's lines
    until that campaign's view changes (a view object stands for one stored state of the
    campaign), so a scrape costs little for campaigns that did not move since the last one.
    :meth:`collect` gives the same samples as metric families.
    """

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
        self._rendered: dict[tuple[str, str], tuple[CampaignView, list[bytes]]] = {}

    def describe(self) -> Iterable[Metric]:
        return []  # collected lazily: no scrape at registration time

    def samples(self, view: CampaignView) -> Samples:
        """Every sample one campaign contributes, per family of :data:`CAMPAIGN_FAMILIES`."""
        settings = self.settings
        out: Samples = [[] for _ in CAMPAIGN_FAMILIES]
        ch, camp = view.channel, view.campaign
        totals = view.totals
        out[EVENTS] = [((ch, camp, name), totals.get(name, 0)) for name in TOTAL_LABELS]
        out[UNIQUES] = [((ch, camp, name), totals.get(f"unique_{name}", 0)) for name in UNIQUE_LABELS]
        unsupported = self.unsupported(view)
        windows: list[tuple[str, dict[str, int]]] = [("all", totals)]
        for label, shown in view.complete_windows(settings.window_labels, settings.allowed_lateness):
            windows.append((label, shown.counts))
            out[WINDOW_END].append(((ch, camp, label), shown.end))
            out[WINDOW_EVENTS] += [
                ((ch, camp, label, name), shown.counts.get(name, 0)) for name in WINDOW_COUNT_LABELS
            ]
        for label, counts in windows:
            for rate, value in compute_rates(ch, counts, settings.email_denominator, unsupported).items():
                if value is not None:
                    out[RATES].append(((ch, camp, rate, label), value))
        if self.diagnose is not None:
            bottleneck, advice = self.diagnose(view)
            out[DIAGNOSIS].append(((ch, camp, bottleneck), 1))
            out[DIAGNOSIS_INFO].append(((ch, camp, bottleneck, advice), 1))
        return out

    def _pipeline_families(self, views: list[CampaignView], overflow: int) -> list[Metric]:
        duplicates: dict[str, int] = {}
        late: dict[str, int] = {}
        for view in views:
            duplicates[view.channel] = duplicates.get(view.channel, 0) + view.duplicates
            late[view.channel] = late.get(view.channel, 0) + view.late
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
        return [dup_family, late_family, overflow_family]

    def collect(self) -> Iterator[Metric]:
        views, overflow = select_campaigns(self.views(), self.settings.max_campaigns)
        families: list[Metric] = []
        for name, kind, doc, labels in CAMPAIGN_FAMILIES:
            base = name.removesuffix("_total") if kind == "counter" else name
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            families.append(cls(base, doc, labels=list(labels)))
        for view in views:
            for family, samples in zip(families, self.samples(view), strict=True):
                for values, value in samples:
                    family.add_metric(list(values), value)
        if self.diagnose is None:
            families = families[:DIAGNOSIS]
        yield from families
        yield from self._pipeline_families(views, overflow)

    def exposition(self) -> bytes:
        """The same as :meth:`collect`, in Prometheus text format, re-rendering only campaigns
        whose view changed since the last call."""
        views, overflow = select_campaigns(self.views(), self.settings.max_campaigns)
        rendered: dict[tuple[str, str], tuple[CampaignView, list[bytes]]] = {}
        previous = self._rendered
        for view in views:
            key = (view.channel, view.campaign)
            cached = previous.get(key)
            if cached is None or cached[0] is not view:
                lines = [_sample_lines(f, samples) for f, samples in enumerate(self.samples(view))]
                cached = (view, lines)
            rendered[key] = cached
        self._rendered = rendered  # campaigns no longer shown are forgotten
        count = DIAGNOSIS if self.diagnose is None else len(CAMPAIGN_FAMILIES)
        parts = []
        for family in range(count):
            name, kind, doc, _ = CAMPAIGN_FAMILIES[family]
            parts.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n".encode())
            parts += [lines[family] for _, lines in rendered.values()]
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Fixed(self._pipeline_families(views, overflow)))
        parts.append(generate_latest(registry))
        return b"".join(parts)


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


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


class MovedCollector(Collector):
    """Events this worker's dedupe stage moved to their subscriber's partition, per raw topic
    (they arrived where a direct producer put them: no key, another partitioner)."""

    def __init__(self, moved: Callable[[], dict[str, int]]) -> None:
        self.moved = moved

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "pipeline_records_moved",
            "Events that arrived on a raw topic partition other than their subscriber's and were "
            "moved to it before being counted",
            labels=["topic"],
        )
        for topic, count in sorted(self.moved().items()):
            family.add_metric([topic], count)
        yield family


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
