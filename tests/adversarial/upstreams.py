"""A scripted, TLS-capable fake upstream for fault injection.

One threaded socket server. Each connection greets, answers commands from ``script`` and can do
STARTTLS (or implicit TLS) with any certificate; everything it receives is recorded, in plaintext
before TLS and decrypted after it, so a test can prove what the proxy sent in the clear.

Script values, per key (``greeting``, ``EHLO``, ``EHLO-TLS``, ``STARTTLS``, ``AUTH``, ``MAIL``,
``RCPT``, ``DATA``, ``BODY``, ``DATA-END``, ``QUIT``, or any other verb):

- bytes: written as they are, in one ``sendall`` (so several replies can share one packet);
- ``DROP``: close the connection at that point without answering;
- a callable taking the socket: runs (a flood, say), then the connection is closed.

``BODY`` fires once ``body_drop_after`` body bytes have arrived (mid-body faults).
"""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import trustme

from harness import UPSTREAM_USER

DROP = "DROP"
Action = Union[bytes, str, Callable[[Any], Any]]

EHLO_PLAIN = b"250-scripted.test\r\n250-PIPELINING\r\n250-SIZE 100000000\r\n250-8BITMIME\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n"
"""Offers AUTH before TLS too: a proxy that sends credentials in the clear would take the bait."""
EHLO_NO_STARTTLS = b"250-scripted.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 AUTH PLAIN LOGIN\r\n"
EHLO_TLS = b"250-scripted.test\r\n250-PIPELINING\r\n250-SIZE 100000000\r\n250-8BITMIME\r\n250 AUTH PLAIN LOGIN\r\n"


@dataclass
class Certificate:
    cert: Path
    key: Path

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


