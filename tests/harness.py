"""Real parts for end-to-end tests: certificates, an aiosmtpd smarthost, a byte recorder, the proxy.

The Twisted reactor runs in one background thread for the whole test session; tests are plain
synchronous code that talks to it over real sockets (smtplib, raw sockets, swaks).
"""

from __future__ import annotations

import base64
import random
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session, SMTP
from twisted.internet import reactor as _reactor
from twisted.internet.threads import blockingCallFromThread

from relayproxy.config import Config, load_config
from relayproxy.credentials import hash_password, write_users_file
from relayproxy.tap import build_service

reactor: Any = _reactor

UPSTREAM_USER = "central@example.com"
UPSTREAM_PASSWORD = "central-secret"


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_EPHEMERAL_LOW = _ephemeral_low()
_handed_out: set[int] = set()


def free_port() -> int:
    """A port for a test to listen on, below the kernel's ephemeral range and never handed out before.

    A port from bind(0) is free only until the kernel gives the same number to an outgoing
    connection (a client, the proxy's upstream), which then makes listening on it fail.
    """
    rng = random.Random()
    while True:
        port = rng.randrange(10_000, _EPHEMERAL_LOW)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


_reactor_thread: threading.Thread | None = None


def ensure_reactor() -> None:
    global _reactor_thread
    if _reactor_thread is None:
        _reactor_thread = threading.Thread(
            target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True, name="reactor"
        )
        _reactor_thread.start()


def fields_of(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The fields of each ``name`` event (EventLog's), from the conftest ``events`` fixture."""
    return [dict(e["relayproxy_fields"]) for e in list(events) if e.get("relayproxy_event") == name]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll for an event another thread causes (the reactor or a server thread)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


@dataclass
class PKI:
    ca: trustme.CA
    dir: Path

    def issue(self, name: str, *hostnames: str) -> tuple[Path, Path]:
        cert = self.ca.issue_cert(*(hostnames or (name,)))
        cert_path, key_path = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        cert.cert_chain_pems[0].write_to_path(str(cert_path))
        key_path.write_bytes(cert.private_key_pem.bytes())
        return cert_path, key_path

    @property
    def ca_path(self) -> Path:
        path = self.dir / "ca.pem"
        if not path.exists():
            self.ca.cert_pem.write_to_path(str(path))
        return path

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


# -- upstreams --------------------------------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]


class _Handler:
    def __init__(self, smarthost: Smarthost) -> None:
        self.smarthost = smarthost

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]) -> str:
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return self.smarthost.mail_reply or "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]) -> str:
        reply = self.smarthost.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        """SASL XOAUTH2 as Gmail and Exchange Online take it: a bearer token for a mailbox."""
        self.smarthost.auth_attempts.append("XOAUTH2")
        response = await server.challenge_auth("", encode_to_b64=False)
        if not isinstance(response, bytes):
            return AuthResult(success=False, handled=False)
        fields = dict(f.split("=", 1) for f in response.decode().split("\x01") if "=" in f)
        token = fields.get("auth", "").removeprefix("Bearer ")
        if fields.get("user") == UPSTREAM_USER and token in self.smarthost.bearer_tokens:
            return AuthResult(success=True)
        # RFC 7628 3.2.2: the error as a challenge; the client answers with an empty line.
        await server.challenge_auth(b'{"status":"401","schemes":"bearer"}')
        return AuthResult(success=False, handled=False)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.smarthost.data_reply:
            return self.smarthost.data_reply
        assert envelope.mail_from is not None
        content = envelope.original_content or b""
        self.smarthost.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), content, list(envelope.mail_options)))
        return "250 2.0.0 Ok: queued as TEST1"


@dataclass
class Smarthost:
    """aiosmtpd with STARTTLS (required) and AUTH PLAIN/LOGIN over TLS, like a provider's port 587."""

    pki: PKI
    hostname: str = "localhost"
    password: str = UPSTREAM_PASSWORD
    received: list[Received] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    mail_reply: str | None = None
    data_reply: str | None = None
    auth_attempts: list[str] = field(default_factory=list)
    bearer_tokens: set[str] = field(default_factory=set)
    port: int = 0

    def start(self) -> Smarthost:
        cert, key = self.pki.issue(f"upstream-{self.hostname}", self.hostname)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(cert), str(key))
        self.port = free_port()

        def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
            if not isinstance(data, LoginPassword):
                return AuthResult(success=False, handled=False)
            self.auth_attempts.append(mechanism)
            ok = data.login.decode() == UPSTREAM_USER and data.password.decode() == self.password
            # handled=False: aiosmtpd then sends its 535 itself (handled=True would send nothing).
            return AuthResult(success=ok, handled=False)

        self._controller = Controller(
            _Handler(self),
            hostname="127.0.0.1",
            port=self.port,
            server_hostname=self.hostname,
            tls_context=context,
            require_starttls=True,
            authenticator=authenticate,
            auth_required=True,
            auth_require_tls=True,
            decode_data=False,
            data_size_limit=64 * 1024 * 1024,
        )
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()


