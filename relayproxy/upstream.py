"""The upstream side: our own SMTP client protocol and the dialogue with a user's smarthost.

Twisted's ESMTPClient is not used: it mangles line ends and dot-stuffing, accepts replies injected
before a STARTTLS handshake and puts the AUTH PLAIN payload in error texts (see the README).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, ssl
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, ConnectionDone
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from relayproxy.config import UpstreamConfig
from relayproxy.deadline import Deadline
from relayproxy.errors import UpstreamError
from relayproxy.logs import EventLog
from relayproxy.metrics import Metrics, NullMetrics, UpstreamPhase
from relayproxy.oauth import TokenError, TokenSource, xoauth2_initial_response
from relayproxy.smtp import sasl
from relayproxy.smtp.reply import MAX_LINE, Catalogue, Reply, ReplyError, ReplyParser
from relayproxy.transport import write_now

log = EventLog("relayproxy.upstream")


class _Lost(Exception):
    """The upstream connection ended; ``reason`` is Twisted's failure."""

    def __init__(self, reason: Failure) -> None:
        super().__init__(reason.getErrorMessage())
        self.reason = reason


class _Timeout(Exception):
    pass


class _Desync(Exception):
    """The upstream sent bytes nobody asked for: injection, or a broken server."""


_EXCHANGE_FAILURES = (_Lost, _Timeout, _Desync, ReplyError)


