"""The client-facing ESMTP server: our own framing and command loop, AUTH through twisted.cred.

Commands are handled one at a time in the order they arrived, each to completion (including the
upstream's answer) before the next line is even parsed: replies keep command order under
PIPELINING (RFC 2920) whatever the upstream's delays, and STARTTLS can drop what followed it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from relayproxy.config import LimitsConfig, ListenerConfig, ServerConfig
from relayproxy.credentials import IRelayUser, RelayUser
from relayproxy.deadline import Deadline
from relayproxy.errors import ProtocolError, UpstreamError
from relayproxy.explain import codes_of, hint, upstream_failure_hint
from relayproxy.logs import EventLog, FirstSeen
from relayproxy.metrics import Metrics, MessageOutcome, NullMetrics
from relayproxy.limits import AuthThrottle, Budgets, ConnectionCounter, utc
from relayproxy.smtp import sasl
from relayproxy.smtp.commands import MAX_COMMAND_LINE, Command, PathCommand, parse_command
from relayproxy.smtp.data import BodyDecoder, BodyFault
from relayproxy.smtp.headers import FromRewriter, HeaderTooLong
from relayproxy.smtp.reply import Catalogue, Reply
from relayproxy.store import StoreUnavailable
from relayproxy.transport import write_now
from relayproxy.upstream import UpstreamConnector, UpstreamSession

log = EventLog("relayproxy.server")

_PAUSE_PIPELINE_AT = 64 * 1024
"""Pipelined bytes we hold while a command waits for the upstream, before we stop reading."""

_FAULT_REPLIES = {
    BodyFault.TOO_BIG: Catalogue.MESSAGE_TOO_BIG,
    BodyFault.HEADER_TOO_BIG: Catalogue.HEADER_TOO_BIG,
    BodyFault.LINE_TOO_LONG: Catalogue.BODY_LINE_TOO_LONG,
    BodyFault.NUL: Catalogue.BODY_NUL,
}
_OUTCOMES: dict[str, MessageOutcome] = {
    "relayed": "relayed", "refused": "refused", "refused by upstream": "refused", "failed": "failed",
}

_CLOSE_GRACE = 5.0
"""Seconds a closing connection may take to say goodbye before it is aborted."""

_INVALID_COMMAND_CODES = frozenset({500, 501, 502, 503, 504, 555})
"""Replies that mean the client sent something it should not have: too many in a row end the session."""


@dataclass(frozen=True)
class ServerSettings:
    """What every session of one listener shares."""

    server: ServerConfig
    listener: ListenerConfig
    limits: LimitsConfig
    portal: Portal
    connectors: dict[str, UpstreamConnector]
    tls_options: Any | None
    clock: IReactorTime = field(repr=False)
    throttle: AuthThrottle = field(repr=False)
    connections: ConnectionCounter = field(repr=False)
    metrics: Metrics = field(default_factory=NullMetrics, repr=False)
    budgets: Budgets | None = field(default=None, repr=False)
    """Per-user sending budgets; None: none enforced."""
    logins: FirstSeen | None = field(default=None, repr=False)
    """Which (user, address) logins were logged lately; None: log every login."""

    @property
    def implicit_tls(self) -> bool:
        return self.listener.tls == "implicit"


@dataclass
class _Envelope:
    sender: str
    started: float
    refused: int = 0
    recipients: int = 0
    attempted: int = 0
    failed: Reply | None = None
    """Set when the upstream failed mid-transaction: later RCPT/DATA get this reply."""


class _LineTooLong(Exception):
    def __init__(self, auth: bool) -> None:
        super().__init__()
        self.auth = auth


class _SessionOver(Exception):
    """The session ends after ``reply`` (421)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@implementer(IPushProducer)
class _ReadGate:
    """Stops reading from the client while any reason holds (busy command, slow upstream)."""

    def __init__(self, protocol: SMTPServerProtocol) -> None:
        self._protocol = protocol
        self._reasons: set[str] = set()

    def hold(self, reason: str) -> None:
        if not self._reasons and self._protocol.transport is not None:
            self._protocol.transport.pauseProducing()  # type: ignore[attr-defined]
        self._reasons.add(reason)

    def release(self, reason: str) -> None:
        if reason in self._reasons:
            self._reasons.discard(reason)
            if not self._reasons and self._protocol.transport is not None:
                self._protocol.transport.resumeProducing()  # type: ignore[attr-defined]

    # IPushProducer, for the upstream transport: back-pressure while the body streams.
    def pauseProducing(self) -> None:
        self.hold("upstream")

    def resumeProducing(self) -> None:
        self.release("upstream")

    def stopProducing(self) -> None:
        self.release("upstream")


