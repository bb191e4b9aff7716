"""The dashboards type-checked against Grafana's own published dashboard types (@grafana/schema,
pinned to the Grafana of docker-compose.yml) with TypeScript, by deploy/grafana/schema-check/.

The check needs Node.js and npm: without them these tests fail (they never skip), since the check
is the only one against Grafana's published schema."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from deploy_helpers import DASHBOARDS, GRAFANA, ROOT, panels

SCHEMA_CHECK = GRAFANA / "schema-check"
PANELCFG_DIR = SCHEMA_CHECK / "node_modules" / "@grafana" / "schema" / "dist" / "esm" / "raw" / "composable"
# Panel schemas the package ships twice: an older copy of xychart's and a copy of logsnew's.
DUPLICATE_PANELCFG = {"xychart2", "logs(new)"}

RunCheck = Callable[..., subprocess.CompletedProcess]


def required_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} not found: the dashboard schema check needs Node.js and npm "
            "(Debian: apt-get install -y nodejs npm); it is never skipped"
        )
    return path


def installed_matches_lockfile() -> bool:
    """node_modules holds exactly what package-lock.json pins (npm's own record of what it installed,
    node_modules/.package-lock.json, lists the same packages)."""
    installed = SCHEMA_CHECK / "node_modules" / ".package-lock.json"
    if not installed.exists():
        return False
    locked = json.loads((SCHEMA_CHECK / "package-lock.json").read_text())["packages"]
    present = json.loads(installed.read_text())["packages"]
    return {k: v for k, v in locked.items() if k} == present


@pytest.fixture(scope="module")
def run_check() -> RunCheck:
    """Installs the check's pinned packages (`npm ci`, skipped when node_modules already matches
    the lockfile) and returns a runner of check.mjs."""
    node = required_tool("node")
    npm = required_tool("npm")
    if not installed_matches_lockfile():
        proc = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=SCHEMA_CHECK,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, f"npm ci failed:\n{proc.stdout}\n{proc.stderr}"
        assert installed_matches_lockfile()

    def run(*dashboards: Path, allowlist: Path | None = None) -> subprocess.CompletedProcess:
        args = [node, str(SCHEMA_CHECK / "check.mjs")]
        if allowlist is not None:
            args += ["--allowlist", str(allowlist)]
        return subprocess.run(
            [*args, *map(str, dashboards)], capture_output=True, text=True, timeout=300, cwd=ROOT
        )

    return run


def compose_grafana_version() -> str:
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    image = compose["services"]["grafana"]["image"]
    match = re.fullmatch(r"grafana/grafana:(\d+\.\d+\.\d+)", image)
    assert match, f"Grafana image {image!r} is not pinned to a version"
    return match.group(1)


def test_packages_pinned_to_the_compose_grafana():
    package = json.loads((SCHEMA_CHECK / "package.json").read_text())
    lock = json.loads((SCHEMA_CHECK / "package-lock.json").read_text())
    wanted = {"@grafana/schema": compose_grafana_version(), "typescript": "5.7.3"}
    assert package["devDependencies"] == wanted
    assert package.get("dependencies", {}) == {}
    assert lock["packages"][""]["devDependencies"] == wanted
    for name, version in wanted.items():
        entry = lock["packages"][f"node_modules/{name}"]
        assert entry["version"] == version
        assert entry["integrity"].startswith("sha512-")


def test_install_folders_are_git_ignored():
    for path in ("node_modules", ".wrappers"):
        proc = subprocess.run(
            ["git", "check-ignore", "-q", str(SCHEMA_CHECK / path / "x")], cwd=ROOT, capture_output=True
        )
        assert proc.returncode == 0, f"{path} is not git-ignored"


def test_checked_in_dashboards_type_check(run_check):
    dashboards = sorted(DASHBOARDS.glob("*.json"))
    assert len(dashboards) == 3
    proc = run_check(*dashboards)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    version = compose_grafana_version()
    assert f"OK: 3 dashboard(s) type-check against @grafana/schema {version}" in proc.stdout


def tsc_errors(output: str) -> list[str]:
    """tsc's errors, each with its indented continuation lines."""
    errors: list[str] = []
    for line in output.splitlines():
        if line.startswith(" ") and errors:
            errors[-1] += "\n" + line
        elif ": error TS" in line:
            errors.append(line)
    return errors


def _mutate(model: dict, panel_type: str, change: Callable[[dict], None]) -> dict:
    change(next(p for p in panels(model) if p["type"] == panel_type))
    return model


# (file name of the broken copy, the change, the field or value the error must name)
BROKEN = [
    ("dashboard-field.json", lambda m: m.update(refreh="30s"), "'\"refreh\"' does not exist"),
    (
        "panel-field.json",
        lambda m: _mutate(m, "stat", lambda p: p.update(tittle="CTR")),
        "'\"tittle\"' does not exist",
    ),
    (
        "panel-option.json",
        lambda m: _mutate(m, "stat", lambda p: p["options"].update(grafMode="area")),
        "'\"grafMode\"' does not exist",
    ),
    (
        "option-value.json",
        lambda m: _mutate(m, "stat", lambda p: p["options"].update(graphMode="areas")),
        "Type '\"areas\"' is not assignable",
    ),
    (
        "custom-field-config.json",
        lambda m: _mutate(
            m, "timeseries", lambda p: p["fieldConfig"]["defaults"]["custom"].update(linewidth=1)
        ),
        "'\"linewidth\"' does not exist",
    ),
    (
        "panel-type.json",
        lambda m: _mutate(m, "table", lambda p: p.update(type="tabel")),
        "Type '\"tabel\"' is not assignable",
    ),
    (
        "variable-field.json",
        lambda m: m["templating"]["list"][0].update(auto=False),
        "'\"auto\"' does not exist in type",
    ),
    (
        "grid-field.json",
        lambda m: _mutate(m, "bargauge", lambda p: p["gridPos"].update(width=12)),
        "'\"width\"' does not exist",
    ),
    (
        "query-without-refid.json",
        lambda m: _mutate(m, "stat", lambda p: p["targets"][0].pop("refId")),
        "Property 'refId' is missing",
    ),
]


