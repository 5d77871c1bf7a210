"""The two scripted peers every socket test shares: one raw SMTP client, one scripted upstream.

harness.py holds the real parts (certificates, the aiosmtpd smarthost, the proxy's config and
start-up); this module holds the test doubles at either end of the proxy. Both are byte-exact and
run on real sockets, so a test asserts what a user of the proxy sees: the reply bytes on the client
side, the bytes (and the reads they came in) on the upstream side.

``Client`` connects in plaintext or with implicit TLS, from a chosen loopback source address
(per-IP limits), does STARTTLS, sends exact bytes or lines (or drips them a byte at a time), and
reads one reply, n replies, or all the replies that arrive before a quiet period; a close shows
as ``Closed`` (with the partial reply) or as the return of ``wait_closed``.

``ScriptedUpstream`` listens in plaintext, with STARTTLS or with implicit TLS, greets, and answers
each command from a script; it records every byte per connection and every read as it came
(what the proxy sent in one write arrives in one read), counts connections opened and closed, and
can delay its replies like a distant upstream (latency per round trip, not per command).

Script values, per key (``greeting``, ``EHLO``, ``EHLO-TLS`` (EHLO once TLS is up), ``STARTTLS``,
``AUTH``, ``MAIL``, ``RCPT``, ``DATA``, ``BODY``, ``DATA-END``, ``QUIT``, or any other verb):

- bytes: written as they are, in one ``sendall`` (several replies can share one packet: an
  injected extra reply); ``b""`` answers nothing and goes on;
- ``DROP``: close the connection at that point without answering;
- a list: a queue of actions, one per use; its last action repeats;
- a callable taking the socket: it runs (it may write itself: a flood), then what it returns is
  done: bytes or ``DROP`` as above, ``None`` to close, an int (bytes it sent, added to
  ``sent_flood``) to close. ``delayed(seconds, action)`` builds one that waits first.

``BODY`` fires once ``body_drop_after`` body bytes have arrived (mid-body faults).
"""

from __future__ import annotations

import base64
import datetime
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import trustme

from harness import CLIENT_PASSWORD, CLIENT_USER, UPSTREAM_USER
from relayproxy.smtp.reply import Catalogue, Reply

HOSTNAME = "relay.test"
"""The proxy's name in the test configs: its certificate's, its greeting's."""


# -- the client ---------------------------------------------------------------------------------


class Closed(ConnectionError):
    """The peer closed the connection; ``partial`` holds what was read of an unfinished reply."""

    def __init__(self, partial: bytes) -> None:
        super().__init__(f"connection closed; partial reply {partial!r}")
        self.partial = partial


