"""What users install is the built wheel, not the checkout: build it, install it into a fresh
virtual environment (its pinned dependencies from pip's cache; the `installed` fixture of
conftest.py, shared with the stack test), and run it from outside the checkout, so nothing it
reads at run time can come from the source tree."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import httpx
from conftest import outside_environ

from pipeline.kafka.tansu import free_port

ROOT = Path(__file__).resolve().parents[2]
EVENT = {
    "event_id": "w-1",
    "type": "click",
    "channel": "ads",
    "campaign_id": "from-the-wheel",
    "subscriber_id": "s1",
    "timestamp": 1_700_000_000,
}


def outside_env(tmp: Path) -> dict[str, str]:
    env = outside_environ()
    return {**env, "PIPELINE_DATA_DIR": str(tmp / "data"), "PIPELINE_ID_SALT": "wheel-test"}


def test_wheel_carries_the_schema_of_schemas_byte_for_byte(installed: tuple[Path, Path]) -> None:
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read("pipeline/schemas/event.schema.json")
    assert shipped == (ROOT / "schemas" / "event.schema.json").read_bytes()


def test_installed_package_validates_and_answers_help_outside_the_checkout(
    installed: tuple[Path, Path], tmp_path: Path
) -> None:
    _, venv = installed
    script = (
        "import json, sys, pipeline, pipeline.events as e; "
        f"event = e.validate_event({EVENT!r}, 1_700_000_100, 300); "
        "print(json.dumps({'file': pipeline.__file__, 'schema': str(e.EVENT_SCHEMA_PATH), 'event': event}))"
    )
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", script],
        cwd=tmp_path,
        env=outside_env(tmp_path),
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout)
    assert result["file"].startswith(str(venv)), result
    assert result["schema"].startswith(str(venv)), result
    assert result["event"]["campaign_id"] == "from-the-wheel"
    helped = subprocess.run(
        [str(venv / "bin" / "pipeline"), "--help"],
        cwd=tmp_path,
        env=outside_env(tmp_path),
        capture_output=True,
        text=True,
    )
    assert helped.returncode == 0, helped.stderr
    for command in ("run", "broker", "worker", "simulate", "bench", "report"):
        assert command in helped.stdout


def test_installed_pipeline_run_ingests_and_counts(installed: tuple[Path, Path], tmp_path: Path) -> None:
    """`pipeline run` from the wheel: embedded broker, worker, ingest, counts; SIGTERM stops all."""
    _, venv = installed
    port, broker_port = free_port(), free_port()
    log = tmp_path / "run.log"
    process = subprocess.Popen(
        [str(venv / "bin" / "pipeline"), "run", "--port", str(port), "--broker-port", str(broker_port)],
        cwd=tmp_path,
        env=outside_env(tmp_path),
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        resp = httpx.post(f"{url}/events", json=[EVENT, {**EVENT, "type": "nope"}], timeout=30)
        assert resp.status_code == 202, resp.text
        assert resp.json() == {"accepted": 1, "rejected": [{"index": 1, "reason": "unknown_type"}]}
        while True:
            doc = httpx.get(f"{url}/campaigns/ads/from-the-wheel", timeout=5)
            if doc.status_code == 200 and doc.json()["counts"]["click"] == 1:
                break
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
