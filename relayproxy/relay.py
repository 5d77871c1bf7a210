"""One client connection's relay: carries out what its ServerSession asks for.

The session machine decides the protocol; this module answers its questions with the world's
facts (the cred portal, the AUTH throttles, allowed senders and budgets, the user's upstream) and
keeps the records (log lines, metrics). The Twisted protocol in relayproxy.server only moves bytes
and runs the timers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from relayproxy.config import LimitsConfig, ListenerConfig, ServerConfig
from relayproxy.config.sections import Network, client_ip, in_networks
from relayproxy.credentials import IRelayUser, RelayUser, name_digest
from relayproxy.errors import UpstreamError
from relayproxy.explain import hint
from relayproxy.limits import AuthThrottle, Budgets, ConnectionCounter, utc
from relayproxy.logs import EventLog, FirstSeen
from relayproxy.records import Records, Transaction
from relayproxy.metrics import Metrics, NullMetrics
from relayproxy.smtp import sasl
from relayproxy.smtp.data import BodyFault
from relayproxy.smtp.envelope import Data, Mail, Rcpt
from relayproxy.smtp.headers import HeaderFilter
from relayproxy.smtp.reply import Catalogue, Reply
from relayproxy.smtp.session import (
    Abandon, AbortBody, Action, Answer, Ask, Body, CheckMail, CheckRcpt, CheckThrottle, Close, EndOfData,
    Forward, Forwarded, Login, Logout, Send, ServerSession, SessionSettings, StartTLS, State, ASKS,
)
from relayproxy.spool.intake import IntakeSession, Origin, Spooler
from relayproxy.store import StoreUnavailable
from relayproxy.upstream.interface import Upstream, UpstreamSession

log = EventLog("relayproxy.server")

_FAULT_REPLIES = {
    BodyFault.TOO_BIG: Catalogue.MESSAGE_TOO_BIG,
    BodyFault.HEADER_TOO_BIG: Catalogue.HEADER_TOO_BIG,
    BodyFault.LINE_TOO_LONG: Catalogue.BODY_LINE_TOO_LONG,
    BodyFault.NUL: Catalogue.BODY_NUL,
}


def _outcome(upstream: UpstreamSession, reply: Reply) -> tuple[str, dict[str, object]]:
    """The log's outcome of a message the upstream (or the spool, naming its id) gave its verdict on."""
    if isinstance(upstream, IntakeSession) and upstream.spooled is not None:
        return "spooled", {"id": upstream.spooled}
    return ("relayed" if reply.is_positive else "refused by upstream"), {}


@dataclass(frozen=True)
class ServerSettings:
    """What every session of one listener shares."""

    server: ServerConfig
    listener: ListenerConfig
    limits: LimitsConfig
    portal: Portal
    upstreams: dict[str, Upstream]
    tls_options: Any | None
    clock: IReactorTime = field(repr=False)
    throttle: AuthThrottle = field(repr=False)
    connections: ConnectionCounter = field(repr=False)
    metrics: Metrics = field(default_factory=NullMetrics, repr=False)
    budgets: Budgets | None = field(default=None, repr=False)
    """Per-user sending budgets; None: none enforced."""
    logins: FirstSeen | None = field(default=None, repr=False)
    """Which (user, address) logins were logged lately; None: log every login."""
    known_user: Callable[[str], bool] | None = field(default=None, repr=False)
    """Whether a name is in the users file; None: every name is logged as typed."""
    devices: tuple[tuple[Network, RelayUser], ...] = field(default=(), repr=False)
    """The users' devices networks, each with its user; empty unless the listener has allow_ip_login."""
    spooler: Spooler | None = field(default=None, repr=False)
    """Takes the mail of users whose delivery is "spool" or "relay-then-spool"; None: no user's is."""

    def upstream_of(self, user: RelayUser, peer: str, session_id: str) -> Upstream:
        """Where the user's transactions go: the user's upstream, or the spool in front of it."""
        upstream = self.upstreams[user.upstream.name]
        if self.spooler is None:
            return upstream
        return self.spooler.upstream_for(user.config, upstream, Origin(user.name, user.upstream.name, peer, session_id))

    @property
    def implicit_tls(self) -> bool:
        return self.listener.tls == "implicit"

    def session(self) -> SessionSettings:
        listener = self.listener
        return SessionSettings(
            hostname=self.server.hostname,
            starttls=listener.tls == "starttls",
            tls_available=self.tls_options is not None,
            implicit_tls=self.implicit_tls,
            plaintext_auth=listener.allow_plaintext_auth or listener.tls == "none",
            max_message_size=self.server.max_message_size,
            max_recipients=self.server.max_recipients,
            max_invalid_commands=self.limits.max_invalid_commands,
            max_auth_failures=self.limits.max_auth_failures_per_session,
        )


