"""Named points where a test makes the worker die as SIGKILL would (fault injection).

``PIPELINE_FAILPOINT=name`` (or ``name:n``, the n-th time) ends the process with exit code
137 when the code reaches that point: no shutdown hook runs, nothing buffered is flushed.
A SIGKILL from outside lands at a random moment; a crash-consistency test needs the exact
moment that leaves one write done and the next one not. Unset, a point costs a dict lookup.

A few points do something else than exit when reached (:func:`hit` tells the caller):
``stream.drop_raw_record:n`` drops the n-th raw record before the dedupe stage and
acknowledges it, as Faust does with a record of a stale consumer generation.
"""

from __future__ import annotations

import os
import sys

AFTER_RECORDS = "dedupe.after_records"  # records stored and acknowledged, partials not yet
DROP_RAW_RECORD = "stream.drop_raw_record"  # the n-th raw record skipped and acknowledged
POINTS = (AFTER_RECORDS, DROP_RAW_RECORD)


def _armed(spec: str) -> dict[str, int]:
    if not spec:
        return {}
    name, _, times = spec.partition(":")
    if name not in POINTS:
        raise ValueError(f"PIPELINE_FAILPOINT: unknown point {name!r}; known: {', '.join(POINTS)}")
    return {name: int(times or 1)}


_remaining = _armed(os.environ.get("PIPELINE_FAILPOINT", ""))


def _due(name: str) -> bool:
    """Count one pass of the point; True at the n-th (once: the point is disarmed then)."""
    left = _remaining.get(name)
    if left is None:
        return False
    if left > 1:
        _remaining[name] = left - 1
        return False
    del _remaining[name]
    return True


def hit(name: str) -> bool:
    """True once, the n-th time the point is passed; then never again."""
    if not _due(name):
        return False
    print(f"failpoint {name} hit", file=sys.stderr, flush=True)
    return True


def reach(name: str) -> None:
    if _due(name):
        print(f"failpoint {name} reached: exiting as if killed", file=sys.stderr, flush=True)
        os._exit(137)
