"""The client side of an SMTP session as a pure state machine: bytes in, actions out, no I/O.

``receive`` takes what the client sent and returns what to do: replies to send, TLS to start, body
bytes for the upstream, the connection to close. What needs the outside world (a password check,
the throttles, allowed senders and budgets, the upstream's replies, its verdict) is asked for with
an ``Ask`` action; the machine then waits, buffering what the client pipelines, until ``answer``
brings the result. Replies therefore always leave in command order (RFC 2920), and whatever
followed STARTTLS in the same packet is dropped (RFC 3207 4.2).

Pipelining: consecutive MAIL, RCPT and DATA commands that arrived together are checked one by one
and the ones that passed go to the upstream as one ``Forward`` group, DATA only as its last
command; a command refused here keeps its place among the upstream's replies. When the group's
MAIL fails, the commands after it are read again, as if they had come after its reply: what the
client is answered never depends on how its commands were split into packets.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from relayproxy.errors import ProtocolError
from relayproxy.smtp import sasl
from relayproxy.smtp.commands import MAX_COMMAND_LINE, Command, PathCommand, mail_of, parse_command
from relayproxy.smtp.data import BodyDecoder, BodyFault, Chunk
from relayproxy.smtp.envelope import Data, EnvelopeCommand, Mail, Rcpt
from relayproxy.smtp.lines import LineBuffer, TooLong
from relayproxy.smtp.reply import Catalogue, Reply


class State(enum.Enum):
    GREETING = "greeting"
    """Connected; the greeting has not been sent (RFC 5321 4.3.1: the client waits for it)."""
    CONNECTED = "connected"
    """Greeted; no EHLO or HELO yet."""
    HELLO = "hello"
    """Said hello; not authenticated."""
    SASL = "sasl"
    """In an AUTH exchange: the next line is a response to our 334, not a command."""
    AUTHENTICATED = "authenticated"
    """Logged in, no transaction."""
    TRANSACTION = "transaction"
    """MAIL accepted (or forwarded and not yet answered)."""
    BODY = "body"
    """After the upstream's 354: the bytes are message text up to CRLF.CRLF."""
    CLOSED = "closed"


_COMMAND_STATES = frozenset({State.CONNECTED, State.HELLO, State.AUTHENTICATED, State.TRANSACTION})

SEQUENCE: dict[str, dict[State, Reply]] = {
    # Unauthenticated MAIL and RCPT are refused before their address is even parsed: open-relay
    # probes (source routes, bang paths, user@a@b) learn nothing but "log in first".
    "MAIL": {State.CONNECTED: Catalogue.AUTH_REQUIRED, State.HELLO: Catalogue.AUTH_REQUIRED, State.TRANSACTION: Catalogue.NESTED_MAIL},
    "RCPT": {State.CONNECTED: Catalogue.AUTH_REQUIRED, State.HELLO: Catalogue.AUTH_REQUIRED, State.AUTHENTICATED: Catalogue.MAIL_FIRST},
    "DATA": {State.CONNECTED: Catalogue.AUTH_REQUIRED, State.HELLO: Catalogue.AUTH_REQUIRED, State.AUTHENTICATED: Catalogue.MAIL_FIRST},
    "AUTH": {
        State.CONNECTED: Catalogue.EHLO_FIRST, State.AUTHENTICATED: Catalogue.ALREADY_AUTHENTICATED,
        State.TRANSACTION: Catalogue.ALREADY_AUTHENTICATED,
    },
}
"""Which verb is refused in which command state, and with what; a state not listed allows it."""

_ENVELOPE_VERBS = frozenset({"MAIL", "RCPT", "DATA"})
_INVALID_COMMAND_CODES = frozenset({500, 501, 502, 503, 504, 555})
"""Replies that mean the client sent something it should not have: too many in a row end the session."""


# -- actions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    reply: Reply
    refused: str | None = None
    """The verb, when this reply refuses a command here (for the log line that says why)."""


@dataclass(frozen=True)
class StartTLS:
    """Start the TLS handshake now; the 220 went just before."""


@dataclass(frozen=True)
class Close:
    """Close the connection after what was sent."""


