"""HTTPS requests through treq, the one HTTP client of relayproxy (token endpoints, Microsoft Graph).

``client`` makes a treq HTTPClient that verifies the certificate chain and the host name against
``ca_file`` or the system's store, and keeps no cookies; ``fetch`` sends one request and reads
its answer within an overall deadline and a bound on the body, failing with ``RequestFailed``
whose text names what went wrong in one line and never carries the request's headers or body
(where credentials travel).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from http.cookiejar import DefaultCookiePolicy
from pathlib import Path
from typing import Any

from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    _HTTP11ClientFactory,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from relayproxy.errors import RelayProxyError
from relayproxy.trust import trust_root

MAX_TEXT = 300
"""Texts of a peer or a library are echoed into logs: bounded, so a broken peer cannot flood them."""

USER_AGENT = "relayproxy"

# The web client's failures that wrap the connection's own (such as the TLS handshake's).
_FAILED_WITH_REASONS = (ResponseNeverReceived, ResponseFailed, RequestTransmissionFailed, RequestGenerationFailed)


class RequestFailed(RelayProxyError):
    """No complete answer; ``what`` says why, in one line without credentials."""

    def __init__(self, what: str, *, timed_out: bool = False) -> None:
        super().__init__(what)
        self.what = what
        self.timed_out = timed_out


def one_line(text: str, limit: int = MAX_TEXT) -> str:
    """Peer or library text made safe for one log line."""
    printable = "".join(c if c.isprintable() else " " for c in text)
    return printable if len(printable) <= limit else printable[:limit] + "…"


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False


def client(reactor: Any, ca_file: Path | None, *, pool: HTTPConnectionPool | None = None) -> HTTPClient:
    """A treq client for ``https://`` URLs whose certificates chain to ``ca_file`` (None: the system's store)."""
    if pool is None:
        pool = HTTPConnectionPool(reactor, persistent=False)  # type: ignore[no-untyped-call]
    # A "Starting factory" log line per request and connection is noise.
    pool._factory = _QuietFactory
    # BrowserLikePolicyForHTTPS verifies the chain and the host name; None means the system's trust.
    agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trust_root(ca_file)), pool=pool)  # type: ignore[no-untyped-call]
    # No cookies: a token endpoint's session cookies (Microsoft sets several) would tie one
    # request to the next, which no request here wants, and would be one more thing kept.
    return HTTPClient(agent, cookiejar=IndexableCookieJar(DefaultCookiePolicy(allowed_domains=[])))


async def fetch(
    reactor: Any,
    http: HTTPClient,
    method: str,
    url: str,
    *,
    timeout: float,
    limit: int,
    headers: Mapping[str, Sequence[str]] | None = None,
    data: Any = None,
) -> tuple[int, Headers, bytes]:
    """The status, headers and body (at most ``limit`` bytes) of ``url``'s answer within ``timeout`` s.

    Redirects are not followed: a redirected POST would carry its credentials somewhere else.
    """
    exchange = defer.Deferred.fromCoroutine(_exchange(http, method, url, headers, data, limit))
    # One deadline for connecting, sending and the whole answer, on the reactor that does the I/O.
    # Not treq's timeout, which ends with the response's headers; not addTimeout either: a
    # cancelled request fails with ResponseNeverReceived, not CancelledError.
    timer = reactor.callLater(timeout, exchange.cancel)
    try:
        return await exchange
    except RequestFailed:
        raise
    except Exception as e:
        if not timer.active():
            raise RequestFailed(f"no answer within {timeout:g} s", timed_out=True) from None
        if isinstance(e, _FAILED_WITH_REASONS):
            # The reasons of a failed TLS handshake include "certificate verify failed".
            raise RequestFailed("no answer: " + "; ".join(one_line(r.getErrorMessage()) for r in e.reasons)) from None
        raise RequestFailed(f"request failed: {one_line(str(e)) or type(e).__name__}") from None
    finally:
        if timer.active():
            timer.cancel()


async def _exchange(
    http: HTTPClient, method: str, url: str, headers: Mapping[str, Sequence[str]] | None, data: Any, limit: int
) -> tuple[int, Headers, bytes]:
    sent = Headers({"User-Agent": [USER_AGENT]})
    for name, values in (headers or {}).items():
        sent.setRawHeaders(name, list(values))
    # unbuffered: the body goes to read_body as it arrives, not into treq's buffer first.
    response = await http.request(method, url, headers=sent, data=data, allow_redirects=False, unbuffered=True)
    return response.code, response.headers, await read_body(response, limit)


def read_body(response: IResponse, limit: int) -> defer.Deferred[bytes]:
    """The body of ``response``, at most ``limit`` bytes.

    treq.content has no bound, and treq.collect cannot be cancelled (the deadline would leave the
    connection open, waiting for a peer that never answers); this closes the connection in both
    cases.
    """
    done: defer.Deferred[bytes] = defer.Deferred(lambda _: body.drop())
    body = _Body(done, limit)
    response.deliverBody(body)  # type: ignore[no-untyped-call]
    return done


class _Body(Protocol):
    """Collects a response body of at most ``limit`` bytes."""

    def __init__(self, done: defer.Deferred[bytes], limit: int) -> None:
        self._done = done
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self._done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._done.errback(RequestFailed(f"the answer is larger than {self._limit} bytes"))
            self.drop()
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # type: ignore[no-untyped-call]
        if self._done.called:
            return
        # PotentialDataLoss: an answer without Content-Length, ended by closing; whether it is
        # whole is for the caller to judge (a cut JSON object does not parse).
        if reason.check(ResponseDone, PotentialDataLoss):  # type: ignore[no-untyped-call]
            self._done.callback(b"".join(self._parts))
        else:
            self._done.errback(reason)

    def drop(self) -> None:
        # The response's transport can only stop producing, which closes the connection.
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]
