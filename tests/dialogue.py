"""The proxy in memory: SMTPServerProtocol over a StringTransport and a task.Clock, relaying through the
real SMTPUpstream to a scripted upstream server that is also in memory.

The upstream is byte-level: SMTPUpstream's connector dials ``MemoryUpstream.endpoint``, which joins
the factory's UpstreamProtocol to a ``ScriptedServer``. The server records every byte and line the
proxy writes (and in which write), answers the handshake itself (greeting, EHLO, AUTH) unless told not
to, and answers envelope commands only when told: by a transcript's ``u ->`` lines (tests/transcript.py)
or by a ``respond`` function (the Python tests).

Nothing here runs by itself: after each thing it does to the proxy, a test calls ``World.pump``, which
delivers the handshake answers and the connection losses a reactor would deliver next.
"""

from __future__ import annotations

import base64
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from relayproxy.config import LimitsConfig, ListenerConfig, ServerConfig, UpstreamConfig, UserConfig
from relayproxy.credentials import IRelayUser, RelayUser
from relayproxy.limits import AuthThrottle, Budgets, ConnectionCounter
from relayproxy.server import ServerSettings, SMTPServerProtocol
from relayproxy.smtp.reply import Reply, parse_reply
from relayproxy.upstream.smtp import SMTPUpstream

HOSTNAME = "relay.test"
USERS = {"alice": "wonderland", "bob": "builder"}
UPSTREAM_HOST = "smtp.upstream.test"
UPSTREAM = UpstreamConfig("default", UPSTREAM_HOST, 587, "none")
EXTENSIONS = ("PIPELINING", "SIZE 52428800", "8BITMIME")
"""What the scripted upstream offers after EHLO unless told otherwise (AUTH is added when it has credentials)."""


@implementer(IRealm)
class Realm:
    def __init__(self, users: dict[str, UserConfig] | None = None, upstream: UpstreamConfig = UPSTREAM) -> None:
        self.users = users or {}
        self.upstream = upstream

    def requestAvatar(self, avatarId: Any, mind: object, *interfaces: Any) -> Any:
        assert IRelayUser in interfaces
        name = avatarId.decode() if isinstance(avatarId, bytes) else avatarId
        config = self.users.get(name, UserConfig(name))
        return IRelayUser, RelayUser(name, config, self.upstream), lambda: None


def make_portal(users: dict[str, UserConfig] | None = None, passwords: dict[str, str] | None = None, upstream: UpstreamConfig = UPSTREAM) -> Portal:
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    for name, password in (passwords or USERS).items():
        checker.addUser(name.encode(), password.encode())
    return Portal(Realm(users, upstream), [checker])


# -- the scripted upstream ----------------------------------------------------------------------


def standard_respond(line: bytes) -> bytes | None:
    """Answers a willing smarthost gives (the Python tests' default): 250, 354, "queued"."""
    verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
    if line == b".":
        return b"250 2.0.0 queued as 42\r\n"
    if verb == b"DATA":
        return b"354 Go ahead\r\n"
    if verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
        return b"250 OK\r\n"
    return None


@dataclass
class Received:
    """One complete line the upstream received."""

    text: bytes
    first_write: int
    """The write its first byte came in (0-based, per connection)."""
    last_write: int
    """The write its CRLF came in."""
    starts_write: bool
    """It is the first thing in its first write."""
    ends_write: bool
    """Its CRLF is the last thing in its last write."""
    body: bool = False
    """It is message text (after a 354 to DATA), not a command."""


class UpstreamTransport(StringTransport):
    """A StringTransport that hands every write to the scripted server and tells abort from close."""

    def __init__(self, server: ScriptedServer) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", UPSTREAM_HOST, 587))
        self.server = server
        self.aborted = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if data:
            self.server.received(data)

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