@dataclass(frozen=True)
class Body:
    """Wire-ready message text for the upstream (line ends CRLF, dot-stuffed)."""

    data: bytes


@dataclass(frozen=True)
class AbortBody:
    """The message cannot be relayed: the upstream must never see an end of data for it."""


@dataclass(frozen=True)
class Abandon:
    """The transaction the upstream holds is over without a message (RSET, EHLO, HELO, STARTTLS)."""


@dataclass(frozen=True)
class Logout:
    """The identity is forgotten (STARTTLS)."""


@dataclass(frozen=True)
class CheckThrottle:
    """May this client try a password now (and for ``username``, once it is known)? Answer: a refusal or None."""

    username: str | None


@dataclass(frozen=True)
class Login:
    """Check these credentials. Answer: 235 or the refusal."""

    credentials: sasl.Credentials


@dataclass(frozen=True)
class CheckMail:
    """May the user send as this sender now (allowed senders, budgets)? Answer: a refusal or None."""

    mail: Mail


@dataclass(frozen=True)
class CheckRcpt:
    """May the user add a recipient, ``recipients`` being already in this transaction? Answer: a refusal or None."""

    rcpt: Rcpt
    recipients: int


@dataclass(frozen=True)
class Forward:
    """Give these envelope commands to the upstream, in one go. Answer: ``Forwarded``."""

    commands: tuple[EnvelopeCommand, ...]


@dataclass(frozen=True)
class Forwarded:
    replies: tuple[Reply, ...]
    """One per forwarded command, in order."""
    failed: Reply | None = None
    """The upstream failed: later commands of this transaction get this reply."""


@dataclass(frozen=True)
class EndOfData:
    """The client's end of data. Answer: the verdict to relay."""

    last: bytes
    """The last wire-ready text, to go with the final dot (empty when ``fault``)."""
    fault: BodyFault | None
    size: int


def _verb(line: bytes) -> str:
    return line.split(b" ", 1)[0][:16].upper().decode("ascii", "replace")


Ask = CheckThrottle | Login | CheckMail | CheckRcpt | Forward | EndOfData
ASKS = frozenset({CheckThrottle, Login, CheckMail, CheckRcpt, Forward, EndOfData})
Action = Send | StartTLS | Close | Body | AbortBody | Abandon | Logout | Ask
Answer = Reply | Forwarded | None


@dataclass(frozen=True)
class SessionSettings:
    hostname: str
    starttls: bool = False
    """The listener offers STARTTLS."""
    tls_available: bool = False
    """A certificate is loaded, so STARTTLS can start."""
    implicit_tls: bool = False
    plaintext_auth: bool = False
    """AUTH is allowed before TLS (a plaintext listener, or allow_plaintext_auth)."""
    max_message_size: int = 35 * 1024 * 1024
    max_recipients: int = 100
    max_invalid_commands: int = 20
    max_auth_failures: int = 3


@dataclass
class _Group:
    """Envelope commands that arrived together, checked here one by one, to be forwarded at once."""

    items: list[EnvelopeCommand | Send] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)
    """The command line of each item, to read again if the group's MAIL fails."""
    forwarded: list[EnvelopeCommand] = field(default_factory=list)
    """The items that passed, to go upstream."""

    def add(self, item: EnvelopeCommand | Send, line: bytes) -> None:
        self.items.append(item)
        self.lines.append(line)
        if type(item) is not Send:
            self.forwarded.append(item)  # type: ignore[arg-type]


@dataclass
class _Envelope:
    """The transaction's recipients as known while the upstream's replies are outstanding."""

    smtputf8: bool = False
    accepted: int = 0
    pending: int = 0
    """Forwarded, not answered yet: counted as accepted for the limits, since they may be."""
    attempted: int = 0
    failed: Reply | None = None
    """The upstream failed: later RCPT and DATA get this reply."""

    @property
    def recipients(self) -> int:
        return self.accepted + self.pending