class UpstreamProtocol(Protocol):
    """Reads bounded, strictly parsed replies; writes what the dialogue tells it to."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._buffer = b""
        self._parser = ReplyParser()
        self._replies: deque[Reply] = deque()
        self._waiter: defer.Deferred[Reply] | None = None
        self._error: Exception | None = None
        self._reply_timeout = Deadline(clock, self._timed_out)
        self.connected = False

    def connectionMade(self) -> None:
        self.connected = True
        # Nagle plus the peer's delayed ACK costs ~40 ms per message on small writes.
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._buffer += data
        try:
            while True:
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    if len(self._buffer) > MAX_LINE:
                        raise ReplyError("reply line too long")
                    return
                line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
                reply = self._parser.line(line)
                if reply is not None:
                    self._deliver(reply)
        except ReplyError as e:
            self._fail(e)
            self.abort()

    def _deliver(self, reply: Reply) -> None:
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            self._reply_timeout.stop()
            waiter.callback(reply)
        else:
            self._replies.append(reply)

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self._reply_timeout.cancel()
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            waiter.errback(error)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # type: ignore[no-untyped-call]
        self.connected = False
        self._fail(_Lost(reason))

    @property
    def idle(self) -> bool:
        """Connected, and nothing arrived that we did not ask for (an idle-timeout 421, say)."""
        return bool(self.connected) and self._error is None and not self._unsolicited

    def abort(self) -> None:
        """Close at once, never sending anything more (above all not the final dot)."""
        if self.transport is not None and self.connected:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def write(self, data: bytes) -> None:
        write_now(self.transport, data)

    async def read_reply(self, timeout: float) -> Reply:
        if self._replies:
            return self._replies.popleft()
        if self._error is not None:
            raise self._error
        waiter: defer.Deferred[Reply] = defer.Deferred()
        self._waiter = waiter
        self._reply_timeout.start(timeout)
        return await waiter

    def _timed_out(self) -> None:
        self._fail(_Timeout())
        self.abort()

    @property
    def _unsolicited(self) -> bool:
        """Bytes or replies (whole or begun) that arrived while we asked for nothing."""
        return bool(self._replies or self._buffer or self._parser.in_progress)

    async def command(self, line: bytes, timeout: float) -> Reply:
        if self._unsolicited:
            # Replies before we asked: the next command would be answered by a stale or forged reply.
            raise _Desync()
        self.write(line + b"\r\n")
        return await self.read_reply(timeout)

    async def pipeline(self, lines: list[bytes], timeout: float) -> list[Reply]:
        """Send ``lines`` in one write (RFC 2920: the upstream offered PIPELINING); one reply each, in order."""
        if self._unsolicited:
            raise _Desync()
        self.write(b"".join(line + b"\r\n" for line in lines))
        return [await self.read_reply(timeout) for _ in lines]

    def start_tls(self, options: Any) -> None:
        # RFC 3207 5: anything read before the handshake came in plaintext and could be injected.
        if self._unsolicited:
            raise _Desync()
        self.transport.startTLS(options)  # type: ignore[union-attr]


def _extensions(ehlo: Reply) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in ehlo.lines[1:]:
        keyword, _, params = line.partition(" ")
        found[keyword.upper()] = params.upper()
    return found


@dataclass(frozen=True)
class _Target:
    host: str
    port: int
    tls_options: Any


@dataclass
class UpstreamConnector:
    """Everything about one upstream that is the same for every session, computed once."""

    reactor: Any
    config: UpstreamConfig
    local_hostname: str
    metrics: Metrics = field(default_factory=NullMetrics)

    def __post_init__(self) -> None:
        cfg = self.config
        trust = None
        if cfg.ca_file is not None:
            trust = ssl.trustRootFromCertificates(_load_certificates(cfg.ca_file.read_bytes()))  # type: ignore[no-untyped-call]
        self._targets = [
            _Target(host, port, ssl.optionsForClientTLS(host, trustRoot=trust))
            for host, port in ((cfg.host, cfg.port), *cfg.fallbacks)
        ]
        self._ehlo = f"EHLO {cfg.helo_name or self.local_hostname}".encode("ascii")
        # One token cache per upstream account, shared by every session (and kept across reloads
        # while the upstream's configuration is unchanged).
        self._tokens = TokenSource(self.reactor, cfg) if cfg.auth == "xoauth2" else None
        self._factory = Factory.forProtocol(lambda: UpstreamProtocol(self.reactor))
        # One "Starting factory" log line per upstream connection is noise.
        self._factory.noisy = False
        self._idle: list[UpstreamSession] = []

    async def acquire(self, client: object) -> UpstreamSession:
        """A kept session of this account if one looks alive, else a new one, for ``client``.

        Connecting, TLS and AUTH cost more than the message itself for small mail; a session that
        ended its transaction cleanly serves the next message routed to the same account. The
        session this client's own last message used is taken back first, without RSET: it is as
        the client left it. Any other goes after an RSET (see UpstreamSession.mail), preferring one
        whose client has gone over one still reserved for a connected client.
        """
        own = next((session for session in self._idle if session.client is client), None)
        if own is not None and self._take(own):
            return own
        while self._idle:
            session = next((s for s in reversed(self._idle) if s.client is None), self._idle[-1])
            if self._take(session):
                session.owes_reset = True
                session.client = client
                return session
        session = await self.open()
        session.client = client
        return session

    def _take(self, session: UpstreamSession) -> bool:
        """Out of the pool; whether it is still usable (if not, it is closed)."""
        self._idle.remove(session)
        session.pool_timeout.stop()
        if session.usable:
            return True
        session.abort()
        return False

    def release(self, session: UpstreamSession) -> None:
        """Keep a clean session for the next transaction; anything doubtful is closed.

        While its client is connected, a kept session is reserved for that client's next message
        (another client may still take it) and does not count against pool_size, which bounds the
        sessions kept for whoever comes next.
        """
        if not session.usable or session.in_transaction:
            session.close()
            return
        session.pool_timeout.start(self.config.pool_idle_timeout)
        self._idle.append(session)
        self._trim()

    def departed(self, client: object) -> None:
        """``client`` disconnected: a session kept for it is now kept for anyone."""
        for session in self._idle:
            if session.client is client:
                session.client = None
        self._trim()

    def _trim(self) -> None:
        unreserved = [session for session in self._idle if session.client is None]
        # The longest idle go first.
        for session in unreserved[: max(0, len(unreserved) - self.config.pool_size)]:
            self._drop(session)

    def expire(self, session: UpstreamSession) -> None:
        """``session`` waited in the pool for pool_idle_timeout."""
        if session in self._idle:
            self._drop(session)

    def _drop(self, session: UpstreamSession) -> None:
        self._idle.remove(session)
        session.pool_timeout.cancel()
        session.close()

    def close_idle(self) -> None:
        for session in list(self._idle):
            self._drop(session)

    async def open(self) -> UpstreamSession:
        """Connect, greet, secure and authenticate, trying each host in order.

        Every failure is an UpstreamError with a 4xx for the client. The next host is tried when
        one cannot be reached, fails TLS, times out or answers 4xx before MAIL; a 5xx (credentials
        refused, service refused) goes back to the client, since another host would say the same.
        """
        failure: UpstreamError | None = None
        for index, target in enumerate(self._targets):
            try:
                return await self._open(target)
            except UpstreamError as e:
                if not e.failover:
                    raise
                failure = e
                if index + 1 < len(self._targets):
                    log.warn("upstream host failed, trying the next", upstream=self.config.name, host=f"{target.host}:{target.port}", detail=e.detail)
        assert failure is not None
        raise failure

    async def _open(self, target: _Target) -> UpstreamSession:
        cfg = self.config
        name = cfg.name
        where = f"{target.host}:{target.port}"
        endpoint: Any = HostnameEndpoint(self.reactor, target.host, target.port, timeout=cfg.connect_timeout)
        if cfg.tls == "implicit":
            endpoint = wrapClientTLS(target.tls_options, endpoint)
        started = self.reactor.seconds()
        try:
            proto: UpstreamProtocol = await endpoint.connect(self._factory)
        except (ConnectError, OSError) as e:
            raise UpstreamError(Catalogue.upstream_unreachable(name), f"connect to {where}: {e}", failover=True) from None
        self._took("connect", started)
        session = UpstreamSession(proto, cfg, self)
        try:
            await self._handshake(session, target)
        except UpstreamError:
            proto.abort()
            raise
        except _Lost as e:
            proto.abort()
            if e.reason.check(SSL.Error, VerificationError):  # type: ignore[no-untyped-call]
                raise UpstreamError(
                    Catalogue.upstream_tls_failed(name), f"TLS with {where} failed: {_ssl_reason(e.reason)}",
                    failover=True, step="STARTTLS",
                ) from None
            raise UpstreamError(Catalogue.upstream_unreachable(name), f"{where}: connection lost during setup: {e}", failover=True) from None
        except (_Timeout, _Desync, ReplyError) as e:
            proto.abort()
            raise UpstreamError(Catalogue.upstream_unreachable(name), f"{where}: setup failed: {type(e).__name__} {e}", failover=True) from None
        return session

    def _took(self, phase: UpstreamPhase, since: float) -> float:
        now: float = self.reactor.seconds()
        self.metrics.upstream_latency(self.config.name, phase, now - since)
        return now

    async def _handshake(self, session: UpstreamSession, target: _Target) -> None:
        cfg, proto, name = self.config, session.protocol, self.config.name

        def refused(step: str, reply: Reply, why: Reply) -> UpstreamError:
            return UpstreamError(
                why, f"{target.host}:{target.port}: {step} refused: {reply}", failover=reply.is_temporary,
                step=step.split()[0], upstream_reply=reply,
            )

        started = self.reactor.seconds()
        greeting = await proto.read_reply(cfg.reply_timeout)
        if cfg.tls == "implicit":
            # The handshake runs before the greeting can be read.
            self._took("tls", started)
        if greeting.code != 220:
            raise refused("greeting", greeting, Catalogue.upstream_unreachable(name))
        ehlo = await proto.command(self._ehlo, cfg.reply_timeout)
        if ehlo.code != 250:
            raise refused("EHLO", ehlo, Catalogue.upstream_unreachable(name))
        if cfg.tls == "starttls":
            if "STARTTLS" not in _extensions(ehlo):
                # Also what a downgrade attack looks like: never continue in plaintext.
                raise UpstreamError(
                    Catalogue.upstream_tls_failed(name), f"{target.host}:{target.port} does not offer STARTTLS",
                    failover=True, step="STARTTLS",
                )
            tls_started = self.reactor.seconds()
            ready = await proto.command(b"STARTTLS", cfg.reply_timeout)
            if ready.code != 220:
                raise refused("STARTTLS", ready, Catalogue.upstream_tls_failed(name))
            try:
                proto.start_tls(target.tls_options)
            except _Desync:
                raise UpstreamError(
                    Catalogue.upstream_tls_failed(name),
                    f"{target.host}:{target.port} sent bytes after its 220 to STARTTLS, before the handshake (injection?)",
                    failover=True, step="STARTTLS",
                ) from None
            ehlo = await proto.command(self._ehlo, cfg.reply_timeout)
            self._took("tls", tls_started)
            if ehlo.code != 250:
                raise refused("EHLO after STARTTLS", ehlo, Catalogue.upstream_unreachable(name))
        session.extensions = _extensions(ehlo)
        auth_started = self.reactor.seconds()
        if self._tokens is not None and cfg.username is not None:
            await self._authenticate_xoauth2(session, cfg.username, self._tokens)
            self._took("auth", auth_started)
        elif cfg.username is not None and cfg.password is not None:
            await self._authenticate(session, cfg.username, cfg.password)
            self._took("auth", auth_started)

    async def _authenticate_xoauth2(self, session: UpstreamSession, username: str, tokens: TokenSource) -> None:
        proto, cfg = session.protocol, self.config
        refused = Catalogue.upstream_auth_failed(cfg.name)
        if "XOAUTH2" not in session.extensions.get("AUTH", "").split():
            raise UpstreamError(refused, f"upstream does not offer AUTH XOAUTH2 (AUTH {session.extensions.get('AUTH') or 'absent'})", step="AUTH")
        for attempt in (1, 2):
            try:
                token = await tokens.token()
            except TokenError as e:
                raise UpstreamError(Catalogue.upstream_token_failed(cfg.name), e.detail, step="AUTH") from None
            # Sent after the 334, not on the AUTH line: a long token would pass 512 octets.
            reply = await proto.command(b"AUTH XOAUTH2", cfg.reply_timeout)
            if reply.code == 334:
                reply = await proto.command(xoauth2_initial_response(username, token).encode("ascii"), cfg.reply_timeout)
            if reply.code == 334:
                # RFC 7628 3.2.3: the server's error comes as a challenge; an empty line ends it.
                reply = await proto.command(b"", cfg.reply_timeout)
            if reply.code == 235:
                return
            tokens.invalidate(token)
            if attempt == 2 or reply.is_temporary:
                break
        raise UpstreamError(
            refused, f"upstream refused the access token for {username}: {reply}", failover=reply.is_temporary,
            step="AUTH", upstream_reply=reply,
        )

    async def _authenticate(self, session: UpstreamSession, username: str, password: str) -> None:
        proto, cfg = session.protocol, self.config
        refused = Catalogue.upstream_auth_failed(cfg.name)
        mechanisms = session.extensions.get("AUTH", "").split()
        # Error details name the reply only: the command lines carry the secret.
        if "PLAIN" in mechanisms:
            reply = await proto.command(b"AUTH PLAIN " + sasl.encode_plain(username, password).encode(), cfg.reply_timeout)
        elif "LOGIN" in mechanisms:
            reply = await proto.command(b"AUTH LOGIN", cfg.reply_timeout)
            for secret in (username, password):
                if reply.code != 334:
                    break
                reply = await proto.command(sasl.encode(secret).encode(), cfg.reply_timeout)
        else:
            raise UpstreamError(refused, f"upstream offers no PLAIN or LOGIN (AUTH {' '.join(mechanisms) or 'absent'})", step="AUTH")
        if reply.code != 235:
            raise UpstreamError(
                refused, f"upstream refused the credentials for {username}: {reply}", failover=reply.is_temporary,
                step="AUTH", upstream_reply=reply,
            )


def _load_certificates(pem: bytes) -> list[ssl.Certificate]:
    marker = b"-----END CERTIFICATE-----"
    return [ssl.Certificate.loadPEM(part + marker) for part in pem.split(marker) if b"-----BEGIN" in part]


def _ssl_reason(reason: Failure) -> str:
    return reason.getErrorMessage() or "handshake failed"


class UpstreamSession:
    """One authenticated session; transaction methods map every failure to the client's reply."""

    def __init__(self, protocol: UpstreamProtocol, config: UpstreamConfig, connector: UpstreamConnector) -> None:
        self.protocol = protocol
        self.config = config
        self.connector = connector
        self.used = False
        """It carried a MAIL before: if the next one fails, the upstream may just have dropped it while idle."""
        self.owes_reset = False
        """Handed out again by the pool: RSET goes before the next MAIL."""
        self.client: object = None
        """Whose transactions it carries (a server session); kept while it waits in the pool."""
        self.pool_timeout = Deadline(connector.reactor, lambda: connector.expire(self))
        """Running while the session waits in the pool."""
        self.extensions: dict[str, str] = {}
        self.broken = False
        self.in_transaction = False

    @property
    def usable(self) -> bool:
        return not self.broken and self.protocol.idle

    def _failed(self, step: str, error: Exception) -> UpstreamError:
        """The client's reply for a failed exchange; the session is never used again."""
        name = self.config.name
        self.broken = True
        if isinstance(error, _Lost):
            return UpstreamError(Catalogue.UPSTREAM_LOST, f"upstream {name}: connection lost at {step}: {error}", step=step)
        if isinstance(error, _Timeout):
            return UpstreamError(Catalogue.UPSTREAM_TIMEOUT, f"upstream {name}: timed out at {step}", step=step)
        self.protocol.abort()
        return UpstreamError(
            Catalogue.UPSTREAM_BAD_REPLY, f"upstream {name}: invalid reply at {step}: {type(error).__name__} {error}", step=step
        )

    async def command(self, line: bytes, timeout: float | None = None) -> Reply:
        try:
            return await self.protocol.command(line, timeout or self.config.reply_timeout)
        except _EXCHANGE_FAILURES as e:
            raise self._failed(line.split(b" ", 1)[0].decode("ascii", "replace"), e) from None

    async def mail(self, line: bytes) -> Reply:
        """MAIL, after the RSET a kept session owes; both in one write when the upstream pipelines,
        so reusing a session does not cost a round trip (~RTT to a provider) per client connection."""
        self.used = True
        if not self.owes_reset:
            return await self.command(line)
        self.owes_reset = False
        timeout = self.config.reply_timeout
        if self.supports("PIPELINING"):
            try:
                reset, reply = await self.protocol.pipeline([b"RSET", line], timeout)
            except _EXCHANGE_FAILURES as e:
                raise self._failed("RSET", e) from None
        else:
            reset = reply = await self.command(b"RSET")
            if reset.is_positive:
                reply = await self.command(line)
        if not reset.is_positive:
            self.abort()
            raise UpstreamError(Catalogue.UPSTREAM_BAD_REPLY, f"upstream {self.config.name}: kept session refused RSET: {reset}", step="RSET")
        return reply

    def supports(self, extension: str) -> bool:
        return extension in self.extensions

    def send_body(self, data: bytes) -> None:
        self.protocol.write(data)

    def register_producer(self, producer: IPushProducer) -> None:
        self.protocol.transport.registerProducer(producer, True)  # type: ignore[union-attr]

    def unregister_producer(self) -> None:
        if self.protocol.connected:
            self.protocol.transport.unregisterProducer()  # type: ignore[union-attr]

    async def end_data(self, last: bytes) -> Reply:
        # The last body bytes and the dot go in one write: one segment, no delayed-ACK stall.
        self.unregister_producer()
        self.protocol.write(last + b".\r\n")
        try:
            return await self.protocol.read_reply(self.config.data_timeout)
        except _EXCHANGE_FAILURES as e:
            raise self._failed("end-of-data", e) from None

    def abort(self) -> None:
        self.broken = True
        self.protocol.abort()

    def tls_description(self) -> str:
        """The negotiated TLS version and the peer certificate's subject and expiry, for operators."""
        handle = getattr(self.protocol.transport, "getHandle", lambda: None)()
        if not isinstance(handle, SSL.Connection):
            return "no TLS"
        version = handle.get_protocol_version_name()
        certificate = handle.get_peer_certificate(as_cryptography=True)
        if certificate is None:
            return version
        subject = certificate.subject.rfc4514_string()
        return f"{version}, certificate {subject}, expires {certificate.not_valid_after_utc:%Y-%m-%d}"

    def close(self) -> None:
        """QUIT politely without waiting; the server's reply does not matter any more."""
        if self.usable:
            self.protocol.write(b"QUIT\r\n")
            self.protocol.transport.loseConnection()  # type: ignore[union-attr]
        self.broken = True

