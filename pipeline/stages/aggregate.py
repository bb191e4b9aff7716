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
from pipeline.state.bulk_table import BulkTable, group_by_partition
from pipeline.state.codec import Partial

WRITTEN_KEPT = 4096  # campaigns whose decoded partials wait for the next scrape, at most


class AggregateStage:
    def __init__(self, campaigns: faust.Table) -> None:
        self.campaigns = campaigns
        self._table = BulkTable(campaigns)
        self._views: dict[bytes, tuple[bytes, CampaignView]] = {}
        # campaigns written since the last views(): key -> (value written, its partials), so a
        # scrape does not decode again what the stage just encoded
        self._written: dict[bytes, tuple[bytes, dict[int, Partial]]] = {}

    async def process(self, events: list[faust.types.EventT]) -> None:
        """Merge a batch of snapshots: per partition, every campaign touched is read once and
        written once (one multi-get, one write batch, its changelog as whole record batches),
        and the batch returns once that changelog is acknowledged."""
        acks: list = []
        for partition, group in group_by_partition(events).items():
            snapshots: dict[bytes, list[tuple[int, Partial]]] = {}
            for event in group:
                for ckey, source, partial in codec.decode_snapshots(event.message.key, event.value):
                    snapshots.setdefault(ckey, []).append((source, partial))
            keys = list(snapshots)
            changed: dict[bytes, bytes] = {}
            for key, raw in zip(keys, self._table.get_many(partition, keys, group[0]), strict=True):
                current = codec.decode_campaign(raw)
                dirty = False
                for source, partial in snapshots[key]:
                    dirty = merge_snapshot(current, source, partial) or dirty
                if dirty:
                    changed[key] = codec.encode_campaign(current)
                    if len(self._written) < WRITTEN_KEPT or key in self._written:
                        self._written[key] = (changed[key], current)
            acks += await self._table.put_many(partition, changed, group[0])
        for ack in acks:
            await ack

    def views(self) -> list[CampaignView]:
        """Every campaign on the partitions this worker owns, combined across partitions."""
        views = []
        seen = set()
        written, self._written = self._written, {}
        # iterated once, as it is: no await here, so nothing writes meanwhile (a list() of
        # it would first count every key, a second walk over the table)
        for key, raw in self.campaigns.items():
            seen.add(key)
            cached = self._views.get(key)
            if cached is None or cached[0] != raw:
                channel, campaign = codec.parse_campaign_key(key)
                fresh = written.get(key)
                partials = fresh[1] if fresh is not None and fresh[0] == raw else codec.decode_campaign(raw)
                cached = self._views[key] = (raw, combine(channel, campaign, partials.values()))
            views.append(cached[1])
        for key in set(self._views) - seen:
            del self._views[key]  # the partition moved away: stop exporting it
        return views
