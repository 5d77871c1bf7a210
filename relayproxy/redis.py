"""A small Redis client on Twisted: RESP2 framing, bounded replies, lazy reconnect, per-command timeouts.

Just what the shared limit store needs (EVAL of small scripts, AUTH, SELECT, PING); no new
dependency. Every command either gets its reply or fails with ``RedisUnavailable`` within
``timeout`` seconds of the reactor it is given: a dead or hung server never hangs a caller.
"""

from __future__ import annotations

import re
import urllib.parse
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

MAX_LINE = 64 * 1024
"""Longest status, error or integer line we accept."""
MAX_BULK = 1024 * 1024
"""Largest bulk string in a reply."""
MAX_ELEMENTS = 100_000
"""Most elements in one array (all nesting levels together)."""
MAX_DEPTH = 8
MAX_BUFFERED = 8 * 1024 * 1024
"""Bytes of an unfinished reply we hold before we call the server broken."""

DEFAULT_PORT = 6379


class RedisError(Exception):
    """An error reply (``-ERR ...``) from the server: it answered, but refused the command."""


class RedisUnavailable(Exception):
    """No usable answer: could not connect, connection lost, timed out, or the reply broke RESP."""


RedisValue = Union[int, bytes, None, RedisError, list["RedisValue"]]


class _Violation(Exception):
    pass


_INTEGER = re.compile(rb"^-?\d{1,20}$")


def _integer(raw: bytes) -> int:
    if _INTEGER.match(raw) is None:
        raise _Violation(f"not an integer: {raw[:40]!r}")
    return int(raw)


