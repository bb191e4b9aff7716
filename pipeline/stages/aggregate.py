"""Stage 2, keyed by campaign: keep the newest snapshot of each partition's partial.

A campaign's state is a handful of small snapshots (one per stage-1 partition), so one
worker owns each campaign's total without ever seeing its individual events. Reads for
``/metrics`` and ``/campaigns`` come from this table, so they are right after a restart and
follow a partition when it moves.
"""

from __future__ import annotations

import faust

from pipeline.rules.aggregate import CampaignView, combine, merge_snapshot
from pipeline.state import codec
from pipeline.state.bulk_table import group_by_partition, on_partition_of
from pipeline.state.codec import Partial


class AggregateStage:
    def __init__(self, campaigns: faust.Table) -> None:
        self.campaigns = campaigns
        self._views: dict[bytes, tuple[bytes, CampaignView]] = {}

    async def process(self, events: list[faust.types.EventT]) -> None:
        for group in group_by_partition(events).values():
            with on_partition_of(group[0]):
                stored: dict[bytes, dict[int, Partial]] = {}
                dirty: set[bytes] = set()
                for event in group:
                    key = event.message.key
                    partition, partial = codec.decode_snapshot(event.value)
                    current = stored.get(key)
                    if current is None:
                        current = stored[key] = codec.decode_campaign(self.campaigns.get(key))
                    if merge_snapshot(current, partition, partial):
                        dirty.add(key)
                for key in dirty:
                    self.campaigns[key] = codec.encode_campaign(stored[key])

    def views(self) -> list[CampaignView]:
        """Every campaign on the partitions this worker owns, combined across partitions."""
        views = []
        seen = set()
        for key, raw in list(self.campaigns.items()):
            seen.add(key)
            cached = self._views.get(key)
            if cached is None or cached[0] != raw:
                channel, campaign = codec.parse_campaign_key(key)
                partials = codec.decode_campaign(raw).values()
                cached = self._views[key] = (raw, combine(channel, campaign, partials))
            views.append(cached[1])
        for key in set(self._views) - seen:
            del self._views[key]  # the partition moved away: stop exporting it
        return views
