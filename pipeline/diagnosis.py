"""Funnel diagnosis: which stage is clogged. (First version; issue 7 completes it.)"""

from __future__ import annotations

from typing import Any

from pipeline.aggregate import CampaignView
from pipeline.settings import Settings


def diagnose_view(view: CampaignView, settings: Settings, unsupported: frozenset[str]) -> dict[str, Any]:
    return {"bottleneck": "insufficient_data", "advice": "not diagnosed yet", "evidence": {}}
