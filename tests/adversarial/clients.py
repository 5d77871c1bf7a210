"""Byte-exact SMTP clients for the adversarial suite.

Unlike harness.RawClient these can bind a chosen loopback source address (127.0.0.2, ...) so
per-IP limits hit only the attacker, and they have helpers for the dialogues the tests repeat.
"""

from __future__ import annotations

import base64
import socket
import ssl
from typing import Any

from harness import CLIENT_PASSWORD, CLIENT_USER
from relayproxy.smtp.reply import Catalogue, Reply

HOSTNAME = "relay.test"


class Closed(ConnectionError):
    """The proxy closed the connection; ``partial`` holds what was read of an unfinished reply."""

    def __init__(self, partial: bytes) -> None:
        super().__init__(f"connection closed; partial reply {partial!r}")
        self.partial = partial


class Client:
    def __init__(
        self,
        port: int,
        *,
        source: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
        timeout: float = 15,
        connect: bool = True,
    ) -> None:
        self.port = port
        self.sock: Any = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname=HOSTNAME)
        self.buf = b""
        self.greeting = self.reply() if connect else b""

    # -- bytes ------------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            chunk = b""
        if not chunk:
            raise Closed(self.buf)
        self.buf += chunk

    def reply(self) -> bytes:
        """One whole reply (multi-line included) as the exact bytes received."""
        out = b""
        while True:
            while b"\r\n" not in self.buf:
                if len(self.buf) > 1_000_000:
                    raise AssertionError(f"runaway reply line {self.buf[:200]!r}")
                try:
                    self._fill()
                except Closed as e:
                    raise Closed(out + e.partial) from None
            line, self.buf = self.buf.split(b"\r\n", 1)
            out += line + b"\r\n"
            if line[3:4] != b"-":
                return out

    def command(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.reply()

    def wait_closed(self) -> bytes:
        """Read until the proxy closes; return whatever came before the close."""
        rest = self.buf
        self.buf = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError, OSError):
                return rest
            if not chunk:
                return rest
            rest += chunk

    def starttls(self, context: ssl.SSLContext) -> None:
        assert self.buf == b"", f"plaintext bytes left before the TLS handshake: {self.buf!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname=HOSTNAME)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- dialogue ---------------------------------------------------------------------------------

    def ehlo(self, name: bytes = b"client.example") -> bytes:
        reply = self.command(b"EHLO " + name)
        assert reply.startswith(b"250-" + HOSTNAME.encode()), reply
        return reply

    def login(self, user: str = CLIENT_USER, password: str = CLIENT_PASSWORD) -> None:
        reply = self.command(auth_plain(user, password))
        assert reply == expect(Catalogue.AUTH_OK, b"235 2.7.0"), reply

    def envelope(self, sender: bytes = b"app1@example.org", recipients: tuple[bytes, ...] = (b"bob@example.net",)) -> None:
        assert self.command(b"MAIL FROM:<" + sender + b">").startswith(b"250"), "MAIL refused"
        for rcpt in recipients:
            assert self.command(b"RCPT TO:<" + rcpt + b">").startswith(b"250"), "RCPT refused"


def auth_plain(user: str = CLIENT_USER, password: str = CLIENT_PASSWORD, authzid: str = "") -> bytes:
    return b"AUTH PLAIN " + b64(authzid.encode() + b"\0" + user.encode() + b"\0" + password.encode())


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def ready(port: int, *, source: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> Client:
    """A client that said EHLO and logged in as the test user."""
    c = Client(port, source=source, tls=tls)
    c.ehlo()
    c.login()
    return c


def expect(entry: Reply, status: bytes) -> bytes:
    """The bytes a client sees for a Catalogue reply, with its code and enhanced code pinned.

    ``status`` ("503 5.5.1") is what the issue specifies; the text comes from the Catalogue so
    wording changes do not break the suite, but a changed code or enhanced code does.
    """
    full = entry.to_bytes()
    assert full.startswith(status + b" "), f"Catalogue entry {full!r} no longer has status {status!r}"
    return full