class Recorder:
    """A plaintext upstream that records every byte and answers from a script.

    ``script`` maps a command verb (or "DATA-END") to a reply line, or to "DROP" to close the
    connection at that point; anything else gets a plausible positive reply.
    """

    def __init__(self, script: dict[str, Any] | None = None, greeting: bytes = b"220 recorder ESMTP\r\n") -> None:
        self.script = script or {}
        self.greeting = greeting
        self.sessions: list[bytearray] = []
        self.commands: list[bytes] = []
        """Every command line read outside DATA, across sessions, without its CRLF."""
        self.bodies: list[bytes] = []
        """Every complete body, as received (dot-stuffed, up to and including the CRLF before the final dot)."""
        self.closed = 0
        """How many sessions have ended (either side closed)."""
        self.chunks: list[bytes] = []
        """Every read, as it came: what the proxy sent in one write arrives together."""
        self.port = free_port()
        self._sock = socket.create_server(("127.0.0.1", self.port))
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def data(self) -> bytes:
        return b"".join(bytes(s) for s in self.sessions)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        try:
            self._converse(conn)
        finally:
            self.closed += 1

    def _converse(self, conn: socket.socket) -> None:
        record = bytearray()
        self.sessions.append(record)
        buf = b""
        in_data = False
        with conn:
            try:
                if self.greeting == b"DROP":
                    return
                conn.sendall(self.greeting)
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    record += chunk
                    self.chunks.append(chunk)
                    buf += chunk
                    while True:
                        if in_data:
                            end = buf.find(b"\r\n.\r\n")
                            if end < 0:
                                if "BODY" in self.script and len(buf) > 10:
                                    if self._answer(conn, "BODY") == "DROP":
                                        return
                                break
                            self.bodies.append(buf[: end + 2])
                            buf = buf[end + 5 :]
                            in_data = False
                            if self._answer(conn, "DATA-END", "250 2.0.0 Ok: queued as REC1") == "DROP":
                                return
                            continue
                        end = buf.find(b"\r\n")
                        if end < 0:
                            break
                        line, buf = buf[:end], buf[end + 2 :]
                        self.commands.append(line)
                        verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper().decode("ascii", "replace")
                        default = {
                            "EHLO": "250-recorder\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 100000000",
                            "DATA": "354 go ahead",
                            "QUIT": "221 bye",
                        }.get(verb, "250 2.0.0 OK")
                        if self._answer(conn, verb, default) == "DROP":
                            return
                        if verb == "DATA" and self.script.get("DATA", "354").startswith("354"):
                            in_data = True
                        if verb == "QUIT":
                            return
            except OSError:
                return

    def _answer(self, conn: socket.socket, key: str, default: str = "") -> str:
        scripted = self.script.get(key, default)
        # A list is a queue of answers, one per use; its last answer repeats.
        reply = (scripted.pop(0) if len(scripted) > 1 else scripted[0]) if isinstance(scripted, list) else scripted
        if reply != "DROP":
            conn.sendall(reply.encode("latin-1") + b"\r\n" if not reply.endswith("\n") else reply.encode("latin-1"))
        return reply

    def stop(self) -> None:
        self._sock.close()


# -- the proxy --------------------------------------------------------------------------------

CLIENT_USER = "app1"
CLIENT_PASSWORD = "app1-password"


@dataclass
class Proxy:
    port: int
    tls_port: int
    plain_port: int
    config_path: Path
    service: Any

    def stop(self) -> None:
        blockingCallFromThread(reactor, self.service.stopService)