def test_check_fails_on_broken_copies(run_check, tmp_path):
    """Each broken copy of a real dashboard (one misspelled or unknown field or value each) fails,
    and the error names the file and the field; the real dashboard passes in the same run."""
    original = DASHBOARDS / "funnel-overview.json"
    files = []
    for name, change, _ in BROKEN:
        model = json.loads(original.read_text())
        change(model)
        (tmp_path / name).write_text(json.dumps(model, indent=2))
        files.append(tmp_path / name)
    proc = run_check(original, *files)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = tsc_errors(proc.stdout)
    for (name, _, needle), path in zip(BROKEN, files, strict=True):
        mine = [error for error in errors if error.startswith(f"{path}(")]
        assert any(needle in error for error in mine), (name, needle, mine)
    assert not [error for error in errors if error.startswith(str(original))]
    assert "FAILED: 10 dashboard(s)" in proc.stderr


def test_allowlisted_field_passes_and_stale_entry_fails(run_check, tmp_path):
    broken = tmp_path / "funnel-overview.json"
    model = json.loads((DASHBOARDS / "funnel-overview.json").read_text())
    for variable in model["templating"]["list"]:
        variable["auto"] = False
    broken.write_text(json.dumps(model, indent=2))
    assert run_check(broken).returncode == 1

    allowlist = tmp_path / "allowlist.json"
    entry = {"dashboards": ["funnel-overview.json"], "path": "templating.list.*.auto", "reason": "test"}
    allowlist.write_text(json.dumps({"allowed": [entry]}))
    proc = run_check(broken, allowlist=allowlist)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    # the same entry against the clean dashboard matches nothing: stale, so the check fails
    proc = run_check(DASHBOARDS / "funnel-overview.json", allowlist=allowlist)
    assert proc.returncode == 1
    assert "stale allowlist entry" in proc.stderr and "templating.list.*.auto" in proc.stderr

    # an entry without a reason is refused
    allowlist.write_text(json.dumps({"allowed": [{**entry, "reason": " "}]}))
    proc = run_check(broken, allowlist=allowlist)
    assert proc.returncode == 2 and 'non-empty "reason"' in proc.stderr


def test_reviewed_allowlist_entries_have_reasons():
    allowlist = json.loads((SCHEMA_CHECK / "allowlist.json").read_text())
    for entry in allowlist["allowed"]:
        assert set(entry) == {"dashboards", "path", "reason"}
        assert len(entry["reason"]) > 40, entry


def test_bad_arguments_and_invalid_json_exit_2(run_check, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    proc = run_check(bad)
    assert proc.returncode == 2 and "is not valid JSON" in proc.stderr
    proc = run_check()
    assert proc.returncode == 2 and "no dashboard files given" in proc.stderr


def typed_panel_types() -> dict[str, tuple[str, bool]]:
    """PanelTypes of dashboard-types.ts: plugin id -> (imported panelcfg folder, has custom field config)."""
    text = (SCHEMA_CHECK / "dashboard-types.ts").read_text()
    folders = dict(
        re.findall(r"import type \* as (\w+) from '@grafana/schema/dist/esm/raw/composable/([^/]+)/", text)
    )
    body = re.search(r"export interface PanelTypes \{(.*?)\n\}", text, re.S)
    assert body
    entries = re.findall(
        r"^\s+'?([\w-]+)'?: \[(\w+)\.Options, (never|\w+\.FieldConfig)\];$", body.group(1), re.M
    )
    assert len(entries) == len(body.group(1).strip().splitlines())
    return {plugin: (folders[alias], custom != "never") for plugin, alias, custom in entries}


def test_panel_types_are_every_panel_schema_grafana_publishes(run_check):
    """The panel list of dashboard-types.ts is not a hand-made choice: it is every panel schema of
    the pinned @grafana/schema (less two duplicate copies), under the plugin ids and with the
    custom field configs that grafana-foundation-sdk's panel registry (generated from the same
    Grafana panel schemas) has."""
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.cog.runtime import Runtime

    typed = typed_panel_types()
    shipped = {p.parent.name for p in PANELCFG_DIR.glob("*/panelcfg")}
    assert DUPLICATE_PANELCFG <= shipped
    assert sorted(folder for folder, _ in typed.values()) == sorted(shipped - DUPLICATE_PANELCFG)

    register_default_plugins()
    registry = Runtime().panelcfg_variants
    assert {plugin: has_custom for plugin, (_, has_custom) in typed.items()} == {
        plugin: config.field_config_from_json_hook is not None for plugin, config in registry.items()
    }


def test_dashboards_use_only_typed_panel_types():
    allowed = set(typed_panel_types()) | {"row"}
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in panels(json.loads(path.read_text())):
            assert panel["type"] in allowed, (path.name, panel.get("title"), panel["type"])
