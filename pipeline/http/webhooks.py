"""``POST /webhooks/<provider>``: verify, normalise, publish; 2xx only after the broker acked.

Status codes are chosen for the provider's retry logic: 401/403 for a bad signature (nothing
produced), 400 (406 for Mailgun: "never retry") for a body that can never be accepted, 503
while the broker is unreachable (the provider retries; a redelivery is harmless).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import ClientError, ClientSession, ClientTimeout, web

from pipeline.http.security import served_endpoints
from pipeline.ingest.producer import BrokerUnavailable
from pipeline.ingest.providers import (
    ADAPTERS,
    Adapter,
    ConfigError,
    SignatureError,
    WebhookError,
    WebhookRequest,
)
from pipeline.ingest.providers.ses import SesAdapter, fetch_certificate
from pipeline.settings import Settings

if TYPE_CHECKING:
    from pipeline.http.server import WebApp

from pipeline.ingest.service import IngestService, Overloaded

log = logging.getLogger(__name__)

UNSUPPORTED_BY_SOURCE: dict[str, frozenset[str]] = {
    # Postmark sends a click webhook only for the first click per recipient and link
    "postmark": frozenset({"total_ctr"}),
}


def unsupported_for_sources(sources: Mapping[str, int]) -> frozenset[str]:
    result: frozenset[str] = frozenset()
    for source in sources:
        result |= UNSUPPORTED_BY_SOURCE.get(source, frozenset())
    return result


def sns_certificate_fetcher(env: Mapping[str, str]) -> Callable[[str], bytes]:
    """SNS signing certificates from ``SES_SNS_CERT_DIR`` first (by file name), else from AWS.

    A pre-seeded directory serves air-gapped installs and is the trust store tests inject; the
    adapter has already refused any URL that is not https on an SNS host.
    """
    directory = env.get("SES_SNS_CERT_DIR")

    def fetch(url: str) -> bytes:
        if directory:
            path = Path(directory) / Path(urlsplit(url).path).name
            if path.is_file():
                return path.read_bytes()
        return fetch_certificate(url)

    return fetch


class WebhookHandler:
    def __init__(self, web_app: WebApp, ingest: IngestService, settings: Settings) -> None:
        self.web_app = web_app
        self.ingest = ingest
        self.settings = settings
        adapters: dict[str, Adapter] = {
            **ADAPTERS,
            "ses": SesAdapter(cert_fetcher=sns_certificate_fetcher(settings.env)),
        }
        served = served_endpoints(settings)  # one left out of PIPELINE_ENDPOINTS answers 404
        self.adapters = {name: adapter for name, adapter in adapters.items() if name in served}

    def _json(self, doc: dict[str, Any], status: int) -> web.Response:
        from pipeline.http.server import json_response

        return json_response(doc, status)

    async def handle(self, request: web.Request) -> web.Response:
        provider = request.match_info["provider"]
        adapter = self.adapters.get(provider)
        if adapter is None:
            return self._json({"error": "unknown_provider"}, 404)
        body = await self.web_app.read_body(request)
        webhook = WebhookRequest(
            body=body,
            headers={key.lower(): value for key, value in request.headers.items()},
            url=str(request.url),
            remote_addr=request.remote,
        )
        env = self.settings.env
        try:
            if provider == "ses":  # may fetch the SNS signing certificate: keep it off the loop
                await asyncio.get_running_loop().run_in_executor(
                    None, adapter.verify, webhook, env, time.time()
                )
            else:
                adapter.verify(webhook, env, time.time())
            parsed = adapter.parse(webhook, self.settings.id_salt)
        except SignatureError as exc:
            self.ingest.counters.signature_failures.labels(provider).inc()
            return self._json({"error": exc.reason}, exc.status)
        except ConfigError as exc:
            log.error("webhook %s misconfigured: %s", provider, exc.reason)
            return self._json({"error": exc.reason}, 503)  # the provider retries once it is fixed
        except WebhookError as exc:
            return self._json({"error": exc.reason}, exc.status)
        if parsed.confirm_url:
            return await self._confirm_subscription(parsed.confirm_url)
        self.ingest.counters.ignored.labels(provider).inc(parsed.ignored)
        valid, rejected = self.ingest.prepare(parsed.events)
        try:
            await self.ingest.submit(valid, rejected, provider)
        except (BrokerUnavailable, Overloaded):
            return self._json({"error": "broker_unavailable", "retry": True}, 503)
        return self._json(
            {
                "accepted": len(valid),
                "rejected": [{"index": i, "reason": r} for i, _, r in rejected],
                "ignored": parsed.ignored,
                "malformed": parsed.malformed,
            },
            200,
        )

    async def _confirm_subscription(self, url: str) -> web.Response:
        """SNS SubscriptionConfirmation: GET the SubscribeURL (the adapter checked its host)."""
        try:
            async with ClientSession(timeout=ClientTimeout(total=10)) as session, session.get(url) as resp:
                if resp.status != 200:
                    return self._json({"error": "subscription_confirmation_failed"}, 503)
        except (TimeoutError, ClientError):
            return self._json({"error": "subscription_confirmation_failed"}, 503)
        log.info("confirmed the SNS subscription")
        return self._json({"confirmed": True}, 200)


def add_webhook_routes(web_app: WebApp, ingest: IngestService, settings: Settings) -> None:
    handler = WebhookHandler(web_app, ingest, settings)
    web_app.app.router.add_post("/webhooks/{provider}", handler.handle)