class Client:
    """A byte-exact SMTP client on a real socket, for what smtplib cannot express.

    ``tls``: a context for implicit TLS (the handshake happens here). ``source``: the loopback
    address to connect from. The greeting is read into ``greeting`` unless ``read_greeting`` is
    False (a PROXY header or an early talker must come first).
    """

    def __init__(
        self,
        port: int,
        *,
        source: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
        timeout: float = 15,
        read_greeting: bool = True,
    ) -> None:
        self.port = port
        self.timeout = timeout
        self.sock: Any = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname=HOSTNAME)
        self.buf = b""
        self.greeting = self.reply() if read_greeting else b""

    # -- bytes ------------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Exactly these bytes, in one write."""
        self.sock.sendall(data)

    def send_lines(self, *lines: bytes) -> None:
        """Each line with a CRLF, all in one write (a pipelined group)."""
        self.send(b"".join(line + b"\r\n" for line in lines))

    def _fill(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            chunk = b""
        if not chunk:
            raise Closed(self.buf)
        self.buf += chunk

    def _take(self) -> bytes | None:
        """One whole reply (multi-line included) off the buffer, or None while none is complete."""
        pos = 0
        while True:
            end = self.buf.find(b"\r\n", pos)
            if end < 0:
                if len(self.buf) - pos > 1_000_000:
                    raise AssertionError(f"runaway reply line {self.buf[pos:pos + 200]!r}")
                return None
            line, pos = self.buf[pos:end], end + 2
            if line[3:4] != b"-":
                reply, self.buf = self.buf[:pos], self.buf[pos:]
                return reply

    def reply(self) -> bytes:
        """One whole reply, multi-line included, as the exact bytes received."""
        while (reply := self._take()) is None:
            self._fill()
        return reply

    def replies(self, n: int) -> list[bytes]:
        return [self.reply() for _ in range(n)]

    def pending(self, quiet: float = 0.3) -> list[bytes]:
        """Every whole reply that arrives until nothing has come for ``quiet`` seconds (``[]``:
        the peer said nothing, and did not close). A partial reply stays buffered."""
        out: list[bytes] = []
        self.sock.settimeout(quiet)
        try:
            while True:
                reply = self._take()
                if reply is not None:
                    out.append(reply)
                    continue
                try:
                    self._fill()
                except TimeoutError:
                    return out
        finally:
            self.sock.settimeout(self.timeout)

    def drip(self, data: bytes, every: float) -> bytes:
        """Send ``data`` one byte every ``every`` seconds until the peer writes (or closes), then
        return its reply: a slow client's bytes, each well within any idle timeout."""
        self.sock.settimeout(every)
        try:
            for i in range(len(data)):
                try:
                    self.send(data[i : i + 1])
                except OSError:
                    break
                try:
                    self._fill()
                except TimeoutError:
                    continue
                except Closed:
                    pass
                break
        finally:
            self.sock.settimeout(self.timeout)
        return self.reply()

    def command(self, line: bytes) -> bytes:
        """Send one line (CRLF added unless it ends with one) and return the one reply to it."""
        self.send(line if line.endswith(b"\r\n") else line + b"\r\n")
        return self.reply()

    def wait_closed(self) -> bytes:
        """Read until the peer closes; return whatever came before the close (buffered bytes too).
        A peer that neither closes nor writes within the timeout fails the test."""
        rest, self.buf = self.buf, b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise AssertionError(f"not closed within {self.timeout}s; got {rest!r}") from None
            except (ConnectionResetError, ssl.SSLError, OSError):
                return rest
            if not chunk:
                return rest
            rest += chunk

    def starttls(self, context: ssl.SSLContext) -> None:
        """The TLS handshake now (after the 220 to STARTTLS, or on a bare connection)."""
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

    def auth(self, user: str = CLIENT_USER, password: str = CLIENT_PASSWORD, authzid: str = "") -> bytes:
        """AUTH PLAIN with an initial response; the reply, whatever it is."""
        return self.command(auth_plain(user, password, authzid))

    def login(self, user: str = CLIENT_USER, password: str = CLIENT_PASSWORD) -> None:
        reply = self.auth(user, password)
        assert reply == expect(Catalogue.AUTH_OK, b"235 2.7.0"), reply

    def envelope(self, sender: bytes = b"app1@example.org", recipients: tuple[bytes, ...] = (b"bob@example.net",)) -> None:
        assert self.command(b"MAIL FROM:<" + sender + b">").startswith(b"250"), "MAIL refused"
        for rcpt in recipients:
            assert self.command(b"RCPT TO:<" + rcpt + b">").startswith(b"250"), "RCPT refused"


def auth_plain(user: str = CLIENT_USER, password: str = CLIENT_PASSWORD, authzid: str = "") -> bytes:
    """The AUTH PLAIN command line with an initial response, without its CRLF."""
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


# -- the upstream -------------------------------------------------------------------------------

DROP = "DROP"
Action = Union[bytes, str, list[Any], Callable[[Any], Any]]

GREETING = b"220 scripted.test ESMTP\r\n"
EHLO_CLEAR = b"250-scripted.test\r\n250-PIPELINING\r\n250-SIZE 100000000\r\n250 8BITMIME\r\n"
"""A plaintext upstream's EHLO (tls="none"): no STARTTLS, no AUTH."""
EHLO_STARTTLS = b"250-scripted.test\r\n250-PIPELINING\r\n250-SIZE 100000000\r\n250-8BITMIME\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n"
"""Offers AUTH before TLS too: a proxy that sends credentials in the clear would take the bait."""
EHLO_NO_STARTTLS = b"250-scripted.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 AUTH PLAIN LOGIN\r\n"
EHLO_TLS = b"250-scripted.test\r\n250-PIPELINING\r\n250-SIZE 100000000\r\n250-8BITMIME\r\n250 AUTH PLAIN LOGIN\r\n"
EHLO_NO_PIPELINING = b"250-scripted.test\r\n250-SIZE 100000000\r\n250 8BITMIME\r\n"
READY = b"220 2.0.0 Ready to start TLS\r\n"
GO_AHEAD = b"354 go ahead\r\n"
QUEUED = b"250 2.0.0 Ok: queued as REC1\r\n"
OK = b"250 2.0.0 OK\r\n"


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
    """A certificate for an upstream (the harness's PKI CA, or another one: an untrusted upstream)."""
    leaf = ca.issue_cert(*(hostnames or ("localhost",)), not_before=not_before, not_after=not_after)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    # The whole chain, as a real server sends it.
    cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return Certificate(cert, key)


def delayed(seconds: float, action: Action) -> Callable[[Any], Action]:
    """An action that waits ``seconds``, then does ``action``."""

    def run(conn: Any) -> Action:
        time.sleep(seconds)
        return action

    return run


def flood(total: int, line: bytes = b"250-" + b"x" * 70 + b"\r\n") -> Callable[[Any], int]:
    """An action that sends ``total`` bytes of ``line`` repeated as fast as it can, until the peer
    closes; it returns how much it sent (recorded as ``sent_flood``), then the connection closes."""

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


class ScriptedUpstream:
    """A threaded SMTP server that answers from ``script`` and records everything it receives.

    ``tls``: "none" (plaintext, no STARTTLS offered), "starttls" or "implicit", both with
    ``certificate``. ``delay``: a distant upstream's round trip, in seconds: the greeting goes
    out that long after the connection, and the replies to what one read carried that long after
    the read (all together: a pipelined group costs one round trip, not one per command).
    """

    def __init__(
        self,
        script: dict[str, Action] | None = None,
        *,
        tls: str = "none",
        certificate: Certificate | None = None,
        delay: float = 0.0,
        body_drop_after: int = 1,
    ) -> None:
        assert tls in ("none", "starttls", "implicit"), tls
        assert (certificate is not None) == (tls != "none"), "a certificate goes with STARTTLS or implicit TLS"
        self.script: dict[str, Action] = dict(script or {})
        self.tls = tls
        self._context = certificate.context() if certificate is not None else None
        self.delay = delay
        self.body_drop_after = body_drop_after
        self.sessions: list[bytearray] = []
        """Per connection, everything received (plaintext, then decrypted after a handshake), in order."""
        self.reads: list[list[bytes]] = []
        """Per connection, every read as it came: what the proxy sent in one write arrives in one."""
        self.plaintext = bytearray()
        """Everything received before TLS, on every connection."""
        self.secure = bytearray()
        """Everything received after a TLS handshake, decrypted, on every connection."""
        self.commands: list[bytes] = []
        """Every command line read outside DATA, across connections, without its CRLF."""
        self.bodies: list[bytes] = []
        """Every complete body, as received (dot-stuffed, up to and including the CRLF before the final dot)."""
        self.connections = 0
        """Connections accepted."""
        self.closed = 0
        """Connections ended (either side closed)."""
        self.tls_errors: list[str] = []
        self.sent_flood = 0
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True, name="scripted-upstream").start()

    def toml(self, name: str = "default", *, tls: str | None = None, ca_file: Path | None = None, pool_size: int = 0) -> str:
        """The [upstream.NAME] section for this server; credentials only with TLS.

        ``pool_size = 0`` by default: each test reads one upstream session to its end; kept
        sessions are tested on their own.
        """
        tls = tls or self.tls
        lines = [
            f"[upstream.{name}]",
            'host = "localhost"' if tls != "none" else 'host = "127.0.0.1"',
            f"port = {self.port}",
            f'tls = "{tls}"',
            "connect_timeout = 10",
            "reply_timeout = 10",
            "data_timeout = 10",
            f"pool_size = {pool_size}",
        ]
        if tls != "none":
            if ca_file is not None:
                lines.append(f'ca_file = "{ca_file}"')
            lines += [f'username = "{UPSTREAM_USER}"', 'password_env = "RELAYPROXY_TEST_UPSTREAM_PASSWORD"']
        return "\n".join(lines) + "\n"

    @property
    def data(self) -> bytes:
        """Everything received, on every connection, in order of the connections."""
        return b"".join(bytes(s) for s in list(self.sessions))

    @property
    def all_reads(self) -> list[bytes]:
        """Every read of every connection."""
        return [read for reads in list(self.reads) for read in list(reads)]

    @property
    def final_dots(self) -> int:
        return len(self.bodies)

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
                record, reads = bytearray(), list[bytes]()
                self.sessions.append(record)
                self.reads.append(reads)
            threading.Thread(target=self._session, args=(conn, record, reads), daemon=True).start()

    def _session(self, conn: socket.socket, record: bytearray, reads: list[bytes]) -> None:
        conn.settimeout(30)
        # Each reply its own segment at once: Nagle would hold the second reply of a pipelined
        # group for the proxy's delayed ACK (40 ms), a delay no real server adds.
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self._converse(conn, record, reads)
        except (OSError, ssl.SSLError):
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass
            with self._lock:
                self.closed += 1

    def _next(self, key: str, default: bytes) -> Action:
        with self._lock:
            action = self.script.get(key, default)
            if isinstance(action, list):
                action = action.pop(0) if len(action) > 1 else action[0]
        return action

    def _act(self, conn: Any, key: str, default: bytes, due: float = 0.0) -> bytes | None:
        """Do the script's action for ``key``: the bytes sent, or None when the connection must end.
        Bytes go out no earlier than ``due`` (time.monotonic())."""
        action = self._next(key, default)
        while callable(action):
            result = action(conn)
            if isinstance(result, int):
                with self._lock:
                    self.sent_flood += result
                return None
            if result is None:
                return None
            action = result
        if action == DROP:
            return None
        assert isinstance(action, bytes), f"script action for {key}: {action!r}"
        if action:
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            conn.sendall(action)
        return action

    def _default(self, key: str) -> bytes:
        return {
            "greeting": GREETING,
            "EHLO": EHLO_STARTTLS if self.tls == "starttls" else EHLO_CLEAR,
            "EHLO-TLS": EHLO_TLS,
            "STARTTLS": READY if self.tls == "starttls" else b"454 4.7.0 TLS not available\r\n",
            "AUTH": b"235 2.7.0 Authentication successful\r\n",
            "DATA": GO_AHEAD,
            "DATA-END": QUEUED,
            "QUIT": b"221 2.0.0 Bye\r\n",
        }.get(key, OK)

    def _handshake(self, conn: socket.socket) -> Any:
        assert self._context is not None
        try:
            return self._context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as e:
            self.tls_errors.append(f"{type(e).__name__}: {e}")
            return None

    def _converse(self, raw: socket.socket, record: bytearray, reads: list[bytes]) -> None:
        conn: Any = raw
        secure = False
        if self.tls == "implicit":
            conn = self._handshake(raw)
            if conn is None:
                return
            secure = True
        due = time.monotonic() + self.delay
        if self._act(conn, "greeting", GREETING, due) is None:
            return
        buf = b""
        body: bytearray | None = None
        """Inside DATA: the body received so far."""
        body_fired = False
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                return
            due = time.monotonic() + self.delay
            record += chunk
            reads.append(chunk)
            (self.secure if secure else self.plaintext).extend(chunk)
            buf += chunk
            while buf:
                if body is not None:
                    searched = max(0, len(body) - 4)
                    body += buf
                    buf = b""
                    if body.startswith(b".\r\n"):
                        end = 0
                    else:
                        found = body.find(b"\r\n.\r\n", searched)
                        end = found + 2 if found >= 0 else -1
                    if end < 0:
                        if "BODY" in self.script and not body_fired and len(body) >= self.body_drop_after:
                            body_fired = True
                            if self._act(conn, "BODY", b"", due) is None:
                                return
                        break
                    buf = bytes(body[end + 3 :])
                    self.bodies.append(bytes(body[:end]))
                    body = None
                    if self._act(conn, "DATA-END", QUEUED, due) is None:
                        return
                    continue
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 4096:
                        return
                    break
                line, buf = buf[:end], buf[end + 2 :]
                self.commands.append(line)
                verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper().decode("ascii", "replace")
                key = "EHLO-TLS" if verb == "EHLO" and secure else verb
                sent = self._act(conn, key, self._default(key), due)
                if sent is None or verb == "QUIT":
                    return
                if verb == "STARTTLS" and not secure and self._context is not None and sent.startswith(b"220"):
                    if buf:
                        return  # a client pipelining past STARTTLS: not what the proxy should do
                    wrapped = self._handshake(raw)
                    if wrapped is None:
                        return
                    conn, secure = wrapped, True
                    break
                if verb == "DATA" and sent.startswith(b"354"):
                    body, body_fired = bytearray(), False
