"""``/metrics`` writes the funnel families itself (cached per campaign): the text must say
exactly what the metric families of the same collector say, escaping included."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.metrics.collector import FunnelCollector
from pipeline.rules.aggregate import CampaignView
from pipeline.settings import Settings


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in out, key
            out[key] = sample.value
    return out


def views() -> list[CampaignView]:
    email = CampaignView(
        "email",
        'spring "sale" \\ 2026\nline',
        totals={"send": 10, "delivery": 9, "open": 5, "click": 3, "unique_click": 2, "unique_open": 4},
        windows={300: {600: {"delivery": 4, "click": 1, "unique_click": 1}}},
        watermark=1500.0,
        duplicates=2,
        late=1,
    )
    ads = CampaignView(
        "ads", "banner", totals={"impression": 100, "click": 7, "conversion": 1}, watermark=50.0
    )
    return [email, ads]


def test_exposition_says_what_collect_says() -> None:
    current = views()
    collector = FunnelCollector(
        Settings(windows=(300, 3600)),
        lambda: current,
        diagnose=lambda view: ("clicks", f'advice for {view.campaign} "quoted"'),
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    first = collector.exposition()
    assert samples(first) == samples(generate_latest(registry))
    assert collector.exposition() == first  # unchanged views: the cached lines
    current[1] = CampaignView("ads", "banner", totals={"impression": 101, "click": 7}, watermark=60.0)
    again = samples(collector.exposition())
    assert again == samples(generate_latest(registry))
    assert (
        again[("funnel_events_total", (("campaign", "banner"), ("channel", "ads"), ("event", "impression")))]
        == 101
    )
