"""Generated Grafana dashboards: reproducible, schema-valid, every query listed and parseable."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from deploy_helpers import (
    DASHBOARDS,
    GRAFANA,
    ROOT,
    dashboard_generator,
    dashboard_queries,
    dashboard_targets,
    panels,
    require_tool,
)

EXPECTED = {"funnel-overview.json", "funnel-rates.json", "pipeline-health.json"}


def test_sdk_pinned_version():
    from importlib.metadata import version

    assert version("grafana-foundation-sdk") == "1769699379!11.6.0"


def test_generator_reproduces_checked_in_json(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(GRAFANA / "generate.py"), "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in tmp_path.glob("*.json")} == EXPECTED
    for path in tmp_path.glob("*.json"):
        assert path.read_text() == (DASHBOARDS / path.name).read_text(), f"{path.name} is stale"
    # and twice in a row gives the same bytes
    again = tmp_path / "again"
    subprocess.run(
        [sys.executable, str(GRAFANA / "generate.py"), "--out", str(again)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    for path in again.glob("*.json"):
        assert path.read_text() == (tmp_path / path.name).read_text()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dashboard_round_trips_through_the_sdk_models(name):
    """Validated by grafana-foundation-sdk's own typed dashboard model: decoding the JSON into
    ``Dashboard`` and encoding it again must give back every key and value (a key the model does
    not know is dropped on decoding). The SDK's panel and query plugins must be registered first:
    without them it keeps panel options and query targets as untyped bags, unchecked. Encoding
    gives every variable the SDK's interval-variable defaults again, which the generator drops the
    same way. The check against Grafana's own published types is test_deploy_grafana_schema.py."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()
    model = json.loads((DASHBOARDS / name).read_text())
    decoded = Dashboard.from_json(model)
    encoded = json.loads(json.dumps(decoded, cls=JSONEncoder))
    assert dashboard_generator().drop_interval_only_fields(encoded) == model