class ScriptedServer:
    """The server end of one upstream connection."""

    def __init__(self, upstream: MemoryUpstream, protocol: Protocol, number: int) -> None:
        self.upstream = upstream
        self.protocol = protocol
        self.number = number
        self.transport = UpstreamTransport(self)
        self.writes: list[bytes] = []
        self.lines: list[Received] = []
        self.commands: list[bytes] = []
        """Command lines received after the handshake (not the message text nor its final dot)."""
        self.messages: list[bytes] = []
        """Each message as received after DATA's 354, its final dot line included."""
        self.outstanding: deque[bytes] = deque()
        """Lines received whose reply has not been sent; ``b""`` stands for the connection (the greeting)."""
        self.held: deque[bytes] = deque()
        """``respond``'s answers waiting for ``answer_next`` (a slow upstream)."""
        self.auto: deque[tuple[bytes, bool]] = deque()
        """Answers the next pump delivers, and whether they answer recorded lines (not the handshake's)."""
        self.lost = False
        self.dropped = False
        """The upstream side closed the connection."""
        self._partial = b""
        self._partial_first = 0
        self._partial_starts = True
        self._in_body = False
        self._body: list[bytes] = []
        self._handshake = "greeting" if upstream.handshake == "auto" else "done"
        self._login_user = ""

    # -- what the proxy wrote -----------------------------------------------------------------

    def received(self, data: bytes) -> None:
        index = len(self.writes)
        self.writes.append(data)
        if not self._partial:
            self._partial_first, self._partial_starts = index, True
        buffer = self._partial + data
        while (end := buffer.find(b"\r\n")) >= 0:
            line, buffer = buffer[:end], buffer[end + 2 :]
            self._line(Received(line, self._partial_first, index, self._partial_starts, ends_write=not buffer))
            self._partial_first, self._partial_starts = index, False
        self._partial = buffer

    @property
    def partial(self) -> bytes:
        """Bytes received after the last complete line."""
        return self._partial

    def _line(self, line: Received) -> None:
        text = line.text
        if self._in_body:
            if text == b".":
                self._in_body = False
                self.messages.append(b"".join(part + b"\r\n" for part in self._body) + b".\r\n")
                self._body = []
                self.lines.append(line)
                self._asked(text)
            else:
                line.body = True
                self._body.append(text)
                self.lines.append(line)
            return
        if self._handshake != "done" and self._auto_handshake(text):
            return
        self.lines.append(line)
        self.commands.append(text)
        self._asked(text)

    def _asked(self, line: bytes) -> None:
        self.outstanding.append(line)
        respond = self.upstream.respond
        answer = respond(line) if respond is not None else None
        if answer is not None:
            if self.upstream.hold:
                self.held.append(answer)
            else:
                self.auto.append((answer, True))

    def _auto_handshake(self, line: bytes) -> bool:
        """Answer the handshake as a smarthost would; False once it is over (the line is then a command)."""
        upstream = self.upstream
        if self._handshake == "ehlo" and line.upper().startswith((b"EHLO ", b"HELO ")):
            host = UPSTREAM_HOST
            extensions = upstream.offered()
            ehlo = b"".join(f"250{'-' if i < len(extensions) else ' '}{text}\r\n".encode() for i, text in enumerate((host, *extensions)))
            self.auto.append((ehlo, False))
            self._handshake = "auth" if upstream.config.username else "done"
            return True
        if self._handshake == "auth" and line.upper().startswith(b"AUTH "):
            mechanism, _, initial = line[5:].decode().partition(" ")
            if mechanism.upper() == "PLAIN":
                self._check_login(_unbase64(initial))
            else:
                self._handshake = "login-user"
                self.auto.append((b"334 VXNlcm5hbWU6\r\n", False))
            return True
        if self._handshake == "login-user":
            self._login_user = _unbase64(line.decode())
            self._handshake = "login-password"
            self.auto.append((b"334 UGFzc3dvcmQ6\r\n", False))
            return True
        if self._handshake == "login-password":
            self._check_login(f"\x00{self._login_user}\x00{_unbase64(line.decode())}")
            return True
        self._handshake = "done"
        return False

    def _check_login(self, message: str) -> None:
        config = self.upstream.config
        good = message == f"\x00{config.username}\x00{config.password}"
        reply = self.upstream.auth_reply if good else "535 5.7.8 Authentication credentials invalid"
        self.auto.append((reply.encode() + b"\r\n", False))
        self._handshake = "done"

    # -- what the upstream answers ------------------------------------------------------------

    def connected(self) -> None:
        if self._handshake == "greeting":
            self.auto.append((self.upstream.greeting.encode() + b"\r\n", False))
            self._handshake = "ehlo"
        else:
            self.outstanding.append(b"")

    def replied(self, data: bytes) -> None:
        """Account for replies about to be sent: each last line of a reply answers the oldest
        outstanding line, and a 354 to DATA makes what comes next message text."""
        for raw in data.split(b"\r\n")[:-1]:
            if raw[3:4] == b"-":
                continue
            line = self.outstanding.popleft() if self.outstanding else b""
            if raw[:3] == b"354" and line.upper() == b"DATA":
                self._in_body = True

    def deliver(self, data: bytes) -> None:
        """Bytes from the upstream to the proxy (replies already accounted for with ``replied``)."""
        if not self.gone:
            self.protocol.dataReceived(data)

    def answer(self, data: bytes) -> None:
        self.replied(data)
        self.deliver(data)

    def answer_next(self) -> bytes:
        """Send the oldest held answer (a slow upstream)."""
        answer = self.held.popleft()
        self.answer(answer)
        return answer

    def drop(self) -> None:
        """The upstream closes the connection."""
        if not self.gone:
            self.dropped = True
            self._lose(ConnectionLost("the scripted upstream closed the connection"))

    @property
    def gone(self) -> bool:
        return self.lost or bool(self.transport.disconnecting)

    @property
    def aborted(self) -> bool:
        return self.transport.aborted

    @property
    def closed(self) -> bool:
        """The proxy closed it politely."""
        return bool(self.transport.disconnecting) and not self.transport.aborted

    def _lose(self, reason: Exception) -> None:
        self.lost = True
        self.protocol.connectionLost(Failure(reason))

    def pump(self) -> bool:
        """Deliver what a reactor would next: handshake answers, then the end of a closed connection."""
        if self.lost:
            return False
        if self.transport.disconnecting:
            self.auto.clear()
            self._lose(ConnectionAborted() if self.transport.aborted else ConnectionDone())
            return True
        if self.auto:
            data, accounted = self.auto.popleft()
            if accounted:
                self.replied(data)
            self.deliver(data)
            return True
        return False


