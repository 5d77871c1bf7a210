"""Dialling one upstream: connect, greet, secure and authenticate, trying each of its hosts in turn."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer, ssl
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory

from relayproxy.config import UpstreamConfig
from relayproxy.deadline import Deadline
from relayproxy.errors import UpstreamError
from relayproxy.logs import EventLog
from relayproxy.metrics import Metrics, NullMetrics, UpstreamPhase
from relayproxy.oauth import TokenError, TokenSource
from relayproxy.smtp.client import Command, Handshake, Login, NeedToken, Refused, StartTLS
from relayproxy.smtp.reply import Catalogue, Reply, ReplyError
from relayproxy.upstream.failures import setup_failed
from relayproxy.upstream.protocol import Desync, Lost, Timeout, UpstreamProtocol
from relayproxy.trust import trust_root

log = EventLog("relayproxy.upstream")


class Connection:
    """One authenticated upstream connection and what is known about it between transactions."""

    def __init__(self, protocol: UpstreamProtocol, config: UpstreamConfig, extensions: dict[str, str]) -> None:
        self.protocol = protocol
        self.config = config
        self.extensions = extensions
        self.used = False
        """It carried a MAIL before: if the next one fails, the upstream may just have dropped it while idle."""
        self.messages = 0
        """Transactions it carried to the end of data, counted against max_messages_per_session."""
        self.owes_reset = False
        """RSET goes before the next MAIL (handed to another client, or left mid-envelope)."""
        self.reset_reply: defer.Deferred[Reply | None] | None = None
        """The reply to an RSET already sent, not yet read."""
        self.client: object = None
        """Whose transactions it carries (a server session); kept while it waits in the pool."""
        self.in_transaction = False
        self.broken = False
        self.pool_timeout: Deadline | None = None
        """Running while the connection waits in the pool."""

    @property
    def usable(self) -> bool:
        return not self.broken and self.protocol.usable

    def supports(self, extension: str) -> bool:
        return extension in self.extensions

    def abort(self) -> None:
        self.broken = True
        self.protocol.abort()

    def close(self) -> None:
        """QUIT politely without waiting; the server's reply does not matter any more."""
        if self.usable:
            self.protocol.write(b"QUIT\r\n")
            self.protocol.transport.loseConnection()  # type: ignore[union-attr]
        else:
            # Connected but of no use (an unasked reply came): closed all the same, or it would
            # hold its socket and its pacing slot until the upstream hangs up.
            self.protocol.abort()
        self.broken = True

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


@dataclass(frozen=True)
class _Target:
    host: str
    port: int
    tls_options: Any

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


class Connector:
    """Everything about dialling one upstream that is the same for every connection, computed once."""

    def __init__(
        self, reactor: Any, config: UpstreamConfig, local_hostname: str, metrics: Metrics | None = None,
        endpoint: Callable[[str, int], IStreamClientEndpoint] | None = None,
    ) -> None:
        """``endpoint`` makes the TCP endpoint for a host and port (tests connect in memory)."""
        self.reactor = reactor
        self._endpoint = endpoint or (lambda host, port: HostnameEndpoint(reactor, host, port, timeout=config.connect_timeout))
        self.config = cfg = config
        self.metrics = metrics or NullMetrics()
        trust = trust_root(cfg.ca_file)
        self._targets = [
            _Target(host, port, ssl.optionsForClientTLS(host, trustRoot=trust))
            for host, port in ((cfg.host, cfg.port), *cfg.fallbacks)
        ]
        self._ehlo = f"EHLO {cfg.helo_name or local_hostname}".encode("ascii")
        # One token cache per upstream account, shared by every connection (and kept across reloads
        # while the upstream's configuration is unchanged).
        self._tokens = TokenSource(reactor, cfg) if cfg.auth == "xoauth2" else None
        self._factory = Factory.forProtocol(lambda: UpstreamProtocol(reactor))
        # One "Starting factory" log line per upstream connection is noise.
        self._factory.noisy = False

    async def open(self) -> Connection:
        """A new authenticated connection, trying each host in order.

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
                    log.warn("upstream host failed, trying the next", upstream=self.config.name, host=target.where, detail=e.detail)
        assert failure is not None
        raise failure

    async def _open(self, target: _Target) -> Connection:
        cfg = self.config
        endpoint = self._endpoint(target.host, target.port)
        if cfg.tls == "implicit":
            endpoint = wrapClientTLS(target.tls_options, endpoint)
        started = self.reactor.seconds()
        try:
            protocol = await endpoint.connect(self._factory)
        except (ConnectError, OSError) as e:
            raise setup_failed(cfg.name, target.where, e) from None
        assert isinstance(protocol, UpstreamProtocol)
        self._took("connect", started)
        try:
            return await self._handshake(protocol, target)
        except UpstreamError:
            protocol.abort()
            raise
        except (Lost, Timeout, Desync, ReplyError) as e:
            protocol.abort()
            raise setup_failed(cfg.name, target.where, e) from None

    def _took(self, phase: UpstreamPhase, since: float) -> None:
        self.metrics.upstream_latency(self.config.name, phase, self.reactor.seconds() - since)

    async def _handshake(self, protocol: UpstreamProtocol, target: _Target) -> Connection:
        cfg = self.config
        login = None
        if cfg.username is not None and (self._tokens is not None or cfg.password is not None):
            login = Login(cfg.username, None if self._tokens is not None else cfg.password)
        handshake = Handshake(target.where, self._ehlo, cfg.tls == "starttls", login)
        started = self.reactor.seconds()
        step = handshake.receive(await protocol.greeting(cfg.reply_timeout))
        if cfg.tls == "implicit":
            # The handshake runs before the greeting can be read.
            self._took("tls", started)
        tls_started: float | None = None
        auth_started = self.reactor.seconds()
        while True:
            if isinstance(step, Command):
                if step.step == "STARTTLS":
                    tls_started = self.reactor.seconds()
                reply = await protocol.command(step.step, step.line, cfg.reply_timeout)
                if step.step == "EHLO":
                    if tls_started is not None:
                        self._took("tls", tls_started)
                    auth_started = self.reactor.seconds()
                step = handshake.receive(reply)
            elif isinstance(step, StartTLS):
                try:
                    protocol.start_tls(target.tls_options)
                except Desync:
                    raise UpstreamError(
                        Catalogue.upstream_tls_failed(cfg.name),
                        f"{target.where} sent bytes after its 220 to STARTTLS, before the handshake (injection?)",
                        failover=True, step="STARTTLS",
                    ) from None
                step = handshake.secured()
            elif isinstance(step, NeedToken):
                assert self._tokens is not None
                try:
                    token = await self._tokens.token()
                except TokenError as e:
                    raise UpstreamError(Catalogue.upstream_token_failed(cfg.name), e.detail, step="AUTH") from None
                step = handshake.token(token)
            elif isinstance(step, Refused):
                raise UpstreamError(
                    _REFUSALS[step.kind](cfg.name), step.detail, failover=step.failover, step=step.step, upstream_reply=step.reply,
                )
            else:
                if login is not None:
                    self._took("auth", auth_started)
                return Connection(protocol, cfg, step.extensions)
            if isinstance(step, NeedToken | Refused) and step.revoked is not None and self._tokens is not None:
                self._tokens.invalidate(step.revoked)


_REFUSALS = {
    "unreachable": Catalogue.upstream_unreachable,
    "tls": Catalogue.upstream_tls_failed,
    "auth": Catalogue.upstream_auth_failed,
}
