"""Prometheus metrics: the ``Metrics`` calls as counters and histograms, served by twisted.web.

``PrometheusMetrics`` keeps its own ``CollectorRegistry`` (never prometheus_client's global one),
so several can live in one process (tests, a service rebuilt in place). ``metrics_service`` serves
it on the ``[metrics] endpoint`` of the configuration:

- ``GET /metrics``: the Prometheus text format;
- ``GET /healthz``: ``200 ok`` while the SMTP listeners are listening, ``503`` once shutdown began;
- anything else: 404.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from relayproxy.listening import ListenerService
from relayproxy.metrics import AuthOutcome, MessageOutcome, SpoolOutcome, UpstreamPhase

# From a loopback smarthost's reply (5 ms) to a provider that ponders a large body (60 s).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)

_AUTH_OUTCOMES: tuple[AuthOutcome, ...] = ("ok", "failed", "throttled", "error")


class PrometheusMetrics:
    """The ``relayproxy.metrics.Metrics`` protocol as Prometheus metrics in ``self.registry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions_active = Gauge(
            "relayproxy_sessions_active", "SMTP client sessions open now.", registry=r
        )
        self.sessions = Counter(
            "relayproxy_sessions", "SMTP client sessions accepted (not counting refused connections).", registry=r
        )
        self.connections_refused = Counter(
            "relayproxy_connections_refused",
            "Client connections closed at once, by reason (too many connections, early talker).",
            ["reason"],
            registry=r,
        )
        self.auths = Counter(
            "relayproxy_auth", "Client AUTH attempts by outcome (ok, failed, throttled, error).", ["outcome"], registry=r
        )
        self.auth_throttled = Counter(
            "relayproxy_auth_throttled",
            "Client AUTH attempts answered 454 without a password check (address or user name backed off).",
            registry=r,
        )
        self.messages = Counter(
            "relayproxy_messages",
            "Messages by user, upstream and outcome (relayed, spooled, refused by the upstream, failed).",
            ["user", "upstream", "outcome"],
            registry=r,
        )
        self.relayed_bytes = Counter(
            "relayproxy_relayed_bytes",
            "Size of the messages the upstream accepted, in bytes, by upstream.",
            ["upstream"],
            registry=r,
        )
        self.upstream_latency_seconds = Histogram(
            "relayproxy_upstream_latency_seconds",
            "Upstream latency by phase: connect (to the greeting), tls, auth, end_of_data (final dot to reply).",
            ["upstream", "phase"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.spool_messages = Gauge(
            "relayproxy_spool_messages", "Messages waiting in the spool (queue/), as of its last read.", registry=r
        )
        self.spool_oldest_age_seconds = Gauge(
            "relayproxy_spool_oldest_age_seconds", "Age of the oldest message waiting in the spool, in seconds (0: none).", registry=r
        )
        self.spool_deliveries = Counter(
            "relayproxy_spool_deliveries",
            "Recipients of spooled messages by upstream and outcome of a delivery attempt (delivered, deferred, "
            "bounced: refused for good, expired: past max_age) and spool files moved aside as corrupt.",
            ["upstream", "outcome"],
            registry=r,
        )
        # Series that should read 0 rather than be absent before the first event.
        for outcome in _AUTH_OUTCOMES:
            self.auths.labels(outcome=outcome)

    def session_opened(self) -> None:
        self.sessions_active.inc()
        self.sessions.inc()

    def session_closed(self) -> None:
        self.sessions_active.dec()

    def connection_refused(self, reason: str) -> None:
        self.connections_refused.labels(reason=reason).inc()

    def auth(self, outcome: AuthOutcome) -> None:
        self.auths.labels(outcome=outcome).inc()
        if outcome == "throttled":
            self.auth_throttled.inc()

    def message(self, user: str, upstream: str, outcome: MessageOutcome, size: int) -> None:
        self.messages.labels(user=user, upstream=upstream, outcome=outcome).inc()
        if outcome == "relayed":
            self.relayed_bytes.labels(upstream=upstream).inc(size)

    def upstream_latency(self, upstream: str, phase: UpstreamPhase, seconds: float) -> None:
        self.upstream_latency_seconds.labels(upstream=upstream, phase=phase).observe(max(seconds, 0.0))

    def spool_delivery(self, upstream: str, outcome: SpoolOutcome, count: int = 1) -> None:
        self.spool_deliveries.labels(upstream=upstream, outcome=outcome).inc(count)

    def spool_state(self, messages: int, oldest_age: float) -> None:
        self.spool_messages.set(messages)
        self.spool_oldest_age_seconds.set(max(oldest_age, 0.0))

    def exposition(self) -> bytes:
        """The Prometheus text format of everything in ``registry``."""
        return generate_latest(self.registry)


class MetricsResource(Resource):
    """``/metrics``, ``/healthz`` and 404 for every other path (exact paths, query ignored)."""

    isLeaf = True

    def __init__(self, metrics: PrometheusMetrics, healthy: Callable[[], bool]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._metrics = metrics
        self._healthy = healthy

    def render(self, request: Request) -> bytes:
        if request.method in (b"GET", b"HEAD"):
            body: bytes = super().render(request)  # type: ignore[no-untyped-call]
            return body
        request.setResponseCode(405)
        request.responseHeaders.setRawHeaders(b"Allow", [b"GET, HEAD"])
        request.responseHeaders.setRawHeaders(b"Content-Type", [b"text/plain; charset=utf-8"])
        return b"method not allowed\n"

    def render_GET(self, request: Request) -> bytes:
        headers = request.responseHeaders
        headers.setRawHeaders(b"Cache-Control", [b"no-store"])
        if request.path == b"/metrics":
            headers.setRawHeaders(b"Content-Type", [CONTENT_TYPE_LATEST.encode("ascii")])
            return self._metrics.exposition()
        headers.setRawHeaders(b"Content-Type", [b"text/plain; charset=utf-8"])
        if request.path == b"/healthz":
            if self._healthy():
                return b"ok\n"
            request.setResponseCode(503)
            return b"not listening\n"
        request.setResponseCode(404)
        return b"not found: try /metrics or /healthz\n"


class QuietSite(Site):
    """A Site that writes no access log line per request: a scrape every 15 s is no news."""

    noisy = False

    def log(self, request: http.Request) -> None:
        pass


class MetricsService(ListenerService):
    """Serves the metrics site; on stop it keeps serving until ``until()`` fires.

    ``until`` is the end of the relay's shutdown drain, so that ``/healthz`` answers 503 (and
    ``/metrics`` can still be scraped) while transactions in flight finish, instead of the port
    vanishing at the first moment of the shutdown.
    """

    def __init__(self, description: str, endpoint: IStreamServerEndpoint, site: Site, until: Callable[[], defer.Deferred[Any]]) -> None:
        super().__init__(description, endpoint, site)
        self._until = until

    def stopService(self) -> defer.Deferred[None]:
        stop: Callable[[], defer.Deferred[None]] = super().stopService
        return self._until().addBoth(lambda _: stop())


def metrics_service(
    reactor: Any,
    endpoint: str,
    metrics: PrometheusMetrics,
    healthy: Callable[[], bool],
    until: Callable[[], defer.Deferred[Any]] = lambda: defer.succeed(None),
) -> MetricsService:
    """A service serving ``metrics`` over HTTP on the Twisted server endpoint string ``endpoint``."""
    site = QuietSite(MetricsResource(metrics, healthy))  # type: ignore[no-untyped-call]
    return MetricsService(endpoint, serverFromString(reactor, endpoint), site, until)  # type: ignore[no-untyped-call]