def write_config(
    directory: Path,
    pki: PKI,
    upstream: str,
    users: dict[str, str] | None = None,
    extra: str = "",
    ports: tuple[int, int, int] | None = None,
) -> tuple[Path, tuple[int, int, int]]:
    """A config with three listeners (STARTTLS, implicit TLS, loopback plaintext) and one upstream table."""
    cert, key = pki.issue("relay", "relay.test", "localhost", "127.0.0.1")
    users_file = directory / "users"
    users = users if users is not None else {CLIENT_USER: CLIENT_PASSWORD}
    write_users_file(users_file, {name: hash_password(pw, rounds=4) for name, pw in users.items()})
    p1, p2, p3 = ports or (free_port(), free_port(), free_port())
    path = directory / "relayproxy.toml"
    path.write_text(
        f"""
[server]
hostname = "relay.test"

[tls]
certificate = "{cert}"
key = "{key}"

[[listener]]
endpoint = "tcp:{p1}:interface=127.0.0.1:backlog=1024"
tls = "starttls"

[[listener]]
endpoint = "tcp:{p2}:interface=127.0.0.1:backlog=1024"
tls = "implicit"

[[listener]]
endpoint = "tcp:{p3}:interface=127.0.0.1:backlog=1024"
tls = "none"

[auth]
users_file = "{users_file}"

{upstream}
{extra}
"""
    )
    return path, (p1, p2, p3)


def smarthost_upstream(smarthost: Smarthost, pki: PKI, name: str = "default") -> str:
    return f"""
[upstream.{name}]
host = "{smarthost.hostname}"
port = {smarthost.port}
tls = "starttls"
ca_file = "{pki.ca_path}"
username = "{UPSTREAM_USER}"
password_env = "RELAYPROXY_TEST_UPSTREAM_PASSWORD"
"""


def recorder_upstream(recorder: Recorder, name: str = "default") -> str:
    return f"""
[upstream.{name}]
host = "127.0.0.1"
port = {recorder.port}
tls = "none"
# The recorder's sessions are read when they close; kept sessions are tested on their own.
pool_size = 0
"""


def start_proxy(config_path: Path, ports: tuple[int, int, int]) -> Proxy:
    ensure_reactor()
    def load() -> Config:
        return load_config(config_path, environ={"RELAYPROXY_TEST_UPSTREAM_PASSWORD": UPSTREAM_PASSWORD})

    config = load()

    def start() -> Any:
        service = build_service(config, reactor, load)
        service.startService()
        return service

    service = blockingCallFromThread(reactor, start)
    for port in ports:
        wait_for(lambda: _listening(port))
    return Proxy(ports[0], ports[1], ports[2], config_path, service)


def wait_listening(port: int) -> None:
    """Wait until something accepts connections on 127.0.0.1:port (an extra listener from ``extra``)."""
    wait_for(lambda: _listening(port))


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def login(port: int, pki: PKI, user: str = CLIENT_USER, password: str = CLIENT_PASSWORD) -> smtplib.SMTP:
    """An smtplib client on a STARTTLS listener, after STARTTLS and AUTH."""
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=20)
    smtp.starttls(context=pki.client_context())
    smtp.login(user, password)
    return smtp


class RawClient:
    """A byte-exact client for attacks smtplib cannot express."""

    def __init__(self, port: int, context: ssl.SSLContext | None = None, timeout: float = 10) -> None:
        self.sock: Any = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if context is not None:
            self.sock = context.wrap_socket(self.sock, server_hostname="relay.test")
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def starttls(self, context: ssl.SSLContext) -> None:
        self.sock = context.wrap_socket(self.sock, server_hostname="relay.test")

    def reply(self) -> bytes:
        """One whole reply, multi-line included, as bytes."""
        out = b""
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed; got so far {out + self.buf!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            out += line + b"\r\n"
            if line[3:4] != b"-":
                return out

    def command(self, line: bytes) -> bytes:
        """Send one line (CRLF added unless present) and return the one reply to it."""
        self.send(line if line.endswith(b"\r\n") else line + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, ssl.SSLError):
            return True

    def close(self) -> None:
        self.sock.close()


def auth_plain_line(user: str = CLIENT_USER, password: str = CLIENT_PASSWORD) -> bytes:
    """AUTH PLAIN with an initial response, CRLF-terminated."""
    blob = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
    return b"AUTH PLAIN " + blob + b"\r\n"


def iter_lines(data: bytes) -> Iterator[bytes]:
    yield from data.split(b"\r\n")
