"""The Twisted protocol of one upstream connection: bytes to the pure ClientSession, replies to waiters.

Twisted's ESMTPClient is not used: it mangles line ends and dot-stuffing, accepts replies injected
before a STARTTLS handshake and puts the AUTH PLAIN payload in error texts (see the README).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from relayproxy.deadline import Deadline
from relayproxy.smtp.client import ClientSession
from relayproxy.smtp.reply import Reply, ReplyError
from relayproxy.transport import write_now


class Lost(Exception):
    """The upstream connection ended; ``reason`` is Twisted's failure."""

    def __init__(self, reason: Failure) -> None:
        super().__init__(reason.getErrorMessage())
        self.reason = reason


class Timeout(Exception):
    pass


class Desync(Exception):
    """The upstream sent bytes nobody asked for: injection, or a broken server."""


EXCHANGE_FAILURES = (Lost, Timeout, Desync, ReplyError)


class UpstreamProtocol(Protocol):
    def __init__(self, clock: IReactorTime) -> None:
        self._session = ClientSession()
        # The greeting is the one reply that comes unasked; it may come before anyone awaits it.
        self._greeting: defer.Deferred[Reply] = defer.Deferred()
        self._waiters: deque[tuple[defer.Deferred[Reply], float]] = deque([(self._greeting, 0.0)])
        self._error: Exception | None = None
        self._reply_timeout = Deadline(clock, self._timed_out)
        self.connected = False
        self.on_lost: Callable[[], None] | None = None
        """Called once when the connection is gone (the upstream's pacing counts its sessions)."""

    def connectionMade(self) -> None:
        self.connected = True
        # Nagle plus the peer's delayed ACK costs ~40 ms per message on small writes.
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._session.feed(data)
        try:
            while self._error is None and (found := self._session.next_reply()) is not None:
                self._deliver(found[1])
        except ReplyError as e:
            self._fail(e)
            self.abort()

    def _deliver(self, reply: Reply) -> None:
        waiter, _ = self._waiters.popleft()
        if self._waiters:
            self._reply_timeout.start(self._waiters[0][1])
        else:
            self._reply_timeout.stop()
        waiter.callback(reply)

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self._reply_timeout.stop()
        waiters, self._waiters = self._waiters, deque()
        for waiter, _ in waiters:
            waiter.errback(error)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # type: ignore[no-untyped-call]
        self.connected = False
        self._fail(Lost(reason))
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost()

    @property
    def usable(self) -> bool:
        """Connected, nothing failed, and no bytes arrived that nobody asked for (an idle-timeout 421)."""
        return bool(self.connected) and self._error is None and (self._session.waiting > 0 or not self._session.partial)

    def abort(self) -> None:
        """Close at once, never sending anything more (above all not the final dot)."""
        if self.transport is not None and self.connected:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def write(self, data: bytes) -> None:
        """Bytes that get no reply of their own (message text)."""
        write_now(self.transport, data)

    def send(self, commands: Sequence[tuple[str, bytes]], timeout: float) -> list[defer.Deferred[Reply]]:
        """Send ``commands`` (step, line without CRLF) in one write; a Deferred for each one's reply.

        More than one at a time only where the upstream offered PIPELINING (RFC 2920).
        """
        if self._error is not None:
            return [defer.fail(self._error) for _ in commands]
        if self._session.partial and self._session.waiting == 0:
            # Bytes before we asked: the next command would be answered by a stale or forged reply.
            self._fail(Desync())
            return [defer.fail(Desync()) for _ in commands]
        waiters: list[defer.Deferred[Reply]] = []
        for step, _ in commands:
            self._session.command(step)
            waiter: defer.Deferred[Reply] = defer.Deferred()
            self._waiters.append((waiter, timeout))
            waiters.append(waiter)
        if len(self._waiters) == len(commands):
            self._reply_timeout.start(timeout)
        self.write(b"".join(line + b"\r\n" for _, line in commands))
        return waiters

    async def command(self, step: str, line: bytes, timeout: float) -> Reply:
        (waiter,) = self.send([(step, line)], timeout)
        return await waiter

    async def greeting(self, timeout: float) -> Reply:
        if self._waiters and self._waiters[0][0] is self._greeting:
            self._waiters[0] = (self._greeting, timeout)
            self._reply_timeout.start(timeout)
        return await self._greeting

    def start_tls(self, options: Any) -> None:
        # RFC 3207 5: anything read before the handshake came in plaintext and could be injected.
        if self._session.partial:
            raise Desync()
        self.transport.startTLS(options)  # type: ignore[union-attr]

    def _timed_out(self) -> None:
        self._fail(Timeout())
        self.abort()
