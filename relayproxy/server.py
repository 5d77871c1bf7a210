"""The client-facing ESMTP server as Twisted sees it: bytes, timers, TLS and back-pressure.

What the bytes mean is relayproxy.smtp.session's business, what to do about it relayproxy.relay's.
"""

from __future__ import annotations

import secrets
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from relayproxy.config.sections import in_networks
from relayproxy.deadline import Deadline
from relayproxy.explain import hint
from relayproxy.limits import Slot
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

_SITUATIONS = {
    "command_timeout": "command-timeout", "data_timeout": "data-timeout", "min_data_rate": "data-rate",
    "session_timeout": "session-timeout", "unauthenticated_timeout": "unauthenticated-timeout",
}
"""The explain hint for each limit that ends a session with 421 4.4.2."""


@implementer(IPushProducer)
class _ReadGate:
    """Stops reading from the client while any reason holds (pipelined backlog, slow upstream)."""

    def __init__(self, protocol: SMTPServerProtocol, clock: IReactorTime) -> None:
        self._protocol = protocol
        self._clock = clock
        self._reasons: set[str] = set()
        self._paused_since: float | None = None
        self._paused = 0.0

    def hold(self, reason: str) -> None:
        if not self._reasons:
            self._paused_since = self._clock.seconds()
            if self._protocol.transport is not None:
                self._protocol.transport.pauseProducing()  # type: ignore[attr-defined]
        self._reasons.add(reason)

    def release(self, reason: str) -> None:
        if reason in self._reasons:
            self._reasons.discard(reason)
            if not self._reasons:
                self._paused += self._clock.seconds() - (self._paused_since or 0.0)
                self._paused_since = None
                if self._protocol.transport is not None:
                    self._protocol.transport.resumeProducing()  # type: ignore[attr-defined]

    def paused(self) -> float:
        """Seconds we have not read from the client so far, of our own accord."""
        since = self._paused_since
        return self._paused + (self._clock.seconds() - since if since is not None else 0.0)

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
        self.gate = _ReadGate(self, settings.clock)
        self.relay: Relay | None = None
        self._closed = False
        self._slot: Slot | None = None
        self._timer: IDelayedCall | None = None
        """The greeting delay, then the grace a closing connection gets."""
        self._session_timer: IDelayedCall | None = None
        self._unauthenticated_timer: IDelayedCall | None = None
        self._idle_timeout = Deadline(settings.clock, self._idle_expired)
        """The client's silence, and how long a command line may take; stopped while we work for it."""
        self._connected_at = 0.0
        self._line_started = 0.0
        """When the command line being read began (or the last one ended): it must end within command_timeout."""
        self._body_started: float | None = None
        self._body_bytes = 0
        self._body_paused = 0.0
        self._receiving = False
        self._was_waiting = False
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
        listener = self.s.listener
        if listener.allowed_networks and not in_networks(self.peer, listener.allowed_networks):
            # Before a connection slot or a session: a stranger costs nothing but this line.
            log.warn(
                "connection refused", session=self.session_id, client=self.peer, reason="not in allowed_networks",
                endpoint=listener.endpoint, hint=hint(554, "5.7.1", side="client", command="greeting"),
            )
            self.s.metrics.connection_refused("network not allowed")
            self.write(Catalogue.network_refused(self.s.server.hostname).to_bytes())
            self.close()
            return
        slot = self.s.connections.open(self.peer)
        if isinstance(slot, str):
            log.warn("connection refused", session=self.session_id, client=self.peer, reason="too many connections", limit=slot)
            self.s.metrics.connection_refused("too many connections")
            self.write(Catalogue.too_many_connections(self.s.server.hostname).to_bytes())
            self.close()
            return
        self._slot = slot
        self.s.metrics.session_opened()
        self.relay = Relay(self.s, self, self.peer, self.session_id)
        clock, limits = self.s.clock, self.s.limits
        self._connected_at = self._line_started = clock.seconds()
        self._session_timer = clock.callLater(limits.session_timeout, self._timed_out, "session_timeout")
        self._unauthenticated_timer = clock.callLater(limits.unauthenticated_timeout, self._timed_out, "unauthenticated_timeout")
        if self.s.limits.greeting_delay > 0:
            # Until the greeting, the client has no business talking (RFC 5321 4.3.1); spambots
            # and scripted attacks usually do.
            self._timer = self.s.clock.callLater(self.s.limits.greeting_delay, self._greet)
        else:
            self._greet()

    def _greet(self) -> None:
        assert self.relay is not None
        self._line_started = self.s.clock.seconds()
        self.relay.greet()

    def dataReceived(self, data: bytes) -> None:
        relay = self.relay
        if relay is None or self._closed:
            return
        machine = relay.machine
        lines, partial, in_body = machine.lines_read, machine.partial_line, machine.state is State.BODY
        self._receiving = True
        try:
            relay.received(data)
        finally:
            self._receiving = False
        if in_body:
            self._body_bytes += len(data)
            if self._too_slow():
                return
        if not partial or machine.lines_read != lines:
            # A new command line begins with these bytes (or one ended): from now on it has
            # command_timeout to end; the bytes that follow it do not give it more.
            self._line_started = self.s.clock.seconds()
        self.settle()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # type: ignore[no-untyped-call]
        self._closed = True
        self._cancel_timers()
        for timer in (self._session_timer, self._unauthenticated_timer):
            if timer is not None and timer.active():
                timer.cancel()
        if self._slot is not None:
            self._slot.close()
            self._slot = None
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
        if self._closed or relay is None or self._receiving:
            return
        machine, clock, limits = relay.machine, self.s.clock, self.s.limits
        if machine.state is State.GREETING:
            return
        if self._slot is not None and (relay.user is not None) != self._slot.authenticated:
            self._authenticated(relay.user is not None)
        if machine.waiting is not None:
            # The client's timers stop while we work (or wait for the upstream) on its behalf.
            self._was_waiting = True
            self._idle_timeout.stop()
            if machine.buffered > _PAUSE_PIPELINE_AT:
                self.gate.hold("pipeline")
            return
        if self._was_waiting:
            self._was_waiting = False
            self._line_started = clock.seconds()
        self.gate.release("pipeline")
        if self._draining and machine.idle:
            self._shut_down()
            return
        if machine.state is not State.BODY:
            self._body_started = None
            self._idle_timeout.start(max(0.0, self._line_started + limits.command_timeout - clock.seconds()))
            return
        if self._body_started is None:
            self._body_started, self._body_bytes = clock.seconds(), 0
            self._body_paused = self.gate.paused()
        self._idle_timeout.start(limits.data_timeout)

    def _authenticated(self, authenticated: bool) -> None:
        """Authenticated sessions leave the count and the lifetime of the unauthenticated (and
        come back to them after a STARTTLS that forgot the login)."""
        assert self._slot is not None
        self._slot.set_authenticated(authenticated)
        timer = self._unauthenticated_timer
        running = timer is not None and timer.active()
        if authenticated and running:
            assert timer is not None
            timer.cancel()
        elif not authenticated and not running:
            left = self._connected_at + self.s.limits.unauthenticated_timeout - self.s.clock.seconds()
            self._unauthenticated_timer = self.s.clock.callLater(max(0.0, left), self._timed_out, "unauthenticated_timeout")

    def _too_slow(self) -> bool:
        """A body dripped slower than min_data_rate once data_rate_grace has passed: closed."""
        limits, started = self.s.limits, self._body_started
        if started is None or not limits.min_data_rate:
            return False
        # Time we paused reading ourselves, for a slow upstream, is not the client's.
        sending = self.s.clock.seconds() - started - (self.gate.paused() - self._body_paused)
        if sending <= limits.data_rate_grace or self._body_bytes >= limits.min_data_rate * sending:
            return False
        self._timed_out("min_data_rate")
        return True

    # -- timers and shutdown --------------------------------------------------------------------

    def _cancel_timers(self) -> None:
        self._idle_timeout.stop()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _idle_expired(self) -> None:
        assert self.relay is not None
        self._timed_out("data_timeout" if self.relay.machine.state is State.BODY else "command_timeout")

    def _timed_out(self, limit: str) -> None:
        """``limit`` (a [limits] key) is reached: 421 4.4.2, a log line naming it, and close."""
        assert self.relay is not None
        if self._closed:
            return
        in_body = self.relay.machine.state is State.BODY
        situation = _SITUATIONS[limit]
        log.info(
            "timeout", session=self.session_id, client=self.peer, user=self.relay.username, limit=limit, situation=situation,
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
