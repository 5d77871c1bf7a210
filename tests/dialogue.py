"""In-memory SMTP dialogues with SMTPServerProtocol: a StringTransport, a Clock, a fake upstream."""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from relayproxy.config import LimitsConfig, ListenerConfig, ServerConfig, UpstreamConfig, UserConfig
from relayproxy.credentials import IRelayUser, RelayUser
from relayproxy.errors import UpstreamError
from relayproxy.limits import AuthThrottle, ConnectionCounter
from relayproxy.server import ServerSettings, SMTPServerProtocol
from relayproxy.smtp.envelope import EnvelopeCommand, Mail, Rcpt
from relayproxy.smtp.reply import Catalogue, Reply, parse_reply

HOSTNAME = "relay.test"
USERS = {"alice": "wonderland", "bob": "builder"}
UPSTREAM = UpstreamConfig("default", "smtp.upstream.test", 587, "starttls")


@implementer(IRealm)
class Realm:
    def __init__(self, users: dict[str, UserConfig] | None = None) -> None:
        self.users = users or {}

    def requestAvatar(self, avatarId: Any, mind: object, *interfaces: Any) -> Any:
        assert IRelayUser in interfaces
        name = avatarId.decode() if isinstance(avatarId, bytes) else avatarId
        config = self.users.get(name, UserConfig(name))
        return IRelayUser, RelayUser(name, config, UPSTREAM), lambda: None


def make_portal(users: dict[str, UserConfig] | None = None) -> Portal:
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    for name, password in USERS.items():
        checker.addUser(name.encode(), password.encode())
    return Portal(Realm(users), [checker])


# -- a scripted upstream ------------------------------------------------------------------------


def ok(code: int = 250, text: str = "OK") -> Reply:
    return Reply(code, (text,))


@dataclass
class FakeSession:
    """Stands in for an UpstreamSession: records what an SMTP upstream would receive, answers from a script.

    With ``delayed``, every answer waits in ``pending`` until the test calls ``answer_next``.
    """

    script: Callable[[bytes], Reply] | None = None
    delayed: bool = False
    pending: list[tuple[bytes, defer.Deferred[None]]] = field(default_factory=list)
    config: UpstreamConfig = UPSTREAM
    extensions: dict[str, str] = field(default_factory=lambda: {"SIZE": "0", "8BITMIME": "", "PIPELINING": ""})
    in_transaction: bool = False
    aborted: bool = False
    closed: bool = False
    commands: list[bytes] = field(default_factory=list)
    body_parts: list[bytes] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    connector: Any = None
    failure: UpstreamError | None = None

    async def _wait(self, line: bytes) -> None:
        if self.delayed:
            waiter: defer.Deferred[None] = defer.Deferred()
            self.pending.append((line, waiter))
            await waiter

    def answer_next(self) -> bytes:
        line, waiter = self.pending.pop(0)
        waiter.callback(None)
        return line

    def _line(self, command: EnvelopeCommand) -> bytes:
        if isinstance(command, Mail):
            line = f"MAIL FROM:<{command.sender}>"
            if command.size is not None and "SIZE" in self.extensions:
                line += f" SIZE={command.size}"
            if command.eight_bit:
                line += " BODY=8BITMIME"
            return line.encode()
        if isinstance(command, Rcpt):
            return f"RCPT TO:<{command.recipient}>".encode()
        return b"DATA"

    async def envelope(self, commands: Sequence[EnvelopeCommand]) -> list[Reply]:
        replies = []
        for command in commands:
            line = self._line(command)
            if isinstance(command, Mail) and command.eight_bit and "8BITMIME" not in self.extensions:
                replies.append(Catalogue.UPSTREAM_NO_8BIT)
                continue
            self.commands.append(line)
            await self._wait(line)
            if self.script is not None:
                reply = self.script(line)
            else:
                reply = ok(354, "Go ahead") if line == b"DATA" else ok()
            if isinstance(command, Mail):
                self.in_transaction = reply.is_positive
            replies.append(reply)
        return replies

    def body(self, data: bytes) -> None:
        self.body_parts.append(data)

    def stream_from(self, producer: Any) -> None:
        pass

    async def end(self, last: bytes) -> Reply:
        self.body_parts.append(last + b".\r\n")  # as the SMTP session writes it
        self.messages.append(b"".join(self.body_parts))
        self.body_parts = []
        self.in_transaction = False
        await self._wait(b".")
        return ok(250, "2.0.0 queued as 42")

    def abort(self) -> None:
        self.aborted = True
        self.failure = UpstreamError(Catalogue.UPSTREAM_LOST, "aborted")

    def release(self) -> None:
        # As the SMTP session: a transaction still open is reset, then the session is kept.
        if self.failure is not None:
            return
        if self.in_transaction:
            self.commands.append(b"RSET")
            self.in_transaction = False
        self.connector.idle.append(self)


@dataclass
class FakeConnector:
    sessions: list[FakeSession] = field(default_factory=list)
    script: Callable[[bytes], Reply] | None = None
    delayed: bool = False
    idle: list[FakeSession] = field(default_factory=list)

    async def acquire(self, client: object) -> FakeSession:
        if self.idle:
            return self.idle.pop()
        session = FakeSession(self.script, self.delayed)
        session.connector = self
        self.sessions.append(session)
        return session

    def departed(self, client: object) -> None:
        pass

    def close_idle(self) -> None:
        for session in self.idle:
            session.closed = True
        self.idle = []


# -- the dialogue -------------------------------------------------------------------------------


class TLSStringTransport(StringTransport):
    """A StringTransport that records startTLS (the bytes stay plaintext, which is all tests need)."""

    tls_started: Any = None

    def startTLS(self, options: Any) -> None:
        self.tls_started = options


class Dialogue:
    def __init__(
        self,
        tls: str = "none",
        allow_plaintext_auth: bool = True,
        connector: FakeConnector | None = None,
        limits: LimitsConfig = LimitsConfig(),
        server: ServerConfig = ServerConfig(HOSTNAME),
        users: dict[str, UserConfig] | None = None,
        portal: Portal | None = None,
        clock: Clock | None = None,
        throttle: AuthThrottle | None = None,
        connections: ConnectionCounter | None = None,
        peer: str = "192.0.2.7",
        tls_options: Any | None = None,
    ) -> None:
        """Connect one client; pass ``clock``, ``throttle`` and ``connections`` to share them between sessions."""
        self.clock = clock or Clock()
        self.connector = connector
        settings = ServerSettings(
            server=server,
            listener=ListenerConfig("tcp:2525", tls, allow_plaintext_auth),  # type: ignore[arg-type]
            limits=limits,
            portal=portal or make_portal(users),
            upstreams={"default": connector} if connector is not None else {},  # type: ignore[dict-item]
            tls_options=tls_options,
            clock=self.clock,
            throttle=throttle or AuthThrottle(self.clock, limits),
            connections=connections or ConnectionCounter(limits),
        )
        self.protocol = SMTPServerProtocol(settings)
        self.transport = TLSStringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

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
        return bool(self.transport.disconnecting)


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