def test_sdk_round_trip_drops_misspelled_option_and_query_fields():
    """The round trip above would catch a misspelled panel option or query field."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()
    model = json.loads((DASHBOARDS / "funnel-overview.json").read_text())
    panel = next(p for p in model["panels"] if p["type"] == "stat")
    panel["options"]["grafMode"] = "area"
    panel["targets"][0]["legendFromat"] = "{{campaign}}"
    encoded = json.loads(json.dumps(Dashboard.from_json(model), cls=JSONEncoder))
    again = next(p for p in encoded["panels"] if p["id"] == panel["id"])
    assert "grafMode" not in again["options"]
    assert "legendFromat" not in again["targets"][0]


def test_generator_drops_interval_fields_only_off_non_interval_variables():
    drop = dashboard_generator().drop_interval_only_fields
    interval = {"type": "interval", "name": "step", "auto": True, "auto_min": "1m", "auto_count": 20}
    query = {"type": "query", "name": "channel", "auto": False, "auto_min": "10s", "auto_count": 30}
    model = drop({"templating": {"list": [dict(interval), dict(query)]}})
    assert model["templating"]["list"] == [interval, {"type": "query", "name": "channel"}]
    assert drop({"title": "no variables"}) == {"title": "no variables"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dashboard_shape(name):
    model = json.loads((DASHBOARDS / name).read_text())
    assert model["uid"] == name.removesuffix(".json")
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids))
    for panel in model["panels"]:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_required_content():
    text = {p.name: p.read_text() for p in DASHBOARDS.glob("*.json")}
    overview, rates, health = (
        text["funnel-overview.json"],
        text["funnel-rates.json"],
        text["pipeline-health.json"],
    )
    for stage in (
        'event=\\"impression\\"',
        'event=\\"click\\"',
        'event=\\"conversion\\"',
        'event=\\"send\\"',
        'event=\\"delivery\\"',
        'event=\\"open\\"',
    ):
        assert stage in overview, stage
    assert "funnel_diagnosis_info" in overview
    # rates with the alert thresholds, MPP-adjusted next to raw
    for needle in (
        "funnel_ctr_baseline:ratio",
        "funnel_ctr_drop:zscore",
        "funnel_human_ctor_drop:zscore",
        "funnel_human_open_rate:ratio",
        "funnel_open_rate:ratio",
        "funnel_human_ctor:ratio",
        "funnel_ctor:ratio",
    ):
        assert needle in rates, needle
    for needle in ("pipeline_consumer_lag", "pipeline_dead_lettered_total", "pipeline_broker_up", "up{"):
        assert needle in health, needle


def test_dashboard_queries_are_listed_and_substituted():
    queries = dashboard_queries()
    assert len(queries) == len(dashboard_targets()) >= 30
    for query in queries:
        assert "$" not in query, query


def test_dashboard_queries_parse_with_promtool(tmp_path):
    """Every panel query is valid PromQL: promtool check rules parses each one as a recording rule."""
    import yaml

    promtool = require_tool("promtool")
    rules = [{"record": f"dashboard:query_{i}:check", "expr": q} for i, q in enumerate(dashboard_queries())]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard_queries", "rules": rules}]}))
    proc = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def provisioned_datasources() -> list[dict]:
    """The data sources deploy/grafana/provisioning/datasources/ gives Grafana."""
    import yaml

    found = []
    for path in sorted((GRAFANA / "provisioning" / "datasources").glob("*.y*ml")):
        found.extend(yaml.safe_load(path.read_text()).get("datasources") or [])
    return found


def datasource_problems(model: dict, provisioned: list[dict]) -> list[str]:
    """Every data source reference of a dashboard (panels, their queries, variables, annotations)
    must resolve to a provisioned data source: by uid (of the same type), or through a data
    source variable (``${name}``) of the dashboard whose plugin type a provisioned data source
    has. A panel without a data source would silently use whatever is the default."""
    by_uid = {ds["uid"]: ds for ds in provisioned if "uid" in ds}
    provisioned_types = {ds["type"] for ds in provisioned}
    variables = {v["name"]: v for v in model.get("templating", {}).get("list", [])}
    problems = []

    def check(ref: object, where: str) -> None:
        if not isinstance(ref, dict) or not isinstance(ref.get("uid"), str):
            problems.append(f"{where}: data source {ref!r} is not a {{type, uid}} reference")
            return
        uid, kind = ref["uid"], ref.get("type")
        variable = re.fullmatch(r"\$\{(\w+)\}|\$(\w+)", uid)
        if variable:
            name = variable.group(1) or variable.group(2)
            var = variables.get(name)
            if var is None or var.get("type") != "datasource":
                problems.append(f"{where}: {uid} is not a data source variable of this dashboard")
            elif kind is not None and var.get("query") != kind:
                problems.append(f"{where}: {uid} lists {var.get('query')!r} data sources, not {kind!r}")
            elif var.get("query") not in provisioned_types:
                problems.append(f"{where}: no provisioned data source of type {var.get('query')!r}")
        elif uid not in by_uid:
            problems.append(f"{where}: no provisioned data source has uid {uid!r}")
        elif kind is not None and by_uid[uid]["type"] != kind:
            problems.append(f"{where}: data source {uid!r} is of type {by_uid[uid]['type']!r}, not {kind!r}")

    for panel in panels(model):
        where = f"panel {panel.get('id')} {panel.get('title')!r}"
        if panel.get("type") == "row":
            if "datasource" in panel:
                check(panel["datasource"], where)
            continue
        check(panel.get("datasource"), where)
        for target in panel.get("targets", []):
            if "datasource" in target:
                check(target["datasource"], f"{where} query {target.get('refId')}")
    for var in variables.values():
        if "datasource" in var:
            check(var["datasource"], f"variable {var['name']}")
    for annotation in model.get("annotations", {}).get("list", []):
        check(annotation.get("datasource"), f"annotation {annotation.get('name')!r}")
    return problems


def test_provisioning_defines_the_prometheus_data_source():
    provisioned = provisioned_datasources()
    assert [(ds["uid"], ds["type"], ds["url"]) for ds in provisioned] == [
        ("prometheus", "prometheus", "http://prometheus:9090")
    ]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_datasource_reference_resolves_to_a_provisioned_one(name):
    model = json.loads((DASHBOARDS / name).read_text())
    assert datasource_problems(model, provisioned_datasources()) == []


def test_datasource_check_catches_dangling_references():
    model = json.loads((DASHBOARDS / "funnel-overview.json").read_text())
    stat_panel = next(p for p in model["panels"] if p["type"] == "stat")
    stat_panel["targets"][0]["datasource"] = {"type": "prometheus", "uid": "prometheus-old"}
    table_panel = next(p for p in model["panels"] if p["type"] == "table")
    table_panel["datasource"] = {"type": "loki", "uid": "${datasource}"}
    bars = next(p for p in model["panels"] if p["type"] == "bargauge")
    del bars["datasource"]
    channel = next(v for v in model["templating"]["list"] if v["name"] == "channel")
    channel["datasource"] = {"type": "prometheus", "uid": "${metrics}"}
    problems = datasource_problems(model, provisioned_datasources())
    assert len(problems) == 4, problems
    assert any("query A: no provisioned data source has uid 'prometheus-old'" in p for p in problems)
    assert any("${datasource} lists 'prometheus' data sources, not 'loki'" in p for p in problems)
    assert any(f"panel {bars['id']} " in p and "None is not a {type, uid}" in p for p in problems)
    assert any("variable channel: ${metrics} is not a data source variable" in p for p in problems)
    # provisioning without a Prometheus: the data source variable would have nothing to offer
    model = json.loads((DASHBOARDS / "pipeline-health.json").read_text())
    problems = datasource_problems(model, [{"uid": "influx", "type": "influxdb"}])
    assert len(problems) == len(list(panels(model))) * 2, problems  # each panel and its one query
    assert all(p.endswith("no provisioned data source of type 'prometheus'") for p in problems)