def issue(
    ca: trustme.CA,
    directory: Path,
    name: str,
    *hostnames: str,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Certificate:
    leaf = ca.issue_cert(*(hostnames or ("localhost",)), not_before=not_before, not_after=not_after)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    # The whole chain, as a real server sends it.
    cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return Certificate(cert, key)


class ScriptedUpstream:
    def __init__(
        self,
        script: dict[str, Action] | None = None,
        *,
        certificate: Certificate | None = None,
        implicit_tls: bool = False,
        body_drop_after: int = 1,
    ) -> None:
        self.script: dict[str, Action] = dict(script or {})
        self.certificate = certificate
        self.implicit_tls = implicit_tls
        self.body_drop_after = body_drop_after
        self.plaintext = bytearray()
        """Everything received before TLS (on every connection)."""
        self.secure = bytearray()
        """Everything received after a TLS handshake, decrypted."""
        self.sessions: list[bytearray] = []
        """Per connection, everything received (plaintext then decrypted) in order."""
        self.connections = 0
        self.closed = 0
        self.final_dots = 0
        self.bodies: list[bytes] = []
        self.tls_errors: list[str] = []
        self.sent_flood = 0
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True, name="scripted-upstream").start()

    def toml(self, name: str = "default", tls: str = "starttls", ca_file: Path | None = None) -> str:
        """The [upstream.NAME] section for this server; credentials only with TLS."""
        lines = [
            f"[upstream.{name}]",
            'host = "localhost"' if tls != "none" else 'host = "127.0.0.1"',
            f"port = {self.port}",
            f'tls = "{tls}"',
            "connect_timeout = 10",
            "reply_timeout = 10",
            "data_timeout = 10",
            # Each test reads one upstream session to its end; kept sessions are tested on their own.
            "pool_size = 0",
        ]
        if tls != "none":
            if ca_file is not None:
                lines.append(f'ca_file = "{ca_file}"')
            lines += [f'username = "{UPSTREAM_USER}"', 'password_env = "RELAYPROXY_TEST_UPSTREAM_PASSWORD"']
        return "\n".join(lines) + "\n"

    @property
    def received(self) -> bytes:
        return b"".join(bytes(s) for s in self.sessions)

    def stop(self) -> None:
        self._sock.close()

    # -- the server ---------------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        record = bytearray()
        self.sessions.append(record)
        try:
            self._converse(conn, record)
        except (OSError, ssl.SSLError):
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass
            with self._lock:
                self.closed += 1

    def _act(self, conn: Any, key: str, default: bytes) -> bool:
        """Perform the script's action for ``key``; False when the connection must end."""
        action = self.script.get(key, default)
        if action == DROP:
            return False
        if callable(action):
            sent = action(conn)
            if isinstance(sent, int):
                with self._lock:
                    self.sent_flood += sent
            return False
        assert isinstance(action, bytes)
        conn.sendall(action)
        return True

    def _handshake(self, conn: socket.socket) -> Any:
        assert self.certificate is not None, "STARTTLS or implicit TLS without a certificate"
        try:
            return self.certificate.context().wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as e:
            self.tls_errors.append(f"{type(e).__name__}: {e}")
            return None

    def _converse(self, raw: socket.socket, record: bytearray) -> None:
        conn: Any = raw
        secure = False
        if self.implicit_tls:
            conn = self._handshake(raw)
            if conn is None:
                return
            secure = True
        if not self._act(conn, "greeting", b"220 scripted.test ESMTP\r\n"):
            return
        buf = b""
        in_data = False
        body = bytearray()
        body_fired = False
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                return
            record += chunk
            (self.secure if secure else self.plaintext).extend(chunk)
            buf += chunk
            while True:
                if in_data:
                    if not body and buf.startswith(b".\r\n"):
                        end = 0
                    else:
                        found = buf.find(b"\r\n.\r\n")
                        end = found + 2 if found >= 0 else -1
                    if end < 0:
                        body += buf
                        buf = b""
                        if "BODY" in self.script and not body_fired and len(body) >= self.body_drop_after:
                            body_fired = True
                            if not self._act(conn, "BODY", b""):
                                return
                        break
                    body += buf[:end]
                    buf = buf[end + 3 :]
                    in_data = False
                    with self._lock:
                        self.final_dots += 1
                        self.bodies.append(bytes(body))
                    body = bytearray()
                    if not self._act(conn, "DATA-END", b"250 2.0.0 Ok: queued as SCRIPTED\r\n"):
                        return
                    continue
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 4096:
                        return
                    break
                line, buf = buf[:end], buf[end + 2 :]
                verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper().decode("ascii", "replace")
                key = "EHLO-TLS" if verb == "EHLO" and secure else verb
                default = {
                    "EHLO": EHLO_PLAIN,
                    "EHLO-TLS": EHLO_TLS,
                    "STARTTLS": b"220 2.0.0 Ready to start TLS\r\n",
                    "AUTH": b"235 2.7.0 Authentication successful\r\n",
                    "DATA": b"354 End data with <CR><LF>.<CR><LF>\r\n",
                    "QUIT": b"221 2.0.0 Bye\r\n",
                }.get(key, b"250 2.0.0 OK\r\n")
                if not self._act(conn, key, default):
                    return
                if verb == "QUIT":
                    return
                if verb == "STARTTLS" and not secure:
                    if buf:
                        return  # a client pipelining past STARTTLS: not what the proxy should do
                    wrapped = self._handshake(raw)
                    if wrapped is None:
                        return
                    conn, secure = wrapped, True
                    break
                if verb == "DATA":
                    action = self.script.get("DATA", default)
                    in_data = isinstance(action, bytes) and action.startswith(b"354")


def flood(total: int, line: bytes = b"250-" + b"x" * 70 + b"\r\n") -> Callable[[Any], int]:
    """An action that sends ``total`` bytes of ``line`` repeated as fast as it can, until the peer
    closes; it returns how much it sent (recorded as ``sent_flood``)."""

    def run(conn: Any) -> int:
        chunk = line * (1024 * 1024 // len(line))
        sent = 0
        try:
            while sent < total:
                sent += len(chunk)  # counted when started: the proxy may close during the first one
                conn.sendall(chunk)
        except (OSError, ssl.SSLError):
            pass
        return sent

    return run
