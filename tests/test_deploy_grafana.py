"""Generated Grafana dashboards: reproducible, schema-valid, every query listed and parseable."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from deploy_helpers import DASHBOARDS, DEPLOY, ROOT, dashboard_queries, dashboard_targets, require_tool

GRAFANA = DEPLOY / "grafana"
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
    ``Dashboard`` and encoding it again must give back every key and value. (The SDK's JSON
    Schema files live only in its source repository, not in its PyPI or npm packages, and
    cannot be vendored here; see deploy/README.md.)"""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    model = json.loads((DASHBOARDS / name).read_text())
    decoded = Dashboard.from_json(model)
    assert json.loads(json.dumps(decoded, cls=JSONEncoder)) == model


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
