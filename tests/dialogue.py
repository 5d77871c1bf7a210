"""In-memory SMTP dialogues with SMTPServerProtocol: a StringTransport, a Clock, a fake upstream."""

from __future__ import annotations

import base64
from collections.abc import Callable
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
from relayproxy.limits import AuthThrottle, ConnectionCounter
from relayproxy.server import ServerSettings, SMTPServerProtocol
from relayproxy.smtp.reply import Reply, parse_reply

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
    """Stands in for UpstreamSession: records what the server sends, answers from a script.

    With ``delayed``, every answer waits in ``pending`` until the test calls ``answer_next``.
    """

    script: Callable[[bytes], Reply] | None = None
    delayed: bool = False
    pending: list[tuple[bytes, defer.Deferred[None]]] = field(default_factory=list)
    config: UpstreamConfig = UPSTREAM
    extensions: dict[str, str] = field(default_factory=lambda: {"SIZE": "0", "8BITMIME": "", "PIPELINING": ""})
    in_transaction: bool = False
    broken: bool = False
    aborted: bool = False
    closed: bool = False
    commands: list[bytes] = field(default_factory=list)
    body: list[bytes] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    connector: Any = None
    used: bool = False

    @property
    def usable(self) -> bool:
        return not self.broken

    async def _wait(self, line: bytes) -> None:
        if self.delayed:
            waiter: defer.Deferred[None] = defer.Deferred()
            self.pending.append((line, waiter))
            await waiter

    def answer_next(self) -> bytes:
        line, waiter = self.pending.pop(0)
        waiter.callback(None)
        return line

    async def command(self, line: bytes, timeout: float | None = None) -> Reply:
        self.commands.append(line)
        await self._wait(line)
        if self.script is not None:
            return self.script(line)
        if line == b"DATA":
            return ok(354, "Go ahead")
        return ok()

    async def mail(self, line: bytes) -> Reply:
        self.used = True
        return await self.command(line)

    def supports(self, extension: str) -> bool:
        return extension in self.extensions

    def send_body(self, data: bytes) -> None:
        self.body.append(data)

    def register_producer(self, producer: Any) -> None:
        pass

    def unregister_producer(self) -> None:
        pass

    async def end_data(self, last: bytes) -> Reply:
        self.body.append(last + b".\r\n")  # as UpstreamSession.end_data writes it
        self.messages.append(b"".join(self.body))
        self.body = []
        await self._wait(b".")
        return ok(250, "2.0.0 queued as 42")

    def abort(self) -> None:
        self.broken = True
        self.aborted = True

    def close(self) -> None:
        self.broken = True
        self.closed = True


@dataclass
class FakeConnector:
    sessions: list[FakeSession] = field(default_factory=list)
    script: Callable[[bytes], Reply] | None = None
    delayed: bool = False
    idle: list[FakeSession] = field(default_factory=list)

    async def open(self) -> FakeSession:
        session = FakeSession(self.script, self.delayed)
        session.connector = self
        self.sessions.append(session)
        return session

    async def acquire(self, client: object) -> FakeSession:
        return self.idle.pop() if self.idle else await self.open()

    def departed(self, client: object) -> None:
        pass

    def release(self, session: FakeSession) -> None:
        # As UpstreamConnector: a clean session is kept for the next transaction, any other closed.
        if session.usable and not session.in_transaction:
            self.idle.append(session)
        else:
            session.close()


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
            connectors={"default": connector} if connector is not None else {},  # type: ignore[dict-item]
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