class SMTPServerProtocol(Protocol):
    def __init__(self, settings: ServerSettings) -> None:
        self.s = settings
        self._hostname = settings.server.hostname
        self._buffer = b""
        self._skipping = False
        self._skipping_auth = False
        self._busy = False
        self._processing = False
        self._closed = False
        self._line_waiter: defer.Deferred[bytes] | None = None
        self._decoder: BodyDecoder | None = None
        self._rewriter: FromRewriter | None = None
        self._gate = _ReadGate(self)
        self._timer: IDelayedCall | None = None
        """The greeting delay, then the grace a closing connection gets."""
        self._idle_timeout = Deadline(settings.clock, self._timed_out)
        """The client's silence; stopped while we work for it."""
        self._tls = settings.implicit_tls
        self._ehlo = False
        self._said_hello = False
        self._user: RelayUser | None = None
        self._auth_failures = 0
        self._invalid_commands = 0
        self._counted = False
        self._session_timer: IDelayedCall | None = None
        self._envelope: _Envelope | None = None
        self._upstream: UpstreamSession | None = None
        self.peer = "unknown"
        self._greeting_sent = False
        self.session_id = secrets.token_hex(4)
        self._verb = "-"
        self._refused_sender: str | None = None
        self._draining = False
        self._awaiting_verdict = False

    # -- Twisted events -------------------------------------------------------------------------

    def connectionMade(self) -> None:
        if isinstance(self.factory, SMTPServerFactory):
            self.factory.opened(self)
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.peer = getattr(peer, "host", str(peer))
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        if not self.s.connections.open(self.peer):
            log.warn("connection refused", session=self.session_id, client=self.peer, reason="too many connections")
            self.s.metrics.connection_refused("too many connections")
            self._reply(Catalogue.too_many_connections(self._hostname))
            self._close()
            return
        self._counted = True
        self.s.metrics.session_opened()
        self._session_timer = self.s.clock.callLater(self.s.limits.session_timeout, self._timed_out)
        if self.s.limits.greeting_delay > 0:
            # Until the greeting, the client has no business talking (RFC 5321 4.3.1); spambots
            # and scripted attacks usually do.
            self._timer = self.s.clock.callLater(self.s.limits.greeting_delay, self._greet)
        else:
            self._greet()

    def _greet(self) -> None:
        self._greeting_sent = True
        self._reply(Catalogue.greeting(self._hostname))
        self._idle_timeout.start(self.s.limits.command_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        if not self._greeting_sent:
            log.warn("early talker", session=self.session_id, client=self.peer)
            self.s.metrics.connection_refused("early talker")
            self._reply(Catalogue.EARLY_TALKER)
            self._close()
            return
        if self._idle_timeout.running:
            self._idle_timeout.start(self.s.limits.data_timeout if self._decoder else self.s.limits.command_timeout)
        self._buffer += data
        self._process()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # type: ignore[no-untyped-call]
        self._closed = True
        self._cancel_timers()
        if self._session_timer is not None and self._session_timer.active():
            self._session_timer.cancel()
        if self._counted:
            self._counted = False
            self.s.connections.close(self.peer)
            self.s.metrics.session_closed()
        if self._line_waiter is not None:
            waiter, self._line_waiter = self._line_waiter, None
            waiter.errback(ConnectionError("client went away"))
        self._drop_upstream(in_data=self._decoder is not None)
        for connector in self.s.connectors.values():
            connector.departed(self)
        if isinstance(self.factory, SMTPServerFactory):
            self.factory.closed(self)

    # -- framing ------------------------------------------------------------------------------

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            while not self._closed:
                if self._decoder is not None:
                    if not self._buffer:
                        return
                    data, self._buffer = self._buffer, b""
                    self._body_received(data)
                    continue
                if self._busy and self._line_waiter is None:
                    if len(self._buffer) > _PAUSE_PIPELINE_AT:
                        self._gate.hold("pipeline")
                    return
                self._gate.release("pipeline")
                try:
                    line = self._next_line()
                except _LineTooLong as e:
                    # RFC 4954 4: an over-long AUTH line or SASL response has a code of its own.
                    long_auth = e.auth or self._line_waiter is not None
                    self._line_received_error(ProtocolError(Catalogue.AUTH_LINE_TOO_LONG if long_auth else Catalogue.LINE_TOO_LONG))
                    continue
                if line is None:
                    return
                if self._line_waiter is not None:
                    waiter, self._line_waiter = self._line_waiter, None
                    waiter.callback(line)
                else:
                    self._start(self._command(line))
        finally:
            self._processing = False

    def _next_line(self) -> bytes | None:
        """The next CRLF-terminated line, or None until one is complete; bounded memory."""
        limit = MAX_COMMAND_LINE - 2
        end = self._buffer.find(b"\r\n")
        if self._skipping:
            if end < 0:
                # Keep a trailing CR: it may be the first half of the CRLF we are looking for.
                self._buffer = self._buffer[-1:] if self._buffer.endswith(b"\r") else b""
                return None
            self._buffer = self._buffer[end + 2 :]
            self._skipping = False
            raise _LineTooLong(self._skipping_auth)
        if end < 0:
            if len(self._buffer) > limit + 1:
                self._skipping = True
                self._skipping_auth = self._buffer[:5].upper() == b"AUTH "
                self._buffer = self._buffer[-1:] if self._buffer.endswith(b"\r") else b""
            return None
        if end > limit:
            auth = self._buffer[:5].upper() == b"AUTH "
            self._buffer = self._buffer[end + 2 :]
            raise _LineTooLong(auth)
        line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
        return line

    def _line_received_error(self, error: ProtocolError) -> None:
        if self._line_waiter is not None:
            waiter, self._line_waiter = self._line_waiter, None
            waiter.errback(error)
        else:
            self._reply(error.reply)
            self._count_invalid(error.reply)

    def _count_invalid(self, reply: Reply) -> None:
        if reply.code not in _INVALID_COMMAND_CODES:
            return
        self._invalid_commands += 1
        if self._invalid_commands >= self.s.limits.max_invalid_commands:
            log.warn("too many invalid commands", session=self.session_id, client=self.peer, user=self._username)
            self._reply(Catalogue.TOO_MANY_ERRORS)
            self._drop_upstream(in_data=False)
            self._close()

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        # The client's idle timer stops while we work (or wait for the upstream) on its behalf.
        self._busy = True
        self._idle_timeout.stop()
        _run_now(self._guarded(work), self._resume)

    def _resume(self) -> None:
        self._busy = False
        if self._closed:
            return
        if self._draining and self._idle:
            self._shut_down()
            return
        self._idle_timeout.start(self.s.limits.data_timeout if self._decoder else self.s.limits.command_timeout)
        self._process()

    # -- graceful shutdown --------------------------------------------------------------------

    @property
    def _idle(self) -> bool:
        return not self._busy and self._decoder is None and self._envelope is None

    def drain(self) -> None:
        """Shutting down: close now if idle, else after the transaction in progress."""
        self._draining = True
        if self._idle and not self._closed:
            self._shut_down()

    def force_close(self) -> None:
        """The grace period is over. A session waiting for the upstream's verdict on a complete
        message still gets it: cutting it would report a failure for mail that may be delivered."""
        if not self._closed and not self._awaiting_verdict:
            self._shut_down()

    def _shut_down(self) -> None:
        self._reply(Catalogue.shutting_down(self._hostname))
        self._drop_upstream(in_data=self._decoder is not None)
        self._close()

    async def _guarded(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
            self._invalid_commands = 0
        except ProtocolError as e:
            self._reply(e.reply)
            self._log_refusal(e.reply)
            self._count_invalid(e.reply)
        except UpstreamError as e:
            self._log_upstream_failure(e)
            self._upstream_failed()
            self._reply(e.reply)
        except _SessionOver as e:
            self._reply(e.reply)
            self._drop_upstream(in_data=False)
            self._close()
        except ConnectionError:
            pass
        except Exception:
            log.failure("internal error", session=self.session_id, client=self.peer, user=self._username)
            self._reply(Catalogue.local_error(self._hostname))
            self._drop_upstream(in_data=self._decoder is not None)
            self._close()

    async def _read_line(self) -> bytes:
        waiter: defer.Deferred[bytes] = defer.Deferred()
        self._line_waiter = waiter
        self._idle_timeout.start(self.s.limits.command_timeout)
        try:
            return await waiter
        finally:
            self._idle_timeout.stop()

    # -- output and lifetime ------------------------------------------------------------------

    @property
    def _username(self) -> str:
        return self._user.name if self._user else "-"

    def _reply(self, reply: Reply) -> None:
        if not self._closed:
            write_now(self.transport, reply.to_bytes())

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._cancel_timers()
            self.transport.loseConnection()  # type: ignore[union-attr]
            # Over TLS, loseConnection waits for the client's close_notify; a client that never
            # reads again would hold the session (and a graceful shutdown) open.
            self._timer = self.s.clock.callLater(_CLOSE_GRACE, self.transport.abortConnection)  # type: ignore[union-attr]

    def _cancel_timers(self) -> None:
        self._idle_timeout.cancel()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        situation = "data-timeout" if self._decoder is not None else "command-timeout"
        log.info(
            "timeout", session=self.session_id, client=self.peer, user=self._username, situation=situation,
            hint=hint(421, "4.4.2", side="client", command="DATA" if self._decoder else "any", situation=situation),
        )
        self._reply(Catalogue.timeout(self._hostname))
        self._drop_upstream(in_data=self._decoder is not None)
        self._close()

    def _drop_upstream(self, in_data: bool) -> None:
        upstream, self._upstream = self._upstream, None
        if upstream is None:
            return
        if in_data or upstream.in_transaction:
            # Closing without the final dot is the only way to be sure a partial body is never delivered.
            upstream.abort()
        else:
            upstream.connector.release(upstream)

    def _upstream_failed(self) -> None:
        if self._upstream is not None and not self._upstream.usable:
            self._upstream = None
        if self._envelope is not None:
            self._envelope.failed = Catalogue.UPSTREAM_LOST

    # -- commands -----------------------------------------------------------------------------

    async def _command(self, line: bytes) -> None:
        self._verb = line.split(b" ", 1)[0][:16].upper().decode("ascii", "replace")
        # Open-relay probes (source routes, bang paths, user@a@b) learn nothing but "log in first":
        # the address is not even parsed for a client that has not authenticated.
        if self._user is None and line.split(b" ", 1)[0].upper() in (b"MAIL", b"RCPT") and b"\r" not in line and b"\n" not in line:
            raise ProtocolError(Catalogue.AUTH_REQUIRED)
        command = parse_command(line)
        handler = getattr(self, f"_smtp_{command.verb}", None)
        if handler is None:
            raise ProtocolError(Catalogue.UNRECOGNIZED)
        await handler(command)

    async def _smtp_EHLO(self, command: Command) -> None:
        if not command.argument:
            raise ProtocolError(Catalogue.SYNTAX)
        await self._reset_transaction()
        self._ehlo = True
        self._said_hello = True
        extensions: tuple[str, ...] = ("PIPELINING", f"SIZE {self.s.server.max_message_size}", "8BITMIME", "ENHANCEDSTATUSCODES")
        if self.s.listener.tls == "starttls" and not self._tls:
            extensions += ("STARTTLS",)
        if self._auth_allowed and self._user is None:
            extensions += ("AUTH " + " ".join(sasl.MECHANISMS),)
        self._reply(Catalogue.ehlo(self._hostname, extensions))

    async def _smtp_HELO(self, command: Command) -> None:
        if not command.argument:
            raise ProtocolError(Catalogue.SYNTAX)
        await self._reset_transaction()
        self._ehlo = False
        self._said_hello = True
        self._reply(Catalogue.helo(self._hostname))

    async def _smtp_NOOP(self, command: Command) -> None:
        self._reply(Catalogue.OK)

    async def _smtp_HELP(self, command: Command) -> None:
        self._reply(Catalogue.HELP)

    async def _smtp_VRFY(self, command: Command) -> None:
        self._reply(Catalogue.VRFY)

    async def _smtp_EXPN(self, command: Command) -> None:
        self._reply(Catalogue.NOT_IMPLEMENTED)

    async def _smtp_RSET(self, command: Command) -> None:
        if command.argument:
            raise ProtocolError(Catalogue.SYNTAX)
        await self._reset_transaction()
        self._reply(Catalogue.RESET)

    async def _smtp_QUIT(self, command: Command) -> None:
        self._reply(Catalogue.closing(self._hostname))
        self._drop_upstream(in_data=False)
        self._close()

    async def _smtp_STARTTLS(self, command: Command) -> None:
        if command.argument:
            raise ProtocolError(Catalogue.SYNTAX)
        if self._tls:
            raise ProtocolError(Catalogue.TLS_ACTIVE)
        if self.s.listener.tls != "starttls" or self.s.tls_options is None:
            raise ProtocolError(Catalogue.TLS_UNAVAILABLE)
        # RFC 3207 4.2 / CVE-2011-0411: whatever followed STARTTLS came in plaintext and is dropped,
        # and everything learnt before TLS is forgotten.
        self._buffer = b""
        self._reply(Catalogue.READY_TLS)
        self.transport.startTLS(self.s.tls_options)  # type: ignore[union-attr]
        self._tls = True
        self._ehlo = False
        self._said_hello = False
        self._user = None
        self._envelope = None
        self._drop_upstream(in_data=False)

    @property
    def _auth_allowed(self) -> bool:
        return self._tls or self.s.listener.allow_plaintext_auth or self.s.listener.tls == "none"

    async def _smtp_AUTH(self, command: Command) -> None:
        if not self._said_hello:
            raise ProtocolError(Catalogue.EHLO_FIRST)
        if self._user is not None:
            raise ProtocolError(Catalogue.ALREADY_AUTHENTICATED)
        if self._envelope is not None:
            raise ProtocolError(Catalogue.BAD_SEQUENCE)
        if not self._auth_allowed:
            raise ProtocolError(Catalogue.AUTH_ENCRYPTION_REQUIRED)
        mechanism, _, initial = command.argument.partition(" ")
        mechanism = mechanism.upper()
        if not mechanism:
            raise ProtocolError(Catalogue.AUTH_NO_MECHANISM)
        if mechanism not in sasl.MECHANISMS:
            raise ProtocolError(Catalogue.AUTH_UNKNOWN_MECHANISM)
        await self._check_throttle(None)
        if mechanism == "PLAIN":
            if not initial:
                self._reply(Reply(334, ("",)))
                initial = (await self._read_line()).decode("ascii", "replace")
            credentials = sasl.parse_plain(sasl.decode_response(initial))
        else:
            if not initial:
                self._reply(Reply(334, (sasl.USERNAME_CHALLENGE,)))
                initial = (await self._read_line()).decode("ascii", "replace")
            username = sasl.parse_login_field(sasl.decode_response(initial))
            self._reply(Reply(334, (sasl.PASSWORD_CHALLENGE,)))
            password = (await self._read_line()).decode("ascii", "replace")
            credentials = sasl.Credentials(username, sasl.parse_login_field(sasl.decode_response(password)))
        await self._check_throttle(credentials.username)
        if credentials.authzid and credentials.authzid != credentials.username:
            # RFC 4616 lets a client act for another identity; we never allow that, and answer
            # as for a wrong password so a guesser cannot tell which part was wrong.
            await self._auth_failed(credentials.username, "authzid of another user")
        await self._login(credentials)

    async def _check_throttle(self, username: str | None) -> None:
        # Refused before bcrypt runs: a guesser must not cost us a thread per attempt.
        try:
            wait = await self.s.throttle.blocked_for(self.peer, username)
        except StoreUnavailable as e:
            # Fail safe: without the shared counts no password is checked.
            self._store_unavailable(e, "AUTH")
            self.s.metrics.auth("error")
            raise ProtocolError(Catalogue.AUTH_TEMPORARY) from None
        if wait > 0:
            self.s.metrics.auth("throttled")
            log.warn("auth throttled", client=self.peer, user=username or "-", seconds=round(wait), session=self.session_id)
            raise ProtocolError(Catalogue.AUTH_TEMPORARY)

    async def _login(self, credentials: sasl.Credentials) -> None:
        try:
            _, avatar, _ = await self.s.portal.login(
                UsernamePassword(credentials.username.encode(), credentials.password.encode()), None, IRelayUser
            )
        except UnauthorizedLogin:
            await self._auth_failed(credentials.username, "bad credentials")
        except Exception:
            log.failure("authentication backend failed", session=self.session_id, client=self.peer)
            self.s.metrics.auth("error")
            raise ProtocolError(Catalogue.AUTH_TEMPORARY) from None
        assert isinstance(avatar, RelayUser)
        self._user = avatar
        self.s.throttle.succeeded(self.peer, credentials.username)
        self.s.metrics.auth("ok")
        if self.s.logins is None or self.s.logins.first((credentials.username, self.peer)):
            log.info("auth ok", client=self.peer, user=credentials.username, session=self.session_id)
        self._reply(Catalogue.AUTH_OK)

    async def _auth_failed(self, username: str, reason: str) -> None:
        """Count and log a failure, then raise the client's reply."""
        self._auth_failures += 1
        try:
            await self.s.throttle.failed(self.peer, username)
        except StoreUnavailable as e:
            # The next AUTH finds the store unavailable too and gets 454 without a password check.
            self._store_unavailable(e, "AUTH")
        self.s.metrics.auth("failed")
        # One line per failure, stable for fail2ban: the client address comes first.
        log.warn(
            "auth failed", client=self.peer, user=username, reason=reason, session=self.session_id,
            hint=hint(535, "5.7.8", side="client", command="AUTH", user=username),
        )
        if self._auth_failures >= self.s.limits.max_auth_failures_per_session:
            self._reply(Catalogue.AUTH_INVALID)
            raise _SessionOver(Catalogue.TOO_MANY_AUTH_FAILURES)
        raise ProtocolError(Catalogue.AUTH_INVALID)

    async def _smtp_MAIL(self, command: PathCommand) -> None:
        if self._user is None:
            raise ProtocolError(Catalogue.AUTH_REQUIRED)
        if not self._said_hello:
            raise ProtocolError(Catalogue.EHLO_FIRST)
        if self._envelope is not None:
            raise ProtocolError(Catalogue.NESTED_MAIL)
        upstream_params = self._mail_parameters(command)
        if not self._user.config.may_send(command.address):
            self._refused_sender = command.address
            raise ProtocolError(Catalogue.sender_not_owned(self._user.name))
        await self._check_budget(None)
        upstream = await self._upstream_session()
        kept = upstream.used
        try:
            reply = await upstream.mail(_mail_line(upstream, command.address, upstream_params(upstream)))
            stale = kept and reply.code == 421
        except UpstreamError as e:
            if not kept:
                raise
            stale = True
            log.info("kept upstream session failed, reconnecting", session=self.session_id, detail=e.detail)
        if stale:
            # A session that already carried mail may have been closed by the upstream while idle,
            # or hit its messages-per-connection limit (421); MAIL changed nothing there, so one
            # retry on a fresh session is safe.
            upstream.abort()
            self._upstream = None
            upstream = await self.s.connectors[self._user.upstream.name].open()
            self._upstream = upstream
            reply = await upstream.mail(_mail_line(upstream, command.address, upstream_params(upstream)))
        if reply.is_positive:
            self._envelope = _Envelope(command.address, self.s.clock.seconds())
            upstream.in_transaction = True
        self._reply(reply)

    async def _check_budget(self, accepted: int | None) -> None:
        """At MAIL (``accepted`` None) or RCPT (after ``accepted`` recipients): raise 451 past the user's budget."""
        budgets, user = self.s.budgets, self._user
        if budgets is None or user is None or not budgets.limited(user.config):
            return
        try:
            if accepted is None:
                until = await budgets.mail_refused_until(user.config)
            else:
                until = await budgets.rcpt_refused_until(user.config, accepted)
        except StoreUnavailable as e:
            self._store_unavailable(e, self._verb)
            raise ProtocolError(Catalogue.LIMIT_STORE_UNAVAILABLE) from None
        if until is not None:
            raise ProtocolError(Catalogue.sending_limit(user.name, utc(until)))

    async def _count_sent(self, recipients: int) -> None:
        budgets, user = self.s.budgets, self._user
        if budgets is None or user is None or not budgets.limited(user.config):
            return
        try:
            await budgets.record(user.config, recipients)
        except StoreUnavailable as e:
            # The message is the upstream's now: its 250 stands, uncounted.
            self._store_unavailable(e, "end-of-data")

    def _store_unavailable(self, error: StoreUnavailable, command: str) -> None:
        log.error(
            "limit store unavailable", store=error.store, detail=error.detail, command=command,
            session=self.session_id, client=self.peer, user=self._username,
        )

    def _mail_parameters(self, command: PathCommand) -> Any:
        """Check the client's MAIL parameters now; return how to phrase them for a given upstream."""
        size = command.parameter("SIZE")
        if command.has("SIZE"):
            if size is None or not size.isdigit():
                raise ProtocolError(Catalogue.BAD_SIZE)
            if int(size) > self.s.server.max_message_size:
                raise ProtocolError(Catalogue.MESSAGE_TOO_BIG)
        body = command.parameter("BODY")
        if command.has("BODY") and (body or "").upper() not in ("7BIT", "8BITMIME"):
            raise ProtocolError(Catalogue.BAD_BODY)
        # AUTH= names the client's identity to the next hop; the upstream must only ever see ours.
        unknown = [k for k, _ in command.parameters if k not in ("SIZE", "BODY", "AUTH")]
        if unknown:
            raise ProtocolError(Catalogue.BAD_PARAMETERS)

        def render(upstream: UpstreamSession) -> str:
            out = ""
            if size is not None and upstream.supports("SIZE"):
                out += f" SIZE={size}"
            if body is not None and body.upper() == "8BITMIME":
                if not upstream.supports("8BITMIME"):
                    raise ProtocolError(Catalogue.UPSTREAM_NO_8BIT)
                out += " BODY=8BITMIME"
            return out

        return render

    async def _upstream_session(self) -> UpstreamSession:
        assert self._user is not None
        if self._upstream is not None and self._upstream.usable:
            return self._upstream
        self._upstream = None
        self._upstream = await self.s.connectors[self._user.upstream.name].acquire(self)
        return self._upstream

    def _open_envelope(self) -> _Envelope:
        """The transaction RCPT and DATA belong to, or the reply that says why there is none."""
        if self._user is None:
            raise ProtocolError(Catalogue.AUTH_REQUIRED)
        envelope = self._envelope
        if envelope is None:
            raise ProtocolError(Catalogue.MAIL_FIRST)
        if envelope.failed is not None:
            raise ProtocolError(envelope.failed)
        return envelope

    async def _smtp_RCPT(self, command: PathCommand) -> None:
        envelope = self._open_envelope()
        if command.parameters:
            raise ProtocolError(Catalogue.BAD_PARAMETERS)
        if envelope.recipients >= self.s.server.max_recipients:
            raise ProtocolError(Catalogue.TOO_MANY_RECIPIENTS)
        await self._check_budget(envelope.recipients)
        assert self._upstream is not None
        envelope.attempted += 1
        reply = await self._upstream.command(f"RCPT TO:<{command.address}>".encode("ascii"))
        if reply.is_positive:
            envelope.recipients += 1
        else:
            envelope.refused += 1
        self._reply(reply)

    async def _smtp_DATA(self, command: Command) -> None:
        envelope = self._open_envelope()
        if command.argument:
            raise ProtocolError(Catalogue.SYNTAX)
        if envelope.attempted == 0:
            raise ProtocolError(Catalogue.RCPT_FIRST)
        if envelope.recipients == 0:
            raise ProtocolError(Catalogue.NO_VALID_RECIPIENTS)
        upstream = self._upstream
        assert upstream is not None
        reply = await upstream.command(b"DATA")
        if reply.code != 354:
            self._reply(reply)
            return
        self._decoder = BodyDecoder(self.s.server.max_message_size)
        if upstream.config.header_from is not None:
            self._rewriter = FromRewriter(upstream.config.header_from, self.s.limits.max_header_size)
        upstream.register_producer(self._gate)
        self._reply(reply)

    def _body_received(self, data: bytes) -> None:
        decoder, upstream = self._decoder, self._upstream
        assert decoder is not None
        chunk = decoder.feed(data)
        out = chunk.data
        if self._rewriter is not None and decoder.fault is None:
            try:
                out = self._rewriter.feed(out) + (self._rewriter.finish() if chunk.done else b"")
            except HeaderTooLong:
                decoder.refuse(BodyFault.HEADER_TOO_BIG)
        if upstream is not None and upstream.usable and decoder.fault is not None:
            # Stop the partial body here: the upstream never sees an end of data for it.
            upstream.abort()
        if not chunk.done:
            if out and upstream is not None and upstream.usable:
                upstream.send_body(out)
            return
        self._decoder = None
        self._rewriter = None
        self._gate.release("upstream")
        self._buffer = chunk.rest + self._buffer
        self._start(self._end_of_data(out, decoder))

    async def _end_of_data(self, last: bytes, decoder: BodyDecoder) -> None:
        upstream, envelope = self._upstream, self._envelope
        self._envelope = None
        fault = decoder.fault
        if fault is not None:
            self._upstream = None
            self._log_message(envelope, decoder, _FAULT_REPLIES[fault], "refused", reason=fault.value)
            raise ProtocolError(_FAULT_REPLIES[fault])
        if upstream is None or not upstream.usable:
            self._upstream = None
            self._log_message(envelope, decoder, Catalogue.UPSTREAM_LOST, "failed")
            raise ProtocolError(Catalogue.UPSTREAM_LOST)
        upstream.in_transaction = False
        self._awaiting_verdict = True
        handed_over = self.s.clock.seconds()
        try:
            reply = await upstream.end_data(last)
            self.s.metrics.upstream_latency(upstream.config.name, "end_of_data", self.s.clock.seconds() - handed_over)
            if reply.is_positive and envelope is not None:
                # Counted before the client hears 250, so its next MAIL on any instance sees this
                # message; still under _awaiting_verdict, so a shutdown cannot swallow the 250.
                await self._count_sent(envelope.recipients)
        except UpstreamError as e:
            self._log_message(envelope, decoder, e.reply, "failed")
            raise
        finally:
            self._awaiting_verdict = False
        # Back to the pool at the verdict, not at QUIT: the session waits there for this client's
        # next message, and another client needing one meanwhile takes it instead of opening a
        # new connection to the provider.
        self._drop_upstream(in_data=False)
        self._log_message(envelope, decoder, reply, "relayed" if reply.is_positive else "refused by upstream")
        self._reply(reply)

    def _log_message(self, envelope: _Envelope | None, decoder: BodyDecoder, reply: Reply, outcome: str, **extra: object) -> None:
        """The one line per transaction: who sent what where, and what became of it."""
        fields: dict[str, object] = {
            "session": self.session_id, "client": self.peer, "user": self._username,
            "upstream": self._user.upstream.name if self._user else "-",
            "from": f"<{envelope.sender}>" if envelope else "-",
            "rcpts": envelope.recipients if envelope else 0, "refused": envelope.refused if envelope else 0,
            "size": decoder.size, "outcome": outcome, "reply": str(reply),
            "duration": round(self.s.clock.seconds() - envelope.started, 3) if envelope else 0,
            **extra,
        }
        if not reply.is_positive:
            code, enhanced = codes_of(reply)
            fields["hint"] = hint(code, enhanced, side="upstream" if outcome == "refused by upstream" else "client", command="end-of-data")
        log.info("message", **fields)
        self.s.metrics.message(self._username, str(fields["upstream"]), _OUTCOMES[outcome], decoder.size)

    def _log_refusal(self, reply: Reply) -> None:
        if reply.code == 535 or self._verb == "AUTH" and reply.code == 454:
            return  # logged as "auth failed" / "auth throttled", the lines fail2ban reads
        sender, self._refused_sender = self._refused_sender, None
        log.info(
            "refused", session=self.session_id, client=self.peer, user=self._username, command=self._verb,
            reply=str(reply),
            hint=hint(
                reply.code, reply.enhanced, side="client", command=self._verb,
                sender=sender, user=self._username,
                allowed_senders=self._user.config.allowed_senders if self._user else (),
            ),
        )

    def _log_upstream_failure(self, error: UpstreamError) -> None:
        upstream = self._user.upstream if self._user else None
        log.warn(
            "upstream failure", session=self.session_id, client=self.peer, user=self._username,
            upstream=upstream.name if upstream else "-", step=error.step, detail=error.detail,
            hint=upstream_failure_hint(error, upstream.name if upstream else "-", upstream.host if upstream else None),
        )

    async def _reset_transaction(self) -> None:
        self._envelope = None
        upstream = self._upstream
        if upstream is not None and upstream.usable and upstream.in_transaction:
            reply = await upstream.command(b"RSET")
            upstream.in_transaction = False
            if not reply.is_positive:
                upstream.close()
                self._upstream = None


def _run_now(coroutine: Coroutine[defer.Deferred[Any], Any, None], done: Callable[[], None]) -> None:
    """Run a coroutine that awaits only Deferreds as far as it gets in this reactor turn, the rest as
    each Deferred fires; call ``done`` once it has returned.

    Most commands never wait (EHLO, QUIT, AUTH answered from the cache, refusals) and the others
    wait once per upstream reply; Deferred.fromCoroutine would add a Deferred, a context copy and
    a chain of callbacks to each. Awaiting a Deferred yields it, and resuming the coroutine after
    it fired delivers its result (a failure is thrown in), so one callback per wait suffices.
    """

    def step(result: object = None) -> None:
        try:
            if isinstance(result, Failure):
                awaited = result.throwExceptionIntoGenerator(coroutine)  # type: ignore[no-untyped-call]
            else:
                awaited = coroutine.send(result)
        except StopIteration:
            done()
            return
        awaited.addBoth(step)

    step()


def _mail_line(upstream: UpstreamSession, address: str, parameters: str) -> bytes:
    # envelope_from: the provider accepts only its account's address as the envelope sender.
    sender = upstream.config.envelope_from or address
    return f"MAIL FROM:<{sender}>{parameters}".encode("ascii")


class SMTPServerFactory(Factory):
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.sessions: set[SMTPServerProtocol] = set()
        self._emptied: list[defer.Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> SMTPServerProtocol:
        protocol = SMTPServerProtocol(self.settings)
        protocol.factory = self
        return protocol

    def opened(self, session: SMTPServerProtocol) -> None:
        self.sessions.add(session)

    def closed(self, session: SMTPServerProtocol) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            waiters, self._emptied = self._emptied, []
            for waiter in waiters:
                waiter.callback(None)

    def when_empty(self) -> defer.Deferred[None]:
        if not self.sessions:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._emptied.append(waiter)
        return waiter
