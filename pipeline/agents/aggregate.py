"""Stage 2, keyed by campaign: keep the newest snapshot of each partition's partial.

A campaign's state is a handful of small snapshots (one per stage-1 partition), so one
worker owns each campaign's total without ever seeing its individual events. Reads for
``/metrics`` and ``/campaigns`` come from this table, so they are right after a restart and
follow a partition when it moves.
"""

from __future__ import annotations

from typing import Any

import faust
import orjson

from pipeline.agents.context import group_by_partition, on_partition_of
from pipeline.aggregate import CampaignView, combine, merge_snapshot


class AggregateStage:
    def __init__(self, campaigns: faust.Table) -> None:
        self.campaigns = campaigns
        self._views: dict[bytes, tuple[bytes, CampaignView]] = {}

    async def process(self, events: list[faust.types.EventT]) -> None:
        for group in group_by_partition(events).values():
            with on_partition_of(group[0]):
                stored: dict[bytes, dict[str, Any]] = {}
                dirty: set[bytes] = set()
                for event in group:
                    key = event.message.key
                    doc = orjson.loads(event.value)
                    current = stored.get(key)
                    if current is None:
                        raw = self.campaigns.get(key)
                        current = stored[key] = orjson.loads(raw) if raw else {}
                    if merge_snapshot(current, doc["p"], doc["s"]):
                        dirty.add(key)
                for key in dirty:
                    self.campaigns[key] = orjson.dumps(stored[key])

    def views(self) -> list[CampaignView]:
        """Every campaign on the partitions this worker owns, combined across partitions."""
        views = []
        seen = set()
        for key, raw in list(self.campaigns.items()):
            seen.add(key)
            cached = self._views.get(key)
            if cached is None or cached[0] != raw:
                channel, campaign = key.decode().split("|", 1)
                cached = self._views[key] = (raw, combine(channel, campaign, orjson.loads(raw).values()))
            views.append(cached[1])
        for key in set(self._views) - seen:
            del self._views[key]  # the partition moved away: stop exporting it
        return views