class ClientIO(Protocol):
    """What the relay needs of the connection it serves."""

    gate: Any
    """An IPushProducer that pauses reading from the client (back-pressure while the upstream is slow)."""

    def write(self, data: bytes) -> None: ...

    def start_tls(self) -> None: ...

    def close(self) -> None: ...

    def settle(self) -> None:
        """The machine has done what it can for now: timers and reading follow its state."""



class Relay:
    def __init__(self, settings: ServerSettings, io: ClientIO, peer: str, session_id: str) -> None:
        self.s = settings
        self.io = io
        self.peer = peer
        self.session_id = session_id
        self.records = Records(session_id, peer, settings.clock, settings.metrics, lambda: self._user)
        self._device = self._device_user(peer)
        """The user this client's address is (allow_ip_login); an identity TLS does not change."""
        self.machine = ServerSession(settings.session(), identified=self._device is not None)
        self._actions: deque[Action] = deque()
        self._running = False
        self._user: RelayUser | None = self._device
        self._upstream: UpstreamSession | None = None
        self._transaction: Transaction | None = None
        self._filter: HeaderFilter | None = None
        self._in_body = False
        self._awaiting_verdict = False
        self._busy = False
        """A question of the machine's is being answered."""
        self._gone = False

    # -- what the connection tells us ---------------------------------------------------------

    def greet(self) -> None:
        self._perform(self.machine.greet())

    def received(self, data: bytes) -> None:
        if self.machine.state is State.GREETING:
            log.warn("early talker", session=self.session_id, client=self.peer)
            self.s.metrics.connection_refused("early talker")
        self._perform(self.machine.receive(data))

    def end_with(self, reply: Reply) -> None:
        """Close the session with ``reply`` (a timeout, a shutdown)."""
        self._perform(self.machine.close_with(reply))

    @property
    def awaiting_verdict(self) -> bool:
        """A complete message is with the upstream: cutting the session now would report a
        failure for mail that may be delivered."""
        return self._awaiting_verdict

    @property
    def user(self) -> RelayUser | None:
        return self._user

    @property
    def username(self) -> str:
        return self._user.name if self._user else "-"

    def lost(self) -> None:
        """The client's connection is gone."""
        self.machine.disconnected()
        self._finish()

    # -- carrying out actions -----------------------------------------------------------------

    def _perform(self, actions: list[Action]) -> None:
        self._actions.extend(actions)
        if self._running:
            return
        self._running = True
        try:
            while self._actions:
                self._do(self._actions.popleft())
        finally:
            self._running = False
        self.io.settle()

    def _answer(self, result: Answer) -> None:
        self._busy = False
        if self._gone:
            self._leave()
            return
        self._perform(self.machine.answer(result))

    def _do(self, action: Action) -> None:
        if type(action) is Send:
            if action.refused is not None:
                self.records.refusal(action.reply, action.refused)
            elif action.reply is Catalogue.TOO_MANY_ERRORS:
                log.warn("too many invalid commands", session=self.session_id, client=self.peer, user=self.username)
            self.io.write(action.reply.to_bytes())
        elif type(action) in ASKS:
            self._ask(action)  # type: ignore[arg-type]
        elif isinstance(action, Body):
            self._body(action.data)
        elif isinstance(action, AbortBody):
            if self._upstream is not None:
                self._upstream.abort()
        elif isinstance(action, StartTLS):
            self.io.start_tls()
        elif isinstance(action, Close):
            self._finish()
            self.io.close()
        elif isinstance(action, Abandon):
            self._transaction = None
            self._release_upstream()
        elif isinstance(action, Logout):
            # Everything learnt before TLS is forgotten, the upstream session kept for this client too;
            # a device's identity came from its address, not from the plaintext.
            self._user = self._device
            for upstream in self.s.upstreams.values():
                upstream.departed(self)

    def _ask(self, ask: Ask) -> None:
        work: Coroutine[defer.Deferred[Any], Any, Answer]
        if isinstance(ask, CheckMail | CheckRcpt):
            # Most questions have their answer here: only a budget needs the (perhaps shared) store.
            refusal = self._sender_refusal(ask.mail.sender) if isinstance(ask, CheckMail) else None
            if refusal is not None or not self._budgeted:
                self._answer(refusal)
                return
            work = self._check_budget(ask.recipients if isinstance(ask, CheckRcpt) else None, "RCPT" if isinstance(ask, CheckRcpt) else "MAIL")
        elif isinstance(ask, CheckThrottle):
            work = self._check_throttle(ask.username)
        elif isinstance(ask, Login):
            work = self._login(ask.credentials)
        elif isinstance(ask, Forward):
            work = self._forward(ask)
        else:
            work = self._end_of_data(ask)
        self._busy = True
        defer.Deferred.fromCoroutine(work).addCallbacks(self._answer, self._crashed)

    def _crashed(self, failure: Failure) -> None:
        log.failure("internal error", failure, session=self.session_id, client=self.peer, user=self.username)
        self._perform(self.machine.close_with(Catalogue.local_error(self.s.server.hostname)))
        self._answer(None)

    def _finish(self) -> None:
        if self._gone:
            return
        self._gone = True
        if not self._busy:
            self._leave()

    def _leave(self) -> None:
        """The client is gone and nothing is in flight for it."""
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            if self._in_body:
                # Closing without the final dot is the only way to be sure a partial body is never delivered.
                upstream.abort()
            else:
                upstream.release()
        for each in self.s.upstreams.values():
            each.departed(self)

    def _release_upstream(self) -> None:
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream.release()

    # -- AUTH ---------------------------------------------------------------------------------

    def _device_user(self, peer: str) -> RelayUser | None:
        ip = client_ip(peer) if self.s.devices else None
        if ip is None:
            return None
        # load_config refused overlapping devices networks of two users: at most one user matches.
        user = next((user for network, user in self.s.devices if ip in network), None)
        if user is not None and (self.s.logins is None or self.s.logins.first((user.name, peer))):
            log.info("device ok", client=peer, user=user.name, session=self.session_id)
        return user

    async def _check_throttle(self, username: str | None) -> Reply | None:
        # Refused before bcrypt runs: a guesser must not cost us a thread per attempt.
        try:
            wait = await self.s.throttle.blocked_for(self.peer, username)
        except StoreUnavailable as e:
            # Fail safe: without the shared counts no password is checked.
            self.records.store_unavailable(e, "AUTH")
            self.s.metrics.auth("error")
            return Catalogue.AUTH_TEMPORARY
        if wait > 0:
            self.s.metrics.auth("throttled")
            shown = self._shown(username) if username is not None else "-"
            log.warn("auth throttled", client=self.peer, user=shown, seconds=round(wait), session=self.session_id)
            return Catalogue.AUTH_TEMPORARY
        return None

    async def _login(self, credentials: sasl.Credentials) -> Reply:
        if credentials.authzid and credentials.authzid != credentials.username:
            # RFC 4616 lets a client act for another identity; we never allow that, and answer
            # as for a wrong password so a guesser cannot tell which part was wrong.
            return await self._auth_failed(credentials.username, "authzid of another user")
        try:
            _, avatar, _ = await self.s.portal.login(
                UsernamePassword(credentials.username.encode(), credentials.password.encode()), None, IRelayUser
            )
        except UnauthorizedLogin:
            return await self._auth_failed(credentials.username, "bad credentials")
        except Exception:
            log.failure("authentication backend failed", session=self.session_id, client=self.peer)
            self.s.metrics.auth("error")
            return Catalogue.AUTH_TEMPORARY
        assert isinstance(avatar, RelayUser)
        networks = avatar.config.allowed_networks
        if networks and not in_networks(self.peer, networks):
            # After the password check, with the reply of a wrong one: a guesser elsewhere learns
            # nothing about the password, nor that the rule exists.
            rule = f"client not in allowed_networks of [users.{avatar.name}]"
            return await self._auth_failed(credentials.username, rule)
        self._user = avatar
        self.s.throttle.succeeded(self.peer, credentials.username)
        self.s.metrics.auth("ok")
        if self.s.logins is None or self.s.logins.first((credentials.username, self.peer)):
            log.info("auth ok", client=self.peer, user=credentials.username, session=self.session_id)
        return Catalogue.AUTH_OK

    async def _auth_failed(self, username: str, reason: str) -> Reply:
        try:
            await self.s.throttle.failed(self.peer, username)
        except StoreUnavailable as e:
            # The next AUTH finds the store unavailable too and gets 454 without a password check.
            self.records.store_unavailable(e, "AUTH")
        self.s.metrics.auth("failed")
        shown = self._shown(username)
        # One line per failure, stable for fail2ban: the client address comes first.
        log.warn(
            "auth failed", client=self.peer, user=shown, reason=reason, session=self.session_id,
            hint=hint(535, "5.7.8", side="client", command="AUTH", user=shown),
        )
        return Catalogue.AUTH_INVALID

    def _shown(self, username: str) -> str:
        known = self.s.known_user
        return username if known is None or known(username) else name_digest(username)

    # -- the envelope -------------------------------------------------------------------------

    def _sender_refusal(self, sender: str) -> Reply | None:
        assert self._user is not None
        if self._user.config.may_send(sender):
            return None
        self.records.refused_sender = sender
        return Catalogue.sender_not_owned(self._user.name)

    @property
    def _budgeted(self) -> bool:
        budgets, user = self.s.budgets, self._user
        return budgets is not None and user is not None and budgets.limited(user.config)

    async def _check_budget(self, accepted: int | None, command: str) -> Reply | None:
        """At MAIL (``accepted`` None) or RCPT (after ``accepted`` recipients): 451 past the user's budget."""
        budgets, user = self.s.budgets, self._user
        assert budgets is not None and user is not None
        try:
            if accepted is None:
                until = await budgets.mail_refused_until(user.config)
            else:
                until = await budgets.rcpt_refused_until(user.config, accepted)
        except StoreUnavailable as e:
            self.records.store_unavailable(e, command)
            return Catalogue.LIMIT_STORE_UNAVAILABLE
        return Catalogue.sending_limit(user.name, utc(until)) if until is not None else None

    async def _forward(self, ask: Forward) -> Forwarded:
        assert self._user is not None
        commands = ask.commands
        if self._upstream is None:
            try:
                self._upstream = await self.s.upstream_of(self._user, self.peer, self.session_id).acquire(self)
            except UpstreamError as e:
                self.records.upstream_failure(e)
                return Forwarded((e.reply,) * len(commands), e.reply)
        upstream = self._upstream
        replies = await upstream.envelope(commands)
        for i, (command, reply) in enumerate(zip(commands, replies)):
            if isinstance(command, Mail):
                if reply.is_positive:
                    self._transaction = Transaction(command.sender, self.s.clock.seconds())
                elif reply.enhanced == "5.6.7":
                    # The upstream module's own refusal (relayed replies carry no enhanced code):
                    # SMTPUTF8 mail the upstream cannot take. The client's reply names the upstream,
                    # the log says what to do.
                    log.info(
                        "refused", session=self.session_id, client=self.peer, user=self.username, command="MAIL",
                        reply=str(reply), hint=hint(
                            reply.code, reply.enhanced, side="client", command="MAIL",
                            situation="upstream-no-smtputf8", upstream_name=self._user.upstream.name,
                        ),
                    )
            elif isinstance(command, Rcpt) and self._transaction is not None:
                self._transaction.recipients += reply.is_positive
                self._transaction.refused += not reply.is_positive
            elif isinstance(command, Data) and reply.code == 354:
                if self._transaction is None:
                    # 354 to the DATA pipelined after a MAIL it refused: the upstream now waits
                    # for message text of a transaction that does not exist. Never used again,
                    # and the client gets no 354 it could not use.
                    name = self._user.upstream.name
                    error = UpstreamError(
                        Catalogue.UPSTREAM_BAD_REPLY, f"upstream {name}: 354 to DATA after refusing MAIL: {reply}", step="DATA"
                    )
                    self.records.upstream_failure(error)
                    upstream.abort()
                    self._upstream = None
                    return Forwarded((*replies[:i], error.reply))
                self._start_body(upstream)
        if upstream.failure is not None:
            self.records.upstream_failure(upstream.failure)
            self._upstream = None
            # The session is gone: the rest of the transaction cannot reach the upstream.
            return Forwarded(tuple(replies), Catalogue.UPSTREAM_LOST)
        return Forwarded(tuple(replies))

    # -- the body -----------------------------------------------------------------------------

    def _start_body(self, upstream: UpstreamSession) -> None:
        assert self._user is not None
        user = self._user
        self._in_body = True
        # Spoofing the header From is what a leaked app password is used for; an app that may send
        # only as scanner@ must not write From: CEO <ceo@...> either.
        checked = bool(user.config.allowed_senders) and user.config.check_header_from
        header_from = user.upstream.header_from
        self._filter = (
            HeaderFilter(self.s.limits.max_header_size, header_from, user.config.may_send if checked else None)
            if checked or header_from is not None else None
        )
        upstream.stream_from(self.io.gate)

    def _body(self, data: bytes, last: bool = False) -> bytes:
        """Check and rewrite the header as it streams; what is left to send, b"" once refused."""
        upstream, headers = self._upstream, self._filter
        if upstream is None:
            return b""
        if headers is not None:
            refused = headers.refused
            data = headers.feed(data, last)
            if headers.refused:
                if not refused:
                    # The upstream never sees an end of data for this message.
                    upstream.abort()
                return b""
        if data and not last:
            upstream.body(data)
        return data

    async def _end_of_data(self, ask: EndOfData) -> Reply:
        upstream, transaction = self._upstream, self._transaction
        # The upstream no longer paces the client: what follows the body is commands.
        self.io.gate.resumeProducing()
        last = self._body(ask.last, last=True) if ask.fault is None else b""
        headers, self._filter = self._filter, None
        self._transaction = None
        self._in_body = False
        foreign = headers.foreign if headers is not None else None
        faults = {ask.fault, BodyFault.HEADER_TOO_BIG if headers is not None and headers.too_long else None}
        # By a fixed precedence, so the reply does not depend on how the input was split.
        fault = next((f for f in BodyFault if f in faults), None)
        if fault is not None or foreign is not None:
            self._upstream = None
            if upstream is not None:
                upstream.abort()
            if fault is not None:
                self.records.message(transaction, ask.size, _FAULT_REPLIES[fault], "refused", reason=fault.value)
                return _FAULT_REPLIES[fault]
            assert self._user is not None
            refusal = Catalogue.header_sender_not_owned(self._user.name)
            self.records.message(transaction, ask.size, refusal, "refused", reason=f"header sender {foreign} not allowed")
            return refusal
        if upstream is None:
            self.records.message(transaction, ask.size, Catalogue.UPSTREAM_LOST, "failed")
            return Catalogue.UPSTREAM_LOST
        self._awaiting_verdict = True
        handed_over = self.s.clock.seconds()
        try:
            reply = await upstream.end(last)
            if upstream.failure is not None:
                self._upstream = None
                self.records.upstream_failure(upstream.failure)
                self.records.message(transaction, ask.size, reply, "failed")
                return reply
            self.s.metrics.upstream_latency(self.records.upstream_name, "end_of_data", self.s.clock.seconds() - handed_over)
            if reply.is_positive and transaction is not None:
                # Counted before the client hears 250, so its next MAIL on any instance sees this
                # message; still awaiting the verdict, so a shutdown cannot swallow the 250.
                await self._count_sent(transaction.recipients)
        finally:
            self._awaiting_verdict = False
        # Back to the pool at the verdict, not at QUIT: the session waits there for this client's
        # next message, and another client needing one meanwhile takes it instead of opening a
        # new connection to the provider.
        self._release_upstream()
        outcome, extra = _outcome(upstream, reply)
        self.records.message(transaction, ask.size, reply, outcome, **extra)
        return reply

    async def _count_sent(self, recipients: int) -> None:
        budgets, user = self.s.budgets, self._user
        if budgets is None or user is None or not budgets.limited(user.config):
            return
        try:
            await budgets.record(user.config, recipients)
        except StoreUnavailable as e:
            # The message is the upstream's now: its 250 stands, uncounted.
            self.records.store_unavailable(e, "end-of-data")
