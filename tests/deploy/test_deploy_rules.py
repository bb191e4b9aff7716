"""promtool check rules / test rules / check config, amtool check-config."""

from __future__ import annotations

import subprocess
import sys

import yaml
from deploy_helpers import DEPLOY, require_tool

PROM = DEPLOY / "prometheus"
RULES = sorted((PROM / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROM / "tests").glob("*.test.yml"))


def run(*cmd, cwd=None):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def test_promtool_check_rules():
    promtool = require_tool("promtool")
    assert RULES, "no rule files"
    run(promtool, "check", "rules", *RULES)


def test_promtool_test_rules():
    promtool = require_tool("promtool")
    assert {p.name for p in RULE_TESTS} >= {"alerts.test.yml", "recording.test.yml", "health.test.yml"}
    out = run(promtool, "test", "rules", *RULE_TESTS)
    assert "FAILED" not in out


def test_promtool_check_config():
    promtool = require_tool("promtool")
    run(promtool, "check", "config", PROM / "prometheus.yml")


def test_recording_rules_are_generated():
    """funnel.rules.yml is exactly what generate_rules.py writes."""
    sys.path.insert(0, str(PROM))
    try:
        import generate_rules
    finally:
        sys.path.pop(0)
    assert (PROM / "rules" / "funnel.rules.yml").read_text() == generate_rules.render()


def test_rule_names_and_contract():
    records, alerts = set(), {}
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    # level:metric:operations
                    assert rule["record"].count(":") == 2, rule["record"]
                    records.add(rule["record"])
                else:
                    alerts[rule["alert"]] = rule
    for rate in (
        "ctr",
        "unique_ctr",
        "total_ctr",
        "open_rate",
        "human_open_rate",
        "ctor",
        "human_ctor",
        "cvr",
    ):
        assert f"channel_campaign:funnel_{rate}:ratio" in records
        assert f"channel_campaign_window:funnel_{rate}:ratio" in records
    for name in ("FunnelCTRDrop", "FunnelCTORDrop"):
        rule = alerts[name]
        assert "summary" in rule["annotations"] and "description" in rule["annotations"]
        assert "funnel_diagnosis_info" in rule["annotations"]["summary"]
        assert rule["labels"]["severity"]
        # short enough for an end-to-end test to see it fire within minutes
        assert rule["for"] in ("1m", "2m")
    for name in (
        "PipelineWorkerDown",
        "PipelineBrokerDown",
        "PipelineConsumerLagGrowing",
        "PipelineDeadLetterRate",
        "PipelineIngestErrors",
    ):
        assert name in alerts


def test_alertmanager_config():
    amtool = require_tool("amtool")
    config = DEPLOY / "alertmanager" / "alertmanager.yml"
    run(amtool, "check-config", config)
    cases = {
        ("alertname=FunnelCTRDrop", "channel=email", "campaign=x", "severity=critical"): "marketing-email",
        ("alertname=FunnelCTORDrop", "channel=ads", "campaign=x", "severity=critical"): "marketing-ads",
        ("alertname=PipelineWorkerDown", "severity=critical"): "oncall-pager",
        ("alertname=PipelineDeadLetterRate", "severity=warning"): "ops-webhook",
        ("alertname=Other", "severity=info"): "null",
    }
    for labels, receiver in cases.items():
        out = run(amtool, "config", "routes", "test", f"--config.file={config}", *labels)
        assert out.splitlines()[0].strip() == receiver, (labels, out)
