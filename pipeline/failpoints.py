"""Named points where a test makes the worker die as SIGKILL would (fault injection).

``PIPELINE_FAILPOINT=name`` (or ``name:n``, the n-th time) ends the process with exit code
137 when the code reaches that point: no shutdown hook runs, nothing buffered is flushed.
A SIGKILL from outside lands at a random moment; a crash-consistency test needs the exact
moment that leaves one write done and the next one not. Unset, a point costs a dict lookup.
"""

from __future__ import annotations

import os
import sys

AFTER_RECORDS = "dedupe.after_records"  # records stored and acknowledged, partials not yet
POINTS = (AFTER_RECORDS,)


def _armed(spec: str) -> dict[str, int]:
    if not spec:
        return {}
    name, _, times = spec.partition(":")
    if name not in POINTS:
        raise ValueError(f"PIPELINE_FAILPOINT: unknown point {name!r}; known: {', '.join(POINTS)}")
    return {name: int(times or 1)}


_remaining = _armed(os.environ.get("PIPELINE_FAILPOINT", ""))


def reach(name: str) -> None:
    left = _remaining.get(name)
    if left is None:
        return
    if left > 1:
        _remaining[name] = left - 1
        return
    print(f"failpoint {name} reached: exiting as if killed", file=sys.stderr, flush=True)
    os._exit(137)
