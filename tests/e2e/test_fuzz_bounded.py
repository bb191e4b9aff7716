"""A bounded coverage-guided fuzzing run (atheris) of the parsers and adapters: no crash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HARNESS = Path(__file__).parents[1] / "fuzz" / "fuzz_ingest.py"


def test_atheris_bounded_run(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(HARNESS),
            "-atheris_runs=200000",
            "-seed=1",
            "-max_len=4096",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done 200000 in" in proc.stderr
