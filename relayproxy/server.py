"""The client-facing ESMTP server as Twisted sees it: bytes, timers, TLS and back-pressure.

What the bytes mean is relayproxy.smtp.session's business, what to do about it relayproxy.relay's.
"""

from __future__ import annotations

import secrets
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from relayproxy.deadline import Deadline
from relayproxy.explain import hint
from relayproxy.logs import EventLog
from relayproxy.relay import Relay, ServerSettings
from relayproxy.smtp.reply import Catalogue
from relayproxy.smtp.session import State
from relayproxy.transport import write_now

__all__ = ["SMTPServerFactory", "SMTPServerProtocol", "ServerSettings"]

log = EventLog("relayproxy.server")

_PAUSE_PIPELINE_AT = 64 * 1024
"""Pipelined bytes we hold while a command waits for the upstream, before we stop reading."""

_CLOSE_GRACE = 5.0
"""Seconds a closing connection may take to say goodbye before it is aborted."""


@implementer(IPushProducer)
class _ReadGate:
    """Stops reading from the client while any reason holds (pipelined backlog, slow upstream)."""

    def __init__(self, protocol: SMTPServerProtocol) -> None:
        self._protocol = protocol
        self._reasons: set[str] = set()

    def hold(self, reason: str) -> None:
        if not self._reasons and self._protocol.transport is not None:
            self._protocol.transport.pauseProducing()  # type: ignore[attr-defined]
        self._reasons.add(reason)

    def release(self, reason: str) -> None:
        if reason in self._reasons:
            self._reasons.discard(reason)
            if not self._reasons and self._protocol.transport is not None:
                self._protocol.transport.resumeProducing()  # type: ignore[attr-defined]

    # IPushProducer, for the upstream transport: back-pressure while the body streams.
    def pauseProducing(self) -> None:
        self.hold("upstream")

    def resumeProducing(self) -> None:
        self.release("upstream")

    def stopProducing(self) -> None:
        self.release("upstream")


class SMTPServerProtocol(Protocol):
    def __init__(self, settings: ServerSettings) -> None:
        self.s = settings
        self.session_id = secrets.token_hex(4)
        self.peer = "unknown"
        self.gate = _ReadGate(self)
        self.relay: Relay | None = None
        self._closed = False
        self._counted = False
        self._timer: IDelayedCall | None = None
        """The greeting delay, then the grace a closing connection gets."""
        self._session_timer: IDelayedCall | None = None
        self._idle_timeout = Deadline(settings.clock, self._timed_out)
        """The client's silence; stopped while we work for it."""
        self._draining = False

    # -- Twisted events -------------------------------------------------------------------------

    def connectionMade(self) -> None:
        if isinstance(self.factory, SMTPServerFactory):
            self.factory.opened(self)
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.peer = getattr(peer, "host", str(peer))
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        if not self.s.connections.open(self.peer):
            log.warn("connection refused", session=self.session_id, client=self.peer, reason="too many connections")
            self.s.metrics.connection_refused("too many connections")
            self.write(Catalogue.too_many_connections(self.s.server.hostname).to_bytes())
            self.close()
            return
        self._counted = True
        self.s.metrics.session_opened()
        self.relay = Relay(self.s, self, self.peer, self.session_id)
        self._session_timer = self.s.clock.callLater(self.s.limits.session_timeout, self._timed_out)
        if self.s.limits.greeting_delay > 0:
            # Until the greeting, the client has no business talking (RFC 5321 4.3.1); spambots
            # and scripted attacks usually do.
            self._timer = self.s.clock.callLater(self.s.limits.greeting_delay, self.relay.greet)
        else:
            self.relay.greet()

    def dataReceived(self, data: bytes) -> None:
        if self.relay is not None and not self._closed:
            self.relay.received(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # type: ignore[no-untyped-call]
        self._closed = True
        self._cancel_timers()
        if self._session_timer is not None and self._session_timer.active():
            self._session_timer.cancel()
        if self._counted:
            self._counted = False
            self.s.connections.close(self.peer)
            self.s.metrics.session_closed()
        if self.relay is not None:
            self.relay.lost()
        if isinstance(self.factory, SMTPServerFactory):
            self.factory.closed(self)

    # -- what the relay needs (ClientIO) ----------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self._closed:
            write_now(self.transport, data)

    def start_tls(self) -> None:
        self.transport.startTLS(self.s.tls_options)  # type: ignore[union-attr]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._cancel_timers()
            self.transport.loseConnection()  # type: ignore[union-attr]
            # Over TLS, loseConnection waits for the client's close_notify; a client that never
            # reads again would hold the session (and a graceful shutdown) open.
            self._timer = self.s.clock.callLater(_CLOSE_GRACE, self.transport.abortConnection)  # type: ignore[union-attr]

    def settle(self) -> None:
        relay = self.relay
        if self._closed or relay is None:
            return
        machine = relay.machine
        if machine.state is State.GREETING:
            return
        if machine.waiting is not None:
            # The client's idle timer stops while we work (or wait for the upstream) on its behalf.
            self._idle_timeout.stop()
            if machine.buffered > _PAUSE_PIPELINE_AT:
                self.gate.hold("pipeline")
            return
        self.gate.release("pipeline")
        if self._draining and machine.idle:
            self._shut_down()
            return
        self._idle_timeout.start(self.s.limits.data_timeout if machine.state is State.BODY else self.s.limits.command_timeout)

    # -- timers and shutdown --------------------------------------------------------------------

    def _cancel_timers(self) -> None:
        self._idle_timeout.cancel()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        assert self.relay is not None
        in_body = self.relay.machine.state is State.BODY
        situation = "data-timeout" if in_body else "command-timeout"
        log.info(
            "timeout", session=self.session_id, client=self.peer, user=self.relay.username, situation=situation,
            hint=hint(421, "4.4.2", side="client", command="DATA" if in_body else "any", situation=situation),
        )
        self.relay.end_with(Catalogue.timeout(self.s.server.hostname))

    def drain(self) -> None:
        """Shutting down: close now if idle, else after the transaction in progress."""
        self._draining = True
        if self.relay is not None and self.relay.machine.idle and not self._closed:
            self._shut_down()

    def force_close(self) -> None:
        """The grace period is over. A session waiting for the upstream's verdict on a complete
        message still gets it: cutting it would report a failure for mail that may be delivered."""
        if not self._closed and self.relay is not None and not self.relay.awaiting_verdict:
            self._shut_down()

    def _shut_down(self) -> None:
        assert self.relay is not None
        self.relay.end_with(Catalogue.shutting_down(self.s.server.hostname))


class SMTPServerFactory(Factory):
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.sessions: set[SMTPServerProtocol] = set()
        self._emptied: list[defer.Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> SMTPServerProtocol:
        protocol = SMTPServerProtocol(self.settings)
        protocol.factory = self
        return protocol

    def opened(self, session: SMTPServerProtocol) -> None:
        self.sessions.add(session)

    def closed(self, session: SMTPServerProtocol) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            waiters, self._emptied = self._emptied, []
            for waiter in waiters:
                waiter.callback(None)

    def when_empty(self) -> defer.Deferred[None]:
        if not self.sessions:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._emptied.append(waiter)
        return waiter
