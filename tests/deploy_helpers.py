"""Helpers for the deploy tests (and for an end-to-end test against a real Prometheus)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
GRAFANA = DEPLOY / "grafana"
DASHBOARDS = GRAFANA / "dashboards"

# Template variables and the value each takes when a query is run outside Grafana.
TEMPLATE_VALUES = {
    "channel": ".*",
    "campaign": ".*",
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
}


def substitute(expr: str) -> str:
    """Replace Grafana template variables ($var, ${var}, ${var:fmt}) by TEMPLATE_VALUES."""

    def repl(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in TEMPLATE_VALUES:
            raise KeyError(f"unknown template variable ${name} in {expr!r}")
        return TEMPLATE_VALUES[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", repl, expr)


def panels(model: dict):
    """Every panel of a dashboard, those inside (collapsed) rows included."""
    for panel in model.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, raw expr) for every query of every checked-in dashboard."""
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        model = json.loads(path.read_text())
        for panel in panels(model):
            for target in panel.get("targets", []):
                if "expr" in target:
                    out.append((path.name, panel.get("title", ""), target["expr"]))
    return out


def dashboard_queries() -> list[str]:
    """Every panel's PromQL with its template variables substituted, in dashboard order."""
    return [substitute(expr) for _, _, expr in dashboard_targets()]


def variable_queries() -> list[str]:
    """The label_values() queries of the template variables (Grafana syntax, not PromQL)."""
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for var in json.loads(path.read_text()).get("templating", {}).get("list", []):
            if var.get("type") == "query":
                out.append(var["query"])
    return out


def require_tool(name: str) -> str:
    """Path of a binary; missing: skip locally, fail under CI=true (the CI script installs it)."""
    path = shutil.which(name)
    if path:
        return path
    message = (
        f"{name} not found (Debian: apt-get install -y prometheus prometheus-alertmanager docker-compose)"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def dashboard_generator() -> ModuleType:
    """deploy/grafana/generate.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("dashboard_generator", GRAFANA / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
