#!/usr/bin/env python3
"""Generate the Grafana dashboards of the funnel pipeline with grafana-foundation-sdk.

    python deploy/grafana/generate.py           # writes deploy/grafana/dashboards/*.json
    python deploy/grafana/generate.py --check   # exit 1 if the checked-in JSON differs

Needs ``grafana-foundation-sdk==1769699379!11.6.0`` (the Grafana 11.6 flavour; the PyPI versions
carry epochs, so an unpinned install picks another flavour). Output is deterministic: fixed
panel ids, sorted keys, two-space indent, trailing newline.

Every query reads the recording rules of deploy/prometheus/rules/ (summed across workers) or the
raw pipeline metrics; tests/deploy_helpers.py lists them all so an end-to-end test can run each one
against a real Prometheus.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import bargauge, dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "dashboards"

DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = 'channel=~"$channel",campaign=~"$campaign"'

# Alert parameters shown on the panels (keep in step with deploy/prometheus/rules/).
Z_THRESHOLD = 3
RELATIVE_DROP = 0.8


def q(expr: str, legend: str = "", ref: str = "A", instant: bool = False, as_table: bool = False):
    target = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DS)
    if legend:
        target = target.legend_format(legend)
    target = target.instant() if instant else target.range()
    if as_table:
        target = target.format(PromQueryFormat.TABLE)
    return target


def last_value():
    """Stat / bar gauge panels show the last value of each series (instant queries)."""
    return common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False)


def thresholds(*steps: tuple[float | None, str]) -> dashboard.ThresholdsConfig:
    return (
        dashboard.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=v, color=c) for v, c in steps])
    )


def ts(title: str, targets: list, unit: str = "short", desc: str = "", w: int = 12, h: int = 8):
    panel = (
        timeseries.Panel()
        .title(title)
        .datasource(DS)
        .unit(unit)
        .span(w)
        .height(h)
        .line_width(1)
        .fill_opacity(10)
        .show_points(common.VisibilityMode.NEVER)
    )
    if desc:
        panel = panel.description(desc)
    for t in targets:
        panel = panel.with_target(t)
    return panel


def with_threshold_line(panel, steps, style=common.GraphThresholdsStyleMode.LINE):
    return panel.thresholds(thresholds(*steps)).thresholds_style(
        common_builders.GraphThresholdsStyleConfig().mode(style)
    )


def variables(d: dashboard.Dashboard, with_campaign: bool = True) -> dashboard.Dashboard:
    d = d.with_variable(dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    if with_campaign:
        d = d.with_variable(
            dashboard.QueryVariable("channel")
            .label("Channel")
            .datasource(DS)
            .query("label_values(channel_campaign:funnel_ctr_denominator:sum, channel)")
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .sort(dm.VariableSort.ALPHABETICAL_ASC)
        ).with_variable(
            dashboard.QueryVariable("campaign")
            .label("Campaign")
            .datasource(DS)
            .query('label_values(channel_campaign:funnel_ctr_denominator:sum{channel=~"$channel"}, campaign)')
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .sort(dm.VariableSort.ALPHABETICAL_ASC)
        )
    return d


def base(uid: str, title: str, desc: str, tags: list[str]) -> dashboard.Dashboard:
    return (
        dashboard.Dashboard(title)
        .uid(uid)
        .description(desc)
        .tags(["funnel", *tags])
        .editable()
        .timezone("browser")
        .time("now-6h", "now")
        .refresh("30s")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
    )


def funnel_stage_bars(title: str, channel: str, events: list[tuple[str, str]], desc: str):
    """Bar gauge of one funnel, stage by stage (instant, summed over the selected campaigns)."""
    panel = (
        bargauge.Panel()
        .reduce_options(last_value())
        .title(title)
        .description(desc)
        .datasource(DS)
        .span(12)
        .height(8)
        .unit("short")
        .orientation(common.VizOrientation.HORIZONTAL)
        .display_mode(common.BarGaugeDisplayMode.GRADIENT)
    )
    for i, (metric_event, label) in enumerate(events):
        metric, event = metric_event.split("/")
        expr = f'sum({metric}{{channel="{channel}",campaign=~"$campaign",event="{event}"}})'
        panel = panel.with_target(q(expr, legend=label, ref=chr(ord("A") + i), instant=True))
    return panel


EV = "channel_campaign_event:funnel_events_total:sum"
UQ = "channel_campaign_event:funnel_unique_events_total:sum"


def overview() -> dashboard.Dashboard:
    d = variables(
        base(
            "funnel-overview",
            "Funnel overview",
            "Ads (impressions -> clicks -> conversions) and e-mail (sends -> deliveries -> opens -> clicks) "
            "funnels, summed across workers, with the current diagnosis.",
            ["overview"],
        )
    )
    d = d.with_row(dashboard.Row("Funnels (lifetime, selected campaigns)"))
    d = d.with_panel(
        funnel_stage_bars(
            "Ads: impressions -> clicks -> conversions",
            "ads",
            [
                (f"{EV}/impression", "impressions"),
                (f"{EV}/click", "clicks"),
                (f"{EV}/conversion", "conversions"),
            ],
            "Lifetime counts after event_id deduplication.",
        )
    )
    d = d.with_panel(
        funnel_stage_bars(
            "E-mail: sends -> deliveries -> opens -> clicks",
            "email",
            [
                (f"{EV}/send", "sends"),
                (f"{EV}/delivery", "deliveries"),
                (f"{UQ}/open", "unique openers"),
                (f"{UQ}/human_open", "unique human openers (MPP-adjusted)"),
                (f"{UQ}/click", "unique clickers"),
            ],
            "Unique openers include clickers (a click proves an open); human openers exclude machine "
            "(Apple MPP / proxy) opens and bot clicks.",
        )
    )
    d = d.with_row(dashboard.Row("Diagnosis and rates"))
    d = d.with_panel(
        table.Panel()
        .title("Diagnosis: where the funnel is clogged")
        .description(
            "funnel_diagnosis_info from the pipeline: the bottleneck and the advice the alerts carry."
        )
        .datasource(DS)
        .span(24)
        .height(8)
        .with_target(
            q(
                f"max by (channel, campaign, bottleneck, advice) (funnel_diagnosis_info{{{SEL}}})",
                instant=True,
                as_table=True,
            )
        )
    )
    for rate, title in (("ctr", "CTR"), ("cvr", "CVR"), ("open_rate", "Open rate"), ("ctor", "CTOR")):
        d = d.with_panel(
            stat.Panel()
            .reduce_options(last_value())
            .title(f"{title} (lifetime)")
            .datasource(DS)
            .span(6)
            .height(5)
            .unit("percentunit")
            .decimals(2)
            .with_target(
                q(
                    f"channel_campaign:funnel_{rate}:ratio{{{SEL}}}",
                    legend="{{channel}}/{{campaign}}",
                    instant=True,
                )
            )
        )
    d = d.with_row(dashboard.Row("Event volume"))
    d = d.with_panel(
        ts(
            "Events per second by type",
            [q(f"sum by (event) (rate(funnel_events_total{{{SEL}}}[$__rate_interval]))", legend="{{event}}")],
            unit="ops",
            w=24,
        )
    )
    return d


def rate_panel(rate: str, title: str, alerted: bool) -> list:
    """The lifetime rate, the most recent complete 5m / 1h windows, and (for alerted rates) the
    alert threshold 0.8 x baseline, per campaign."""
    targets = [
        q(f"channel_campaign:funnel_{rate}:ratio{{{SEL}}}", legend="{{campaign}} lifetime", ref="A"),
        q(
            f'channel_campaign_window:funnel_{rate}:ratio{{{SEL},window="5m"}}',
            legend="{{campaign}} last 5m window",
            ref="B",
        ),
        q(
            f'channel_campaign_window:funnel_{rate}:ratio{{{SEL},window="1h"}}',
            legend="{{campaign}} last 1h window",
            ref="C",
        ),
    ]
    desc = f"{title} from counters summed across workers (recording rules)."
    if alerted:
        targets.append(
            q(
                f"{RELATIVE_DROP} * channel_campaign:funnel_{rate}_baseline:ratio{{{SEL}}}",
                legend="{{campaign}} alert threshold (0.8 x baseline)",
                ref="D",
            )
        )
        desc += (
            f" The alert also needs z > {Z_THRESHOLD} and the minimum window volume: see the z-score panel."
        )
    return [ts(title, targets, unit="percentunit", desc=desc)]


def zscore_panel(rate: str, title: str):
    panel = ts(
        title,
        [q(f"channel_campaign:funnel_{rate}_drop:zscore{{{SEL}}}", legend="{{channel}}/{{campaign}}")],
        unit="none",
        desc=(
            f"z = (baseline - recent) / sqrt(baseline (1 - baseline) / n) for the last complete 5m window; "
            f"only where the window has the minimum volume. The alert fires above {Z_THRESHOLD} "
            f"(and recent < {RELATIVE_DROP} x baseline) held for 2m."
        ),
    )
    return with_threshold_line(panel, [(None, "green"), (Z_THRESHOLD, "red")])


def rates() -> dashboard.Dashboard:
    d = variables(
        base(
            "funnel-rates",
            "Funnel rates per campaign",
            "Every rate per campaign (lifetime, last complete 5m and 1h event-time windows), the alert "
            "thresholds, and MPP-adjusted rates next to raw ones.",
            ["rates", "alerts"],
        )
    )
    d = d.with_row(dashboard.Row("CTR (FunnelCTRDrop)"))
    for p in rate_panel("ctr", "CTR", alerted=True):
        d = d.with_panel(p)
    d = d.with_panel(zscore_panel("ctr", "CTR drop z-score (alert above 3)"))
    d = d.with_row(dashboard.Row("CTOR, MPP-adjusted (FunnelCTORDrop)"))
    for p in rate_panel("human_ctor", "Human CTOR (unique clickers / unique human openers)", alerted=True):
        d = d.with_panel(p)
    d = d.with_panel(zscore_panel("human_ctor", "CTOR drop z-score (alert above 3)"))
    d = d.with_row(dashboard.Row("MPP-adjusted next to raw (e-mail)"))
    d = d.with_panel(
        ts(
            "Open rate: raw vs human",
            [
                q(
                    f"channel_campaign:funnel_open_rate:ratio{{{SEL}}}",
                    legend="{{campaign}} raw open rate",
                    ref="A",
                ),
                q(
                    f"channel_campaign:funnel_human_open_rate:ratio{{{SEL}}}",
                    legend="{{campaign}} human open rate",
                    ref="B",
                ),
            ],
            unit="percentunit",
            desc="Machine opens (Apple Mail Privacy Protection, proxies) inflate the raw open rate.",
        )
    )
    d = d.with_panel(
        ts(
            "CTOR: raw vs human",
            [
                q(f"channel_campaign:funnel_ctor:ratio{{{SEL}}}", legend="{{campaign}} raw CTOR", ref="A"),
                q(
                    f"channel_campaign:funnel_human_ctor:ratio{{{SEL}}}",
                    legend="{{campaign}} human CTOR",
                    ref="B",
                ),
            ],
            unit="percentunit",
            desc="Machine opens deflate the raw CTOR; the human CTOR is the one the alert uses.",
        )
    )
    d = d.with_panel(
        ts(
            "Machine opens share",
            [
                q(
                    f'{EV}{{{SEL},event="machine_open"}} / ignoring(event) ({EV}{{{SEL},event="open"}} > 0)',
                    legend="{{campaign}}",
                )
            ],
            unit="percentunit",
            w=24,
        )
    )
    d = d.with_row(dashboard.Row("Other rates"))
    for rate, title in (
        ("cvr", "CVR (conversions / clicks)"),
        ("open_rate", "Open rate"),
        ("unique_ctr", "Unique CTR"),
        ("total_ctr", "Total CTR"),
    ):
        for p in rate_panel(rate, title, alerted=False):
            d = d.with_panel(p)
    d = d.with_row(dashboard.Row("Window volume (alert denominators)"))
    d = d.with_panel(
        ts(
            "Last complete 5m window: CTR denominator",
            [
                q(
                    f'channel_campaign_window:funnel_ctr_denominator:sum{{{SEL},window="5m"}}',
                    legend="{{channel}}/{{campaign}}",
                )
            ],
            desc="Impressions (ads) or delivered (e-mail) in the window the alert tests.",
        )
    )
    d = d.with_panel(
        ts(
            "Last complete 5m window: human openers",
            [
                q(
                    f'channel_campaign_window:funnel_human_ctor_denominator:sum{{{SEL},window="5m"}}',
                    legend="{{channel}}/{{campaign}}",
                )
            ],
        )
    )
    return d


def health() -> dashboard.Dashboard:
    d = variables(
        base(
            "pipeline-health",
            "Pipeline health",
            "Ingest, rejects, dead letters, duplicates, late events, consumer lag, HTTP status, "
            "broker and workers.",
            ["health"],
        ),
        with_campaign=False,
    )
    d = d.with_panel(
        stat.Panel()
        .reduce_options(last_value())
        .title("Workers up")
        .datasource(DS)
        .span(6)
        .height(4)
        .with_target(q('sum(up{job="funnel-pipeline"})', instant=True))
    )
    d = d.with_panel(
        stat.Panel()
        .reduce_options(last_value())
        .title("Broker reachable (workers)")
        .datasource(DS)
        .span(6)
        .height(4)
        .with_target(q("sum(pipeline_broker_up)", instant=True))
    )
    d = d.with_panel(
        stat.Panel()
        .reduce_options(last_value())
        .title("Campaigns over the cardinality cap")
        .datasource(DS)
        .span(6)
        .height(4)
        .thresholds(thresholds((None, "green"), (1, "red")))
        .with_target(q("max(pipeline_campaigns_overflow)", instant=True))
    )
    d = d.with_panel(
        stat.Panel()
        .reduce_options(last_value())
        .title("Consumer lag (messages)")
        .datasource(DS)
        .span(6)
        .height(4)
        .with_target(q("sum(pipeline_consumer_lag)", instant=True))
    )
    panels = [
        (
            "Events ingested per second by source",
            "sum by (source) (rate(pipeline_events_ingested_total[$__rate_interval]))",
            "{{source}}",
            "ops",
        ),
        (
            "Events rejected per second by reason",
            "sum by (reason) (rate(pipeline_events_rejected_total[$__rate_interval]))",
            "{{reason}}",
            "ops",
        ),
        (
            "Dead-lettered per second by reason",
            "sum by (reason) (rate(pipeline_dead_lettered_total[$__rate_interval]))",
            "{{reason}}",
            "ops",
        ),
        (
            "Duplicates dropped per second",
            "sum by (channel) (rate(pipeline_duplicates_dropped_total[$__rate_interval]))",
            "{{channel}}",
            "ops",
        ),
        (
            "Late events per second",
            "sum by (channel) (rate(pipeline_late_events_total[$__rate_interval]))",
            "{{channel}}",
            "ops",
        ),
        (
            "Consumer lag by topic and partition",
            "sum by (topic, partition) (pipeline_consumer_lag)",
            "{{topic}}/{{partition}}",
            "short",
        ),
        (
            "HTTP requests per second by endpoint and status",
            "sum by (endpoint, status) (rate(pipeline_http_requests_total[$__rate_interval]))",
            "{{endpoint}} {{status}}",
            "reqps",
        ),
        (
            "Webhook signature failures per second",
            "sum by (provider) (rate(pipeline_webhook_signature_failures_total[$__rate_interval]))",
            "{{provider}}",
            "ops",
        ),
        ("Worker scrape status", 'up{job="funnel-pipeline"}', "{{instance}}", "short"),
        ("Broker reachable per worker", "pipeline_broker_up", "{{instance}}", "short"),
    ]
    for title, expr, legend, unit in panels:
        d = d.with_panel(ts(title, [q(expr, legend=legend)], unit=unit))
    return d


DASHBOARDS = {
    "funnel-overview.json": overview,
    "funnel-rates.json": rates,
    "pipeline-health.json": health,
}


def _assign_ids(model: dict) -> dict:
    """Fixed, sequential panel ids (Grafana needs them unique; the SDK leaves them unset)."""
    next_id = 1
    for panel in model.get("panels", []):
        panel["id"] = next_id
        next_id += 1
        for inner in panel.get("panels", []):
            inner["id"] = next_id
            next_id += 1
    return model


# Fields only an interval variable has ("auto" option, its minimum and step count). The SDK's
# variable model gives every variable their defaults; Grafana's published dashboard types
# (@grafana/schema) do not have them on a variable, and Grafana itself writes them only for interval
# variables, so they are dropped from every other kind (see deploy/grafana/schema-check/).
INTERVAL_ONLY_FIELDS = ("auto", "auto_min", "auto_count")


def drop_interval_only_fields(model: dict) -> dict:
    for variable in model.get("templating", {}).get("list", []):
        if variable.get("type") != "interval":
            for field in INTERVAL_ONLY_FIELDS:
                variable.pop(field, None)
    return model


def render(builder) -> str:
    model = json.loads(json.dumps(builder().build(), cls=JSONEncoder))
    model = drop_interval_only_fields(_assign_ids(model))
    return json.dumps(model, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="compare with the checked-in JSON, write nothing"
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    stale = []
    args.out.mkdir(parents=True, exist_ok=True)
    for name, builder in DASHBOARDS.items():
        text = render(builder)
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print("out of date (run python deploy/grafana/generate.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
