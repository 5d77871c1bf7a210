"""Real parts for end-to-end tests: certificates, an aiosmtpd smarthost, the proxy.

The Twisted reactor runs in one background thread for the whole test session; tests are plain
synchronous code that talks to it over real sockets (smtplib, swaks, and the scripted peers of
peers.py: a raw client and a scripted upstream).
"""

from __future__ import annotations

import random
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session, SMTP
from twisted.internet import reactor as _reactor
from twisted.internet.threads import blockingCallFromThread

from relayproxy.config import Config, load_config
from relayproxy.usersfile import hash_password, write_users_file
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
        # A preset port: the upstream comes up where the proxy was told it is (down, then up).
        self.port = self.port or free_port()

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
            # Offered like Gmail's and Microsoft 365's: UTF-8 addresses end to end (RFC 6531).
            enable_SMTPUTF8=True,
        )
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()


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