def _unbase64(text: str) -> str:
    try:
        return base64.b64decode(text, validate=True).decode("utf-8", "replace")
    except ValueError:
        return ""


@implementer(IStreamClientEndpoint)
class _Endpoint:
    def __init__(self, upstream: MemoryUpstream, host: str, port: int) -> None:
        self.upstream = upstream
        self.address = IPv4Address("TCP", host, port)

    def connect(self, factory: Any) -> defer.Deferred[Protocol]:
        upstream = self.upstream
        upstream.dialled.append((self.address.host, self.address.port))
        if upstream.unreachable:
            return defer.fail(ConnectionRefusedError("the scripted upstream refuses connections"))
        protocol = factory.buildProtocol(self.address)
        server = ScriptedServer(upstream, protocol, len(upstream.connections) + 1)
        upstream.connections.append(server)
        protocol.makeConnection(server.transport)
        server.connected()
        return defer.succeed(protocol)


@dataclass
class MemoryUpstream:
    """The upstream's settings and its connections, in the order the proxy opened them."""

    config: UpstreamConfig = UPSTREAM
    extensions: tuple[str, ...] | None = None
    """What EHLO offers; None: EXTENSIONS, with AUTH PLAIN LOGIN when ``config`` has a username."""
    greeting: str = f"220 {UPSTREAM_HOST} ESMTP scripted"
    handshake: str = "auto"
    """"auto": greeting, EHLO and AUTH are answered here and not recorded; "scripted": all is the test's."""
    auth_reply: str = "235 2.7.0 Authentication successful"
    respond: Callable[[bytes], bytes | None] | None = None
    """Answers for commands after the handshake (None: the test sends them)."""
    hold: bool = False
    """``respond``'s answers wait for ``answer_next``."""
    unreachable: bool = False
    connections: list[ScriptedServer] = field(default_factory=list)
    dialled: list[tuple[str, int]] = field(default_factory=list)

    def offered(self) -> tuple[str, ...]:
        if self.extensions is not None:
            return self.extensions
        return EXTENSIONS + (("AUTH PLAIN LOGIN",) if self.config.username else ())

    def endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        return _Endpoint(self, host, port)

    def pump(self) -> bool:
        # A list, not a generator: every connection gets its turn.
        return any([connection.pump() for connection in self.connections])  # noqa: C419

    def answer_all(self) -> None:
        """Send every held answer, oldest first, as they become due (a slow upstream catching up)."""
        while any(connection.held for connection in self.connections):
            for connection in self.connections:
                while connection.held:
                    connection.answer_next()
                    while self.pump():
                        pass


# -- the client side ----------------------------------------------------------------------------


class TLSStringTransport(StringTransport):
    """A StringTransport that records startTLS (the bytes stay plaintext, which is all tests need)."""

    tls_started: Any = None

    def startTLS(self, options: Any) -> None:
        self.tls_started = options


class MemoryClient:
    """One client connection to the proxy."""

    def __init__(self, world: World, peer: str) -> None:
        self.world = world
        self.protocol = SMTPServerProtocol(world.settings)
        self.transport = TLSStringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
        self.lost = False
        self.dropped = False
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def drop(self) -> None:
        """The client goes away without a word."""
        if not self.lost:
            self.lost = self.dropped = True
            self.protocol.connectionLost(Failure(ConnectionLost("the client went away")))

    @property
    def closed(self) -> bool:
        """The proxy closed the connection."""
        return bool(self.transport.disconnecting)

    def pump(self) -> bool:
        if self.transport.disconnecting and not self.lost:
            self.lost = True
            self.protocol.connectionLost(Failure(ConnectionDone()))
            return True
        return False