class _Parser:
    """RESP2 replies from a byte stream; every size is bounded."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[RedisValue]:
        self._buffer += data
        values: list[RedisValue] = []
        while self._buffer:
            budget = [MAX_ELEMENTS]
            parsed = self._value(0, 0, budget)
            if parsed is None:
                if len(self._buffer) > MAX_BUFFERED:
                    raise _Violation("reply too large")
                break
            value, end = parsed
            del self._buffer[:end]
            values.append(value)
        return values

    def _value(self, pos: int, depth: int, budget: list[int]) -> tuple[RedisValue, int] | None:
        buf = self._buffer
        end = buf.find(b"\r\n", pos, pos + MAX_LINE + 2)
        if end < 0:
            if len(buf) - pos > MAX_LINE + 1:
                raise _Violation("line too long")
            return None
        kind, body, after = buf[pos : pos + 1], bytes(buf[pos + 1 : end]), end + 2
        if kind == b"+":
            return body, after
        if kind == b"-":
            return RedisError(body.decode("utf-8", "replace")), after
        if kind == b":":
            return _integer(body), after
        if kind == b"$":
            length = _integer(body)
            if length == -1:
                return None, after
            if not 0 <= length <= MAX_BULK:
                raise _Violation(f"bulk string of {length} bytes")
            if len(buf) < after + length + 2:
                return None
            if buf[after + length : after + length + 2] != b"\r\n":
                raise _Violation("bulk string not followed by CRLF")
            return bytes(buf[after : after + length]), after + length + 2
        if kind == b"*":
            count = _integer(body)
            if count == -1:
                return None, after
            budget[0] -= max(count, 0)
            if count < 0 or budget[0] < 0 or depth >= MAX_DEPTH:
                raise _Violation("array too large or too deep")
            items: list[RedisValue] = []
            for _ in range(count):
                parsed = self._value(after, depth + 1, budget)
                if parsed is None:
                    return None
                item, after = parsed
                items.append(item)
            return items, after
        raise _Violation(f"unknown reply type {bytes(kind)!r}")


def encode_command(args: Sequence[bytes | str | int | float]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else (repr(arg) if isinstance(arg, float) else str(arg)).encode("utf-8")
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


class RedisProtocol(Protocol):
    """One connection: commands go out in order, replies are matched to them first in, first out."""

    def __init__(self) -> None:
        self._parser = _Parser()
        self._pending: deque[defer.Deferred[RedisValue]] = deque()
        self.lost = False

    def send(self, args: Sequence[bytes | str | int | float]) -> defer.Deferred[RedisValue]:
        waiter: defer.Deferred[RedisValue] = defer.Deferred()
        if self.lost or self.transport is None:
            waiter.errback(RedisUnavailable("connection lost"))
            return waiter
        self._pending.append(waiter)
        self.transport.write(encode_command(args))
        return waiter

    def dataReceived(self, data: bytes) -> None:
        try:
            values = self._parser.feed(data)
        except _Violation as e:
            self.abort(f"invalid reply from the server ({e})")
            return
        for value in values:
            if not self._pending:
                self.abort("reply nobody asked for")
                return
            self._pending.popleft().callback(value)

    def abort(self, why: str) -> None:
        """Drop the connection (a reply may still be on its way: the stream is out of step) and fail every waiter."""
        self._fail(why)
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # type: ignore[no-untyped-call]
        self._fail(f"connection lost ({reason.getErrorMessage()})")

    def _fail(self, why: str) -> None:
        self.lost = True
        while self._pending:
            self._pending.popleft().errback(RedisUnavailable(why))


@dataclass(frozen=True)
class RedisURL:
    host: str
    port: int = DEFAULT_PORT
    db: int = 0
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        """The address without the password: safe for logs."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisURL:
    """``redis://[:PASSWORD@]HOST[:PORT][/DB]``; raises ValueError saying what is wrong."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"not a valid URL ({e})") from None
    if parts.scheme != "redis":
        raise ValueError("the scheme must be redis:// (TLS, rediss://, is not supported)")
    if not parts.hostname:
        raise ValueError("no host")
    if parts.query or parts.fragment:
        raise ValueError("no query or fragment allowed")
    path = parts.path.strip("/")
    if path and not (path.isdigit() and int(path) <= 10_000):
        raise ValueError(f"the database {path!r} is not a number")
    return RedisURL(
        host=parts.hostname,
        port=port or DEFAULT_PORT,
        db=int(path) if path else 0,
        password=urllib.parse.unquote(parts.password) if parts.password else None,
    )


class RedisClient:
    """Commands on one shared connection, opened on first use and again after it is lost."""

    def __init__(self, reactor: Any, url: RedisURL, timeout: float = 2.0) -> None:
        self._reactor = reactor
        self.url = url
        self.timeout = timeout
        self._protocol: RedisProtocol | None = None
        self._waiters: list[defer.Deferred[RedisProtocol]] = []
        self._closed = False

    async def execute(self, *args: bytes | str | int | float) -> RedisValue:
        """The command's reply; raises RedisError for an error reply, RedisUnavailable otherwise."""
        protocol = await self._connection()
        value = await self._timed(protocol.send(args), protocol)
        if isinstance(value, RedisError):
            raise value
        return value

    def close(self) -> None:
        self._closed = True
        if self._protocol is not None and not self._protocol.lost and self._protocol.transport is not None:
            self._protocol.transport.loseConnection()
        self._protocol = None

    def _timed(self, waiting: defer.Deferred[RedisValue], protocol: RedisProtocol) -> defer.Deferred[RedisValue]:
        result: defer.Deferred[RedisValue] = defer.Deferred()

        def expire() -> None:
            protocol.abort(f"no reply within {self.timeout:g} s")

        timer = self._reactor.callLater(self.timeout, expire)

        def done(outcome: RedisValue | Failure) -> None:
            if timer.active():
                timer.cancel()
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)

        waiting.addBoth(done)
        return result

    def _connection(self) -> defer.Deferred[RedisProtocol]:
        if self._closed:
            return defer.fail(RedisUnavailable("client closed"))
        if self._protocol is not None and not self._protocol.lost:
            return defer.succeed(self._protocol)
        waiter: defer.Deferred[RedisProtocol] = defer.Deferred()
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            # One attempt at a time; every command that arrives meanwhile waits for it.
            defer.Deferred.fromCoroutine(self._connect()).addBoth(self._connected)
        return waiter

    def _connected(self, outcome: RedisProtocol | Failure) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)

    async def _connect(self) -> RedisProtocol:
        endpoint = HostnameEndpoint(self._reactor, self.url.host, self.url.port, timeout=self.timeout)
        connecting: defer.Deferred[Protocol] = connectProtocol(endpoint, RedisProtocol())  # type: ignore[no-untyped-call]
        # The endpoint's own timeout covers TCP only; this one covers name resolution too.
        connecting.addTimeout(self.timeout, self._reactor)
        try:
            connected = await connecting
        except defer.TimeoutError:
            raise RedisUnavailable(f"cannot connect within {self.timeout:g} s") from None
        except Exception as e:
            raise RedisUnavailable(f"cannot connect ({e.__class__.__name__}: {e})") from None
        assert isinstance(connected, RedisProtocol)
        protocol = connected
        try:
            if self.url.password is not None:
                await self._setup(protocol, "AUTH", self.url.password)
            if self.url.db:
                await self._setup(protocol, "SELECT", self.url.db)
        except BaseException:
            protocol.abort("setup failed")
            raise
        if self._closed:
            protocol.abort("client closed")
            raise RedisUnavailable("client closed")
        self._protocol = protocol
        return protocol

    async def _setup(self, protocol: RedisProtocol, *args: str | int) -> None:
        value = await self._timed(protocol.send(args), protocol)
        if isinstance(value, RedisError):
            raise RedisUnavailable(f"{args[0]} refused: {value}")
