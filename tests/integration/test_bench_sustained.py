"""The sustained-capacity mechanism in its small mode: HTTP load through ``pipeline worker`` on
each broker kind, and every count on ``/metrics`` equal to what was sent (no timing asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.bench import sustained


@pytest.mark.timeout(420)
@pytest.mark.brokers("tansu", "kafka")
def test_sustained_small_is_exact(broker, broker_kind: str, tmp_path: Path) -> None:
    result = sustained.measure(broker.address, broker_kind, tmp_path / "sustained", small=True)
    assert result["broker"] == broker_kind
    assert result["failed_requests"] == 0
    assert result["problems"] == []
    assert result["exact"]
    steps = result["steps"]
    assert steps, result
    for step in steps:
        assert step["requests"] > 0
        assert step["probes"] > 0
        # a probe not seen within its step would still be counted once: check_truth saw it
        assert step["probes_seen"] <= step["probes"]
    assert result["laps"] >= len(steps)
    plan = result["plan"]
    per_lap = plan["batches_per_lap"] * plan["batch"] + plan["webhooks_per_lap"] * plan["webhook_events"]
    assert result["events_sent"] == result["laps"] * per_lap


def test_lag_trend_tells_a_climbing_queue_from_a_wobbling_one() -> None:
    wobbling = [(float(t), 40.0 + (t % 3) * 150) for t in range(40)]
    climbing = [(float(t), 30.0 * t) for t in range(40)]
    assert not sustained.lag_trend(wobbling)[3]
    assert sustained.lag_trend(climbing)[3]


def test_lap_bodies_are_new_events_of_new_subscribers() -> None:
    plan = sustained.plan_for(small=True)
    lap = sustained.build_lap(plan, 1_800_000_000.0)
    first = sustained.lap_body(lap.events_bodies[0], 1)
    second = sustained.lap_body(lap.events_bodies[0], 2)
    assert sustained.PLACEHOLDER not in first
    assert first != second and len(first) == len(second)
    import orjson

    a, b = orjson.loads(first), orjson.loads(second)
    assert {e["event_id"] for e in a}.isdisjoint(e["event_id"] for e in b)
    assert {e["subscriber_id"] for e in a}.isdisjoint(e["subscriber_id"] for e in b)
    total = sum(doc["counts"]["click"] + doc["duplicates"] for doc in lap.expected.values())
    assert total == lap.events_per_lap