class _BodyReader:
    """The message text from 354 to its end: Body actions, a fault announced once, EndOfData."""

    def __init__(self, max_size: int) -> None:
        self._decoder = BodyDecoder(max_size)
        self._fault_sent = False

    def feed(self, data: bytes, emit: Callable[[Action], None]) -> Chunk:
        decoder = self._decoder
        chunk = decoder.feed(data)
        fault = decoder.fault
        if fault is not None and not self._fault_sent:
            # Stop the partial body here: the upstream never sees an end of data for it.
            self._fault_sent = True
            emit(AbortBody())
        if not chunk.done:
            if chunk.data and fault is None:
                emit(Body(chunk.data))
        else:
            emit(EndOfData(chunk.data if fault is None else b"", fault, decoder.size))
        return chunk


class ServerSession:
    def __init__(self, settings: SessionSettings, *, identified: bool = False) -> None:
        self.settings = settings
        self._identified = identified
        """The client is a user by its address (an IP-bound device): authenticated once it says hello."""
        self.state = State.GREETING
        self.tls = settings.implicit_tls
        self._lines = LineBuffer(MAX_COMMAND_LINE)
        self._out: list[Action] = []
        self.waiting: Ask | None = None
        self._held: deque[bytes | TooLong] = deque()
        """Lines read while a group was still open, or to read again: handled before the buffer's."""
        self._line = b""
        """The command line being handled."""
        self._group = _Group()
        self._exchange = sasl.Exchange("PLAIN", "")
        """The AUTH exchange in progress (State.SASL), and the credentials it gave."""
        self._credentials = sasl.Credentials("", "")
        self._reader: _BodyReader | None = None
        self._envelope = _Envelope()
        self._invalid = 0
        self._auth_failures = 0
        self.lines_read = 0
        """Complete lines taken from the client so far (commands and SASL responses)."""

    # -- the interface ------------------------------------------------------------------------

    def greet(self) -> list[Action]:
        self.state = State.CONNECTED
        return self._flush([Send(Catalogue.greeting(self.settings.hostname))])

    def receive(self, data: bytes) -> list[Action]:
        if self.state is State.CLOSED:
            return []
        if self.state is State.GREETING:
            return self.close_with(Catalogue.EARLY_TALKER)
        self._lines.feed(data)
        self._advance()
        return self._flush()

    def answer(self, result: Answer) -> list[Action]:
        ask, self.waiting = self.waiting, None
        assert ask is not None, "an answer with no question"
        if self.state is not State.CLOSED:
            self._answered(ask, result)
            self._advance()
        return self._flush()

    def close_with(self, reply: Reply) -> list[Action]:
        """End the session with ``reply`` (timeouts, shutdown, too many connections)."""
        if self.state is State.CLOSED:
            return []
        self._close(reply)
        return self._flush()

    def disconnected(self) -> None:
        """The client is gone: nothing more to say."""
        self.state = State.CLOSED

    @property
    def partial_line(self) -> bool:
        """Part of a line has come, not its end."""
        return self._lines.partial

    @property
    def buffered(self) -> int:
        """Pipelined bytes held while waiting for an answer."""
        return len(self._lines)

    @property
    def idle(self) -> bool:
        """Nothing in progress that a shutdown should wait for."""
        return self.waiting is None and self.state not in (State.SASL, State.TRANSACTION, State.BODY)

    # -- the loop -----------------------------------------------------------------------------

    def _flush(self, extra: list[Action] | None = None) -> list[Action]:
        out, self._out = self._out + (extra or []), []
        return out

    def _emit(self, action: Action) -> None:
        self._out.append(action)
        if type(action) in ASKS:
            self.waiting = action  # type: ignore[assignment]

    def _advance(self) -> None:
        while self.waiting is None and self.state is not State.CLOSED:
            if self.state is State.BODY:
                data = self._lines.take()
                if not data:
                    return
                self._body(data)
                continue
            line = self._next_line()
            if line is None:
                # A pipelined group ends with what arrived together.
                self._forward_group()
                return
            if self.state is State.SASL:
                self._sasl_response(line)
            else:
                self._command(line)

    def _next_line(self) -> bytes | TooLong | None:
        if self._held:
            return self._held.popleft()
        line = self._lines.next_line()
        if line is not None:
            self.lines_read += 1
        return line

    # -- replies and refusals -----------------------------------------------------------------

    def _reply(self, reply: Reply) -> None:
        self._invalid = 0
        self._emit(Send(reply))

    def _refuse(self, reply: Reply, verb: str) -> None:
        if self._group.items:
            # A refused envelope command keeps its place among the upstream's replies.
            self._group.add(Send(reply, verb), self._line)
            return
        self._emit(Send(reply, verb))
        if reply.code in _INVALID_COMMAND_CODES:
            self._invalid += 1
            if self._invalid >= self.settings.max_invalid_commands:
                self._close(Catalogue.TOO_MANY_ERRORS)

    def _close(self, reply: Reply | None = None) -> None:
        if reply is not None:
            self._emit(Send(reply))
        self._emit(Close())
        self.state = State.CLOSED

    # -- commands -----------------------------------------------------------------------------

    def _command(self, line: bytes | TooLong) -> None:
        if self._group.items and (isinstance(line, TooLong) or _verb(line) not in _ENVELOPE_VERBS):
            # Anything else ends the group: it is answered after the group's replies.
            self._held.append(line)
            self._forward_group()
            return
        if isinstance(line, TooLong):
            # RFC 4954 4: an over-long AUTH line has a code of its own.
            long_auth = line.start[:5].upper() == b"AUTH "
            self._refuse(Catalogue.AUTH_LINE_TOO_LONG if long_auth else Catalogue.LINE_TOO_LONG, "AUTH" if long_auth else "-")
            return
        self._line = line
        verb = _verb(line)
        try:
            if b"\r" in line or b"\n" in line:
                # A bare CR or LF would let one "line" hold two commands for a peer that splits differently.
                raise ProtocolError(Catalogue.BARE_LINE_END)
            refusal = SEQUENCE.get(verb, {}).get(self.state)
            if refusal is not None:
                raise ProtocolError(refusal)
            command = parse_command(line)
            fixed = _FIXED.get(verb)
            if fixed is not None:
                actions: list[Action] = [Send(fixed)]
            elif verb in _HANDLERS:
                actions = list(_HANDLERS[verb](self, command))
            else:
                raise ProtocolError(Catalogue.UNRECOGNIZED)
        except ProtocolError as e:
            self._refuse(e.reply, verb)
            return
        self._invalid = 0
        for action in actions:
            self._emit(action)

    def _ehlo(self, command: Command) -> Iterator[Action]:
        if not command.argument:
            raise ProtocolError(Catalogue.SYNTAX)
        yield from self._reset()
        extensions: tuple[str, ...] = (
            "PIPELINING", f"SIZE {self.settings.max_message_size}", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES",
        )
        if self.settings.starttls and not self.tls:
            extensions += ("STARTTLS",)
        if self._auth_allowed and self.state is not State.AUTHENTICATED:
            extensions += ("AUTH " + " ".join(sasl.MECHANISMS),)
        yield Send(Catalogue.ehlo(self.settings.hostname, extensions))

    def _helo(self, command: Command) -> Iterator[Action]:
        if not command.argument:
            raise ProtocolError(Catalogue.SYNTAX)
        yield from self._reset()
        yield Send(Catalogue.helo(self.settings.hostname))

    def _reset(self) -> Iterator[Action]:
        """EHLO, HELO and RSET end a transaction (RFC 5321 4.1.4); a first hello moves on."""
        if self.state is State.TRANSACTION:
            yield Abandon()
        if self.state in (State.TRANSACTION, State.AUTHENTICATED) or self._identified:
            self.state = State.AUTHENTICATED
        else:
            self.state = State.HELLO
        self._envelope.failed = None

    def _rset(self, command: Command) -> Iterator[Action]:
        if command.argument:
            raise ProtocolError(Catalogue.SYNTAX)
        if self.state is not State.CONNECTED:
            yield from self._reset()
        yield Send(Catalogue.RESET)

    def _quit(self, command: Command) -> Iterator[Action]:
        self.state = State.CLOSED
        yield Send(Catalogue.closing(self.settings.hostname))
        yield Close()

    def _starttls(self, command: Command) -> Iterator[Action]:
        if command.argument:
            raise ProtocolError(Catalogue.SYNTAX)
        if self.tls:
            raise ProtocolError(Catalogue.TLS_ACTIVE)
        if not (self.settings.starttls and self.settings.tls_available):
            raise ProtocolError(Catalogue.TLS_UNAVAILABLE)
        # RFC 3207 4.2 / CVE-2011-0411: whatever followed STARTTLS came in plaintext and is dropped,
        # and everything learnt before TLS is forgotten.
        self._lines.clear()
        self._held.clear()
        if self.state is State.TRANSACTION:
            yield Abandon()
        if self.state in (State.TRANSACTION, State.AUTHENTICATED):
            yield Logout()
        self.state = State.CONNECTED
        self.tls = True
        yield Send(Catalogue.READY_TLS)
        yield StartTLS()

    # -- AUTH (RFC 4954) ----------------------------------------------------------------------

    @property
    def _auth_allowed(self) -> bool:
        return self.tls or self.settings.plaintext_auth

    def _auth(self, command: Command) -> Iterator[Action]:
        if not self._auth_allowed:
            raise ProtocolError(Catalogue.AUTH_ENCRYPTION_REQUIRED)
        self._exchange = sasl.Exchange.begin(command.argument)
        self.state = State.SASL
        # Refused before any password is read: a guesser must not cost us a check per attempt.
        yield CheckThrottle(None)

    def _sasl(self, step: Callable[[], str | sasl.Credentials]) -> None:
        """The exchange's next step: a challenge to send, or credentials to check."""
        try:
            found = step()
        except ProtocolError as e:
            self.state = State.HELLO
            self._refuse(e.reply, "AUTH")
            return
        if isinstance(found, str):
            self._emit(Send(Reply(334, (found,))))
        else:
            self._credentials = found
            self._emit(CheckThrottle(found.username))

    def _sasl_response(self, line: bytes | TooLong) -> None:
        if isinstance(line, TooLong):
            self.state = State.HELLO
            self._refuse(Catalogue.AUTH_LINE_TOO_LONG, "AUTH")
        else:
            self._sasl(lambda: self._exchange.respond(line.decode("ascii", "replace")))

    def _logged_in(self, reply: Reply) -> None:
        if reply.code == 235:
            self.state = State.AUTHENTICATED
            self._reply(reply)
            return
        self.state = State.HELLO
        if reply.code == 535:
            self._auth_failures += 1
            if self._auth_failures >= self.settings.max_auth_failures:
                self._emit(Send(reply, "AUTH"))
                self._close(Catalogue.TOO_MANY_AUTH_FAILURES)
                return
        self._refuse(reply, "AUTH")

    # -- the envelope -------------------------------------------------------------------------

    def _mail(self, command: PathCommand) -> Iterator[Action]:
        yield CheckMail(mail_of(command, self.settings.max_message_size))

    def _rcpt(self, command: PathCommand) -> Iterator[Action]:
        if self._envelope.failed is not None:
            raise ProtocolError(self._envelope.failed)
        if command.parameters:
            raise ProtocolError(Catalogue.BAD_PARAMETERS)
        if not (self._envelope.smtputf8 or command.address.isascii()):
            raise ProtocolError(Catalogue.NEEDS_SMTPUTF8)
        recipients = self._envelope.recipients
        if recipients >= self.settings.max_recipients:
            raise ProtocolError(Catalogue.TOO_MANY_RECIPIENTS)
        yield CheckRcpt(Rcpt(command.address), recipients)

    def _data(self, command: Command) -> Iterator[Action]:
        if self._envelope.failed is not None:
            raise ProtocolError(self._envelope.failed)
        if command.argument:
            raise ProtocolError(Catalogue.SYNTAX)
        if self._envelope.attempted == 0:
            raise ProtocolError(Catalogue.RCPT_FIRST)
        if self._envelope.recipients == 0:
            raise ProtocolError(Catalogue.NO_VALID_RECIPIENTS)
        # DATA ends a group (RFC 2920 3.1): the client waits for its 354.
        self._group.add(Data(), self._line)
        self._forward_group()
        return
        yield

    def _checked(self, ask: CheckMail | CheckRcpt, refusal: Reply | None) -> None:
        verb = "MAIL" if isinstance(ask, CheckMail) else "RCPT"
        if refusal is not None:
            self._group.add(Send(refusal, verb), self._line)
            return
        if isinstance(ask, CheckMail):
            self.state = State.TRANSACTION
            self._envelope = _Envelope(ask.mail.smtputf8)
            self._group.add(ask.mail, self._line)
        else:
            self._envelope.pending += 1
            self._envelope.attempted += 1
            self._group.add(ask.rcpt, self._line)

    def _forward_group(self) -> None:
        if not self._group.items or self.waiting is not None:
            return
        forwarded = self._group.forwarded
        if forwarded:
            self._emit(Forward(tuple(forwarded)))
        else:
            self._forwarded(Forwarded(()))

    def _forwarded(self, result: Forwarded) -> None:
        group, self._group = self._group, _Group()
        replies = iter(result.replies)
        for position, item in enumerate(group.items):
            if isinstance(item, Send):
                self._refuse(item.reply, item.refused or "-")
                if self.state is State.CLOSED:
                    return
                continue
            reply = next(replies)
            self._invalid = 0
            if isinstance(item, Mail):
                if not reply.is_positive:
                    self.state = State.AUTHENTICATED
                    self._envelope = _Envelope()
                    self._emit(Send(reply))
                    # What came after it in the group was checked as part of a transaction that
                    # does not exist: it is read again, as if it had arrived after this reply, so
                    # the client's replies do not depend on how its packets were split. (The
                    # upstream's replies to those commands are moot: it has no transaction either.)
                    self._held.extendleft(reversed(group.lines[position + 1 :]))
                    return
            elif isinstance(item, Rcpt):
                self._envelope.pending -= 1
                self._envelope.accepted += reply.is_positive
            elif reply.code == 354 and self.state is State.TRANSACTION:
                self.state = State.BODY
                self._reader = _BodyReader(self.settings.max_message_size)
            self._emit(Send(reply))
            if self.state is State.CLOSED:
                return
        if result.failed is not None and self.state is State.TRANSACTION:
            self._envelope.failed = result.failed

    # -- the body -----------------------------------------------------------------------------

    def _body(self, data: bytes) -> None:
        reader = self._reader
        assert reader is not None
        chunk = reader.feed(data, self._emit)
        if chunk.done:
            self._reader = None
            self.state = State.AUTHENTICATED
            self._lines.feed(chunk.rest)

    # -- answers ------------------------------------------------------------------------------

    def _answered(self, ask: Ask, result: Answer) -> None:
        kind = type(ask)
        if kind is Forward:
            assert isinstance(result, Forwarded) and len(result.replies) == len(ask.commands)  # type: ignore[union-attr]
            self._forwarded(result)
        elif kind is CheckMail or kind is CheckRcpt:
            assert not isinstance(result, Forwarded)
            self._checked(ask, result)  # type: ignore[arg-type]
        elif kind is EndOfData:
            assert isinstance(result, Reply)
            self._reply(result)
        elif kind is Login:
            assert isinstance(result, Reply)
            self._logged_in(result)
        elif isinstance(result, Reply):
            self.state = State.HELLO
            self._refuse(result, "AUTH")
        elif ask.username is None:  # type: ignore[union-attr]
            self._sasl(self._exchange.start)
        else:
            self._emit(Login(self._credentials))


_HANDLERS: dict[str, Callable[[ServerSession, Any], Iterator[Action]]] = {
    "EHLO": ServerSession._ehlo, "HELO": ServerSession._helo, "RSET": ServerSession._rset, "QUIT": ServerSession._quit,
    "STARTTLS": ServerSession._starttls, "AUTH": ServerSession._auth, "MAIL": ServerSession._mail,
    "RCPT": ServerSession._rcpt, "DATA": ServerSession._data,
}
"""The verbs with more to do than one fixed reply."""

_FIXED = {"NOOP": Catalogue.OK, "HELP": Catalogue.HELP, "VRFY": Catalogue.VRFY, "EXPN": Catalogue.NOT_IMPLEMENTED}
"""The verbs answered the same in every state; VRFY and EXPN only to say no (RFC 5321 7.3)."""