class World:
    """The proxy's shared state (clock, limits, the upstream) and its clients."""

    def __init__(
        self,
        tls: str = "none",
        allow_plaintext_auth: bool = True,
        upstream: MemoryUpstream | None = None,
        limits: LimitsConfig = LimitsConfig(),
        server: ServerConfig = ServerConfig(HOSTNAME),
        users: dict[str, UserConfig] | None = None,
        passwords: dict[str, str] | None = None,
        portal: Portal | None = None,
        clock: Clock | None = None,
        throttle: AuthThrottle | None = None,
        connections: ConnectionCounter | None = None,
        tls_options: Any | None = None,
    ) -> None:
        self.clock = clock or Clock()
        self.upstream = upstream if upstream is not None else MemoryUpstream()
        self.smtp_upstream = SMTPUpstream(self.clock, self.upstream.config, server.hostname, endpoint=self.upstream.endpoint)
        self.settings = ServerSettings(
            server=server,
            listener=ListenerConfig("tcp:2525", tls, allow_plaintext_auth),  # type: ignore[arg-type]
            limits=limits,
            portal=portal or make_portal(users, passwords, self.upstream.config),
            upstreams={self.upstream.config.name: self.smtp_upstream},
            tls_options=tls_options,
            clock=self.clock,
            throttle=throttle or AuthThrottle(self.clock, limits),
            connections=connections or ConnectionCounter(limits),
            budgets=Budgets(self.clock),
        )
        self.clients: list[MemoryClient] = []

    def connect(self, peer: str = "192.0.2.7") -> MemoryClient:
        client = MemoryClient(self, peer)
        self.clients.append(client)
        self.pump()
        return client

    def pump(self) -> None:
        """Deliver whatever is due until nothing is: upstream handshake answers, closed connections."""
        while any([self.upstream.pump(), *(client.pump() for client in self.clients)]):  # noqa: C419
            pass

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.pump()


# -- the Python tests' dialogue -----------------------------------------------------------------


class Dialogue:
    """One client in its own World, with helpers for tests written in Python.

    The upstream answers as ``standard_respond`` does unless given another ``MemoryUpstream``.
    """

    def __init__(self, upstream: MemoryUpstream | None = None, peer: str = "192.0.2.7", **world: Any) -> None:
        self.world = World(upstream=upstream if upstream is not None else MemoryUpstream(respond=standard_respond), **world)
        self.clock = self.world.clock
        self.upstream = self.world.upstream
        self.client = self.world.connect(peer)
        self.protocol = self.client.protocol
        self.transport = self.client.transport

    def send(self, data: bytes) -> None:
        self.client.send(data)
        self.world.pump()

    def output(self) -> bytes:
        """Everything written since the last call."""
        data = self.transport.value()
        self.transport.clear()
        return data

    def replies(self) -> list[Reply]:
        return split_replies(self.output())

    def command(self, line: str | bytes) -> Reply:
        """Send one line, expect exactly one reply."""
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        replies = self.replies()
        assert len(replies) == 1, replies
        return replies[0]

    def ehlo(self) -> Reply:
        return self.command("EHLO client.test")

    def login(self, user: str = "alice") -> None:
        reply = self.command("AUTH PLAIN " + plain(user, USERS[user]))
        assert reply.code == 235, reply

    @property
    def closed(self) -> bool:
        return self.client.closed


def plain(user: str, password: str, authzid: str = "") -> str:
    return base64.b64encode(f"{authzid}\x00{user}\x00{password}".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def split_replies(data: bytes) -> list[Reply]:
    """Split server output into replies, each parsed strictly."""
    replies: list[Reply] = []
    current = b""
    for line in data.split(b"\r\n")[:-1] if data else []:
        current += line + b"\r\n"
        if line[3:4] != b"-":
            replies.append(parse_reply(current))
            current = b""
    assert current == b"", f"unterminated reply {current!r}"
    assert data == b"" or data.endswith(b"\r\n"), f"output does not end in CRLF: {data[-20:]!r}"
    return replies


def status(reply: Reply) -> tuple[int, str]:
    """Code and enhanced code as the client saw them (first word of the first line)."""
    return reply.code, reply.lines[0].split(" ", 1)[0]

