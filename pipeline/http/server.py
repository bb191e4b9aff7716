"""HTTP endpoints of a worker (*HTTP endpoints* in ``pipeline/README.md``), on aiohttp.

One listener serves everything, unless an admin port is configured: then the public listener
serves only ``POST /events``, ``POST /webhooks/*`` and ``GET /livez``, and ``/health``,
``/metrics`` and ``/campaigns`` answer on the admin listener only. The same holds when ingest
runs in processes of its own beside the stream worker (see :class:`WebApp`).

Every handler answers with a documented status: a client can never cause a 500 (the
middleware turns an unexpected error into a logged 500 that the tests treat as a failure).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import ClientError, ClientSession, ClientTimeout, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from yarl import URL

from pipeline.events import BodyError, parse_body
from pipeline.http.security import EVENTS, served_endpoints, tls_context
from pipeline.ingest.producer import BrokerUnavailable
from pipeline.ingest.service import IngestService, Overloaded
from pipeline.metrics.collector import HealthCounters
from pipeline.rules.aggregate import CampaignView
from pipeline.rules.rates import compute_rates, definitions
from pipeline.settings import Settings

log = logging.getLogger(__name__)
READ_TIMEOUT = 30.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(doc: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json")


def error(status: int, reason: str, **extra: Any) -> web.Response:
    return json_response({"error": reason, **extra}, status=status)


def campaign_document(
    view: CampaignView,
    settings: Settings,
    unsupported: frozenset[str],
    history: bool = False,
    diagnosis: dict[str, Any] | None = None,
) -> dict[str, Any]:
    denominator = settings.email_denominator if view.channel == "email" else "impression"
    rates: dict[str, Any] = {
        "all": compute_rates(view.channel, view.totals, settings.email_denominator, unsupported)
    }
    windows: dict[str, Any] = {}
    for label, shown in view.complete_windows(settings.window_labels, settings.allowed_lateness):
        window_rates = compute_rates(view.channel, shown.counts, settings.email_denominator, unsupported)
        rates[label] = window_rates
        windows[label] = {
            "start": shown.start,
            "end": shown.end,
            "counts": shown.counts,
            "rates": window_rates,
        }
    doc: dict[str, Any] = {
        "channel": view.channel,
        "campaign_id": view.campaign,
        "denominator": denominator,
        "rate_definitions": {
            rate: {"numerator": n, "denominator": d}
            for rate, (n, d) in definitions(view.channel, settings.email_denominator).items()
        },
        "counts": view.totals,
        "rates": rates,
        "windows": windows,
        "unsupported_rates": sorted(unsupported),
        "sources": view.sources,
        "duplicates_dropped": view.duplicates,
        "late_events": view.late,
        "watermark": view.watermark,
        "diagnosis": diagnosis,
    }
    if history:
        doc["window_history"] = {
            label: [
                {
                    "start": start,
                    "end": start + size,
                    "counts": counts,
                    "rates": compute_rates(view.channel, counts, settings.email_denominator, unsupported),
                }
                for start, counts in sorted(view.windows.get(size, {}).items())
            ]
            for size, label in settings.window_labels.items()
        }
    return doc


PUBLIC = "public"  # one process: every endpoint (on the public port, or split with the admin port)
INGEST = "ingest"  # an ingest process: the public port's ingest endpoints, shared with its siblings
STREAM = "stream"  # the stream worker beside ingest processes: /health, /metrics, /campaigns only
PROXIED = ("/health", "/metrics", "/campaigns", "/campaigns/{channel}/{campaign_id}")


class WebApp:
    """The HTTP endpoints of one process, by its role.

    ``public`` (one process does everything): as described at the top of this module.
    With ingest processes beside the stream worker (:mod:`pipeline.ingest.processes`), each
    ``ingest`` process serves the public port's ``POST`` endpoints and ``/livez`` (the
    processes share the port, the kernel spreads connections over them), and the ``stream``
    worker serves ``/health``, ``/metrics`` and ``/campaigns``: on the admin listener when
    there is one, else on a loopback-only internal port, where the ingest processes forward
    those requests from the public port, so every path answers where it always did.
    """

    def __init__(
        self,
        settings: Settings,
        counters: HealthCounters,
        registry: CollectorRegistry | None,
        views: Callable[[], list[CampaignView]] | None,
        consuming: Callable[[], bool],
        unsupported: Callable[[CampaignView], frozenset[str]] | None,
        diagnose: Callable[[CampaignView], dict[str, Any]] | None = None,
        extra_routes: Callable[[WebApp], None] | None = None,
        ingest: IngestService | None = None,
        role: str = PUBLIC,
        upstream: str | None = None,
        exposition: Callable[[], bytes] | None = None,
    ) -> None:
        self.settings = settings
        self.counters = counters
        self.ingest = ingest
        self.registry = registry
        self.views = views
        self.consuming = consuming
        self.unsupported = unsupported
        self.diagnose = diagnose
        self.role = role
        self.exposition = exposition  # text /metrics begins with (the funnel families)
        self.upstream = upstream  # INGEST: where the stream worker's endpoints answer
        self.internal_port: int | None = None  # STREAM without an admin port: the port it got
        self._client: ClientSession | None = None
        self._runners: list[web.AppRunner] = []
        # requests the ingest processes forward to the internal port were counted there already
        self._counted = not (role == STREAM and settings.admin_port is None)
        self.app = self._application()
        if role == STREAM:
            # no public listener: the ingest processes hold the public port
            self.admin_app = self.app
            self.app.router.add_get("/livez", self.livez)
            self._add_stream_routes(self.app)
            return
        # the public listener takes ingest; the admin listener (when configured) what is internal
        self.admin_app = self._application() if settings.admin_port is not None else self.app
        self.app.router.add_get("/livez", self.livez)
        if self.admin_app is not self.app:
            self.admin_app.router.add_get("/livez", self.livez)
        if role == INGEST:
            if self.admin_app is self.app:
                for path in PROXIED:
                    self.app.router.add_get(path, self.forward)
        else:
            self._add_stream_routes(self.admin_app)
        if EVENTS in served_endpoints(settings):
            self.app.router.add_post("/events", self.events)
        if extra_routes is not None:
            extra_routes(self)

    def _add_stream_routes(self, app: web.Application) -> None:
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/campaigns", self.campaigns)
        app.router.add_get("/campaigns/{channel}/{campaign_id}", self.campaign)

    def _application(self) -> web.Application:
        return web.Application(client_max_size=self.settings.max_body_bytes, middlewares=[self._middleware])

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.resource
        endpoint = route.canonical if route is not None else "unmatched"
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
        except Exception:
            log.exception("unexpected error on %s", endpoint)
            response = error(500, "internal_error")
        if self._counted:
            self.counters.requests.labels(endpoint, str(response.status)).inc()
        if (
            isinstance(response, web.HTTPException)
            and response.status >= 400
            and not response.text.startswith("{")
        ):
            return error(response.status, response.reason.lower().replace(" ", "_"))
        return response

    def _listeners(self) -> list[tuple[web.Application, str, int, Any, bool]]:
        """(app, host, port, TLS context, shared with sibling processes) of each listener."""
        settings = self.settings
        if self.role == STREAM:
            if settings.admin_port is not None:
                return [(self.app, settings.admin_host, settings.admin_port, None, False)]
            return [(self.app, "127.0.0.1", 0, None, False)]  # internal: loopback, any free port
        shared = self.role == INGEST
        listeners = [(self.app, settings.host, settings.port, tls_context(settings), shared)]
        if self.admin_app is not self.app and self.role != INGEST:
            listeners.append((self.admin_app, settings.admin_host, settings.admin_port, None, False))
        return listeners

    async def start(self) -> None:
        for app, host, port, tls, shared in self._listeners():
            # keepalive_timeout bounds more than idle keep-alive: aiohttp arms it when a connection
            # opens and after each response, and closes a connection that has not delivered a
            # complete request head when it fires, however slowly bytes trickle in (slow-loris).
            # Slow bodies time out in read_body.
            runner = web.AppRunner(
                app,
                access_log=None,
                handler_cancellation=True,
                keepalive_timeout=self.settings.header_timeout,
            )
            await runner.setup()
            self._runners.append(runner)
            # reuse_port: the ingest processes bind the same port, and the kernel spreads the
            # incoming connections over them (SO_REUSEPORT)
            site = web.TCPSite(
                runner, host, port, shutdown_timeout=5.0, ssl_context=tls, reuse_port=shared or None
            )
            await site.start()
            if port == 0:
                server = site._server
                assert server is not None and server.sockets
                self.internal_port = server.sockets[0].getsockname()[1]
            log.info("%s on %s", "HTTP" if app is self.app else "admin HTTP", site.name)

    async def stop(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def forward(self, request: web.Request) -> web.StreamResponse:
        """An ingest process passes ``/health``, ``/metrics`` and ``/campaigns`` to the stream
        worker, path and query as they came; while it does not answer: 503 ``starting``."""
        if self._client is None:
            self._client = ClientSession(timeout=ClientTimeout(total=READ_TIMEOUT))
        url = URL(f"{self.upstream}{request.raw_path}", encoded=True)
        try:
            async with self._client.get(url) as upstream:
                body = await upstream.read()
                content_type = upstream.headers.get("Content-Type", "application/json")
                return web.Response(body=body, status=upstream.status, headers={"Content-Type": content_type})
        except (ClientError, TimeoutError):
            if request.path == "/health":
                return json_response({"status": "starting", "consuming": False}, status=503)
            return error(503, "stream_worker_unavailable", retry=True)

    async def read_body(self, request: web.Request) -> bytes:
        """The body, bounded in size (413) and in time for slow clients (408)."""
        if request.content_length is not None and request.content_length > self.settings.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(
                max_size=self.settings.max_body_bytes, actual_size=request.content_length
            )
        try:
            return await asyncio.wait_for(request.read(), READ_TIMEOUT)
        except TimeoutError:
            raise web.HTTPRequestTimeout() from None

    def authorised(self, request: web.Request) -> bool:
        token = self.settings.ingest_token
        if not token:
            return True
        header = request.headers.get("Authorization", "")
        return hmac.compare_digest(
            header.encode("utf-8", "surrogateescape"), f"Bearer {token}".encode("utf-8", "surrogateescape")
        )

    async def livez(self, request: web.Request) -> web.Response:
        """Liveness: the process answers. Says nothing about campaigns or the broker."""
        return json_response({"status": "alive"})

    async def health(self, request: web.Request) -> web.Response:
        ok = self.consuming()
        return json_response(
            {"status": "ok" if ok else "starting", "consuming": ok}, status=200 if ok else 503
        )

    async def metrics(self, request: web.Request) -> web.Response:
        assert self.registry is not None
        body = generate_latest(self.registry)
        if self.exposition is not None:
            body = self.exposition() + body
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def events(self, request: web.Request) -> web.Response:
        if not self.authorised(request):
            return error(401, "missing_or_bad_token")
        body = await self.read_body(request)
        try:
            items = parse_body(body)
        except BodyError as exc:
            return error(400, "unparseable_body", detail=str(exc))
        if len(items) > self.settings.max_events_per_request:
            return error(413, "too_many_events", limit=self.settings.max_events_per_request)
        assert self.ingest is not None
        valid, rejected = self.ingest.prepare(items)
        try:
            await self.ingest.submit(valid, rejected, "canonical")
        except BrokerUnavailable as exc:
            return error(503, "broker_unavailable", detail=str(exc), retry=True)
        except Overloaded as exc:
            return error(503, "overloaded", detail=str(exc), retry=True)
        doc = {"accepted": len(valid), "rejected": [{"index": i, "reason": r} for i, _, r in rejected]}
        return json_response(doc, status=202 if valid or not rejected else 400)

    def _document(self, view: CampaignView, history: bool = False) -> dict[str, Any]:
        assert self.unsupported is not None
        diagnosis = self.diagnose(view) if self.diagnose is not None else None
        return campaign_document(view, self.settings, self.unsupported(view), history, diagnosis)

    async def campaigns(self, request: web.Request) -> web.Response:
        assert self.views is not None
        views = sorted(self.views(), key=lambda v: (v.channel, v.campaign))
        return json_response({"campaigns": [self._document(v) for v in views]})

    async def campaign(self, request: web.Request) -> web.Response:
        channel, campaign = request.match_info["channel"], request.match_info["campaign_id"]
        assert self.views is not None
        for view in self.views():
            if view.channel == channel and view.campaign == campaign:
                return json_response(self._document(view, history=True))
        return error(404, "campaign_not_owned_here", detail="unknown campaign, or owned by another worker")
