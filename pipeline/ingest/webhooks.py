"""``POST /webhooks/<provider>``: provider adapters behind one handler."""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from pipeline.settings import Settings

UNSUPPORTED_BY_SOURCE: dict[str, frozenset[str]] = {
    # Postmark sends a click webhook only for the first click per recipient and link
    "postmark": frozenset({"total_ctr"}),
}


def unsupported_for_sources(sources: Mapping[str, int]) -> frozenset[str]:
    result: frozenset[str] = frozenset()
    for source in sources:
        result |= UNSUPPORTED_BY_SOURCE.get(source, frozenset())
    return result


def add_webhook_routes(app: web.Application, ingest: object, settings: Settings) -> None:
    return None
