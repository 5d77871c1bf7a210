"""SMTP replies: one type to parse, validate and format them, and the catalogue of replies we compose.

Replies that come from the upstream are parsed strictly (RFC 5321 4.2) and relayed as they were;
replies the proxy composes come from ``Catalogue`` so tests and docs can walk them.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")
# Printable ASCII and space only: a relayed reply must not carry control characters (ANSI escapes
# reaching an operator's terminal, bare CR/LF splitting a reply into two) or 8-bit text.
_TEXT = re.compile(rb"^[\x20-\x7e]*$")

MAX_LINE = 512
"""Longest reply line we accept from an upstream or compose (RFC 5321 4.5.3.1.5), CRLF included."""


class ReplyError(ValueError):
    """Bytes that are not a valid SMTP reply."""


@dataclass(frozen=True)
class Reply:
    """A complete, possibly multi-line, SMTP reply.

    ``enhanced`` is the RFC 3463 code of a composed reply; for parsed replies it stays ``None`` and
    any enhanced code stays part of each line's text, so relaying reproduces the upstream's bytes.
    """

    code: int
    lines: tuple[str, ...]
    enhanced: str | None = None
    retry_after: int | None = field(default=None, compare=False)
    """Seconds the upstream asked to wait before trying again (Graph's Retry-After), for the spool."""

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ReplyError(f"reply code {self.code} out of range")
        if not self.lines:
            raise ReplyError("a reply has at least one line")
        if self.enhanced is not None:
            m = _ENHANCED.match(self.enhanced)
            if m is None or m.group(1) != str(self.code)[0]:
                raise ReplyError(f"enhanced code {self.enhanced!r} does not fit {self.code}")
        # "NNN-" before and CRLF after each line, and the enhanced code with its space when set.
        room = MAX_LINE - 6 - (len(self.enhanced) + 1 if self.enhanced else 0)
        for line in self.lines:
            if not (line.isascii() and line.isprintable()) or len(line) > room:
                raise ReplyError("reply text must be printable ASCII and fit in one line")

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    def to_bytes(self) -> bytes:
        """The reply on the wire, every line prefixed with the enhanced code when there is one.

        Sent before EHLO too (as Postfix does): a client that does not know RFC 2034 still reads
        the basic code, and the replies that can only come before EHLO (too many connections, an
        early talker) keep the code operators and fail2ban filters look for.
        """
        wire: bytes | None = self.__dict__.get("_wire")
        if wire is None:
            # Kept with the (immutable) reply: the catalogue's replies are sent over and over.
            prefix = f"{self.enhanced} " if self.enhanced else ""
            last = len(self.lines) - 1
            wire = "".join(
                f"{self.code}{' ' if i == last else '-'}{prefix}{line}\r\n" for i, line in enumerate(self.lines)
            ).encode("ascii")
            object.__setattr__(self, "_wire", wire)
        return wire

    def __str__(self) -> str:
        return self.to_bytes().decode("ascii").rstrip("\r\n").replace("\r\n", " / ")


class ReplyParser:
    """Incremental, bounded parser for replies read from an upstream.

    Feed it the bytes of one line at a time (without CRLF); it returns a Reply when the last line
    arrives. Limits stop a hostile upstream from growing our memory (60 MB of ``250-`` lines).
    """

    def __init__(self, max_lines: int = 200) -> None:
        self._max_lines = max_lines
        self._code: int | None = None
        self._lines: list[str] = []

    @property
    def in_progress(self) -> bool:
        """Continuation lines were read and the last line has not come yet."""
        return bool(self._lines)

    def line(self, raw: bytes) -> Reply | None:
        if len(raw) + 2 > MAX_LINE:
            raise ReplyError("reply line too long")
        if len(raw) < 3 or not raw[:3].isdigit():
            raise ReplyError("reply line does not start with a three-digit code")
        code = int(raw[:3])
        if not 200 <= code <= 599:
            raise ReplyError(f"reply code {code} out of range")
        sep = raw[3:4]
        if sep not in (b" ", b"-", b""):
            raise ReplyError("reply code not followed by space or dash")
        if self._code is not None and code != self._code:
            raise ReplyError("multi-line reply changes its code")
        text = raw[4:]
        if _TEXT.match(text) is None:
            raise ReplyError("reply text is not printable ASCII")
        self._code = code
        self._lines.append(text.decode("ascii"))
        if sep == b"-":
            if len(self._lines) >= self._max_lines:
                raise ReplyError("multi-line reply too long")
            return None
        reply = Reply(code, tuple(self._lines))
        self._code = None
        self._lines = []
        return reply


def parse_reply(data: bytes) -> Reply:
    """Parse one complete reply given as CRLF-terminated lines (tests and tools)."""
    parser = ReplyParser()
    lines = data.split(b"\r\n")
    if lines[-1] != b"":
        raise ReplyError("reply does not end in CRLF")
    result = None
    for i, raw in enumerate(lines[:-1]):
        result = parser.line(raw)
        if result is not None and i != len(lines) - 2:
            raise ReplyError("bytes after the end of the reply")
    if result is None:
        raise ReplyError("reply ends in a continuation line")
    return result


def _shown(name: str) -> str:
    # A user name may hold any printable character; a reply line only printable ASCII.
    return name.encode("ascii", "backslashreplace").decode("ascii")[:64]


def _again(seconds: int | None) -> str:
    return f"try again in {seconds} seconds" if seconds is not None else "try again later"


def composed(code: int, enhanced: str, text: str) -> Reply:
    return Reply(code, (text,), enhanced)


class Catalogue:
    """Every reply the proxy composes itself (see docs/replies in the README).

    Functions take the values the text mentions; everything else is fixed here so tests, the
    docs and the code agree.
    """

    @staticmethod
    @functools.cache
    def greeting(hostname: str) -> Reply:
        return Reply(220, (f"{hostname} ESMTP relayproxy",))

    @staticmethod
    @functools.cache
    def closing(hostname: str) -> Reply:
        return composed(221, "2.0.0", f"{hostname} Bye")

    @staticmethod
    @functools.cache
    def helo(hostname: str) -> Reply:
        return Reply(250, (hostname,))

    @staticmethod
    @functools.cache
    def ehlo(hostname: str, extensions: tuple[str, ...]) -> Reply:
        return Reply(250, (hostname, *extensions))

    OK = composed(250, "2.0.0", "OK")
    RESET = composed(250, "2.0.0", "Reset state")
    VRFY = composed(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
    HELP = composed(214, "2.0.0", "See RFC 5321 and https://www.rfc-editor.org/rfc/rfc4954")
    READY_TLS = composed(220, "2.0.0", "Ready to start TLS")
    AUTH_OK = composed(235, "2.7.0", "Authentication successful")

    UNRECOGNIZED = composed(500, "5.5.1", "Command unrecognized")
    LINE_TOO_LONG = composed(500, "5.5.2", "Line too long")
    AUTH_LINE_TOO_LONG = composed(500, "5.5.6", "Authentication exchange line is too long")
    SYNTAX = composed(501, "5.5.2", "Syntax error")
    BARE_LINE_END = composed(501, "5.5.2", "Syntax error: bare CR or LF in command")
    BAD_PARAMETERS = composed(555, "5.5.4", "Parameters not recognized or not implemented")
    BAD_PARAMETER_SYNTAX = composed(501, "5.5.4", "Syntax error in parameters")
    BAD_SIZE = composed(501, "5.5.4", "Syntax error in SIZE parameter")
    BAD_BODY = composed(501, "5.5.4", "Syntax error in BODY parameter")
    BAD_SENDER = composed(501, "5.1.7", "Bad sender address syntax")
    BAD_RECIPIENT = composed(501, "5.1.3", "Bad recipient address syntax")
    UPSTREAM_NO_8BIT = composed(554, "5.6.3", "The upstream does not accept 8-bit content (BODY=8BITMIME)")
    # RFC 6531 3.5: X.6.7, "non-ASCII addresses not permitted". The address is not echoed: reply
    # text is ASCII.
    NEEDS_SMTPUTF8 = composed(553, "5.6.7", "Non-ASCII address needs the SMTPUTF8 parameter of MAIL FROM")
    NOT_IMPLEMENTED = composed(502, "5.5.1", "Command not implemented")
    BAD_SEQUENCE = composed(503, "5.5.1", "Bad sequence of commands")
    EHLO_FIRST = composed(503, "5.5.1", "Send EHLO or HELO first")
    MAIL_FIRST = composed(503, "5.5.1", "Need MAIL command first")
    RCPT_FIRST = composed(503, "5.5.1", "Need RCPT before DATA")
    NESTED_MAIL = composed(503, "5.5.1", "Sender already specified")
    TLS_ACTIVE = composed(503, "5.5.1", "TLS already active")
    TLS_UNAVAILABLE = composed(502, "5.5.1", "STARTTLS not available on this port")
    ALREADY_AUTHENTICATED = composed(503, "5.5.1", "Already authenticated")
    AUTH_CANCELLED = composed(501, "5.5.2", "Authentication cancelled")
    AUTH_BAD_BASE64 = composed(501, "5.5.2", "Invalid base64 data")
    AUTH_MALFORMED = composed(501, "5.5.2", "Malformed authentication data")
    AUTH_NO_MECHANISM = composed(501, "5.5.2", "AUTH needs a mechanism")
    AUTH_UNKNOWN_MECHANISM = composed(504, "5.5.4", "Unrecognized authentication type")
    AUTH_INVALID = composed(535, "5.7.8", "Authentication credentials invalid")
    AUTH_ENCRYPTION_REQUIRED = composed(538, "5.7.11", "Encryption required for requested authentication mechanism")
    AUTH_TEMPORARY = composed(454, "4.7.0", "Temporary authentication failure")
    AUTH_REQUIRED = composed(530, "5.7.0", "Authentication required")
    NO_VALID_RECIPIENTS = composed(554, "5.5.1", "No valid recipients")
    TOO_MANY_RECIPIENTS = composed(452, "4.5.3", "Too many recipients")
    MESSAGE_TOO_BIG = composed(552, "5.3.4", "Message size exceeds fixed maximum message size")
    HEADER_TOO_BIG = composed(552, "5.3.4", "Message header block too big to check or rewrite the From")
    BODY_LINE_TOO_LONG = composed(554, "5.6.0", "Message refused: a line is longer than 1000 octets")
    BODY_NUL = composed(554, "5.6.0", "Message refused: NUL character in message")
    UPSTREAM_LOST = composed(451, "4.4.2", "Upstream connection lost, try again later")
    UPSTREAM_BAD_REPLY = composed(451, "4.4.0", "Upstream sent an invalid reply, try again later")
    UPSTREAM_TIMEOUT = composed(451, "4.4.2", "Upstream timed out, try again later")
    LIMIT_STORE_UNAVAILABLE = composed(451, "4.3.0", "Sending limits cannot be checked now, try again later")
    # RFC 3463 X.3.1 "mail system full": the disk, a quota or a file size limit; X.3.0 anything else.
    SPOOL_FULL = composed(452, "4.3.1", "Insufficient system storage: the spool cannot take the message now, try again later")
    SPOOL_FAILED = composed(451, "4.3.0", "Local error writing the message to the spool, try again later")
    MAIL_OK = composed(250, "2.1.0", "Ok")
    RCPT_OK = composed(250, "2.1.5", "Ok")

    EARLY_TALKER = composed(554, "5.5.0", "Protocol error: client spoke before the greeting")
    TOO_MANY_ERRORS = composed(421, "4.7.0", "Too many invalid commands, closing connection")
    TOO_MANY_AUTH_FAILURES = composed(421, "4.7.0", "Too many authentication failures, closing connection")

    @staticmethod
    def too_many_connections(hostname: str) -> Reply:
        return composed(421, "4.7.0", f"{hostname} Too many connections, try again later")

    @staticmethod
    def network_refused(hostname: str) -> Reply:
        return composed(554, "5.7.1", f"{hostname} Connections from your address are not accepted here")

    @staticmethod
    def local_error(hostname: str) -> Reply:
        return composed(421, "4.3.0", f"{hostname} Local error, closing connection")

    @staticmethod
    def shutting_down(hostname: str) -> Reply:
        return composed(421, "4.3.2", f"{hostname} Service shutting down")

    @staticmethod
    def timeout(hostname: str) -> Reply:
        return composed(421, "4.4.2", f"{hostname} Timeout, closing connection")

    @staticmethod
    def sender_not_owned(user: str) -> Reply:
        return composed(553, "5.7.1", f"Sender address not owned by user {user}")

    @staticmethod
    def header_sender_not_owned(user: str) -> Reply:
        """The header From or Sender is not one of the user's allowed senders (after the end of data)."""
        return composed(550, "5.7.1", f"Header From or Sender address not owned by user {user}")

    @staticmethod
    def sending_limit(name: str, time: str) -> Reply:
        """The user's messages per hour or recipients per day are used up until ``time`` (UTC, ISO 8601)."""
        return composed(451, "4.7.1", f"Sending limit reached for {_shown(name)}, try again after {time}")

    @staticmethod
    def spooled(spool_id: str) -> Reply:
        """On disk (fsync'ed): the spool delivers it, or tells the sender it could not."""
        return composed(250, "2.0.0", f"Ok: queued as {_shown(spool_id)} (spooled)")

    @staticmethod
    def upstream_busy(name: str) -> Reply:
        """Every session max_sessions allows was busy for pacing_timeout."""
        return composed(451, "4.7.0", f"Upstream {name} is at its max_sessions, try again later")

    @staticmethod
    def upstream_rate(name: str) -> Reply:
        """max_messages_per_minute were begun in the last minute, for all of pacing_timeout."""
        return composed(451, "4.7.0", f"Upstream {name} is at its max_messages_per_minute, try again later")

    @staticmethod
    def upstream_no_smtputf8(name: str) -> Reply:
        """MAIL with SMTPUTF8 for an upstream that does not offer it: never sent there (RFC 6531 3.2)."""
        return composed(553, "5.6.7", f"Upstream {name} does not support international addresses (SMTPUTF8)")

    GRAPH_INVALID_RECIPIENTS = composed(550, "5.1.1", "Microsoft Graph refused the recipients (ErrorInvalidRecipients)")

    @staticmethod
    def graph_accepted(request_id: str) -> Reply:
        """Graph took the message (202): its request id stands as the queue id."""
        return composed(250, "2.0.0", f"Ok: queued as {_shown(request_id)}")

    @staticmethod
    def graph_too_big(name: str) -> Reply:
        """Over one request's limit and not multipart: nothing to send apart from the draft."""
        return composed(552, "5.3.4", f"Message over Microsoft Graph's 4 MB request limit has no attachments to send apart (upstream {name})")

    @staticmethod
    def graph_body_too_big(name: str) -> Reply:
        """Multipart, but what must stay in the draft (text, other parts) is over one request's limit."""
        return composed(552, "5.3.4", f"Message text and parts other than attachments exceed Microsoft Graph's 4 MB request limit (upstream {name})")

    @staticmethod
    def graph_throttled(name: str, seconds: int | None) -> Reply:
        return Reply(451, (f"Microsoft Graph throttles upstream {name}, {_again(seconds)}",), "4.7.0", seconds)

    @staticmethod
    def graph_unavailable(name: str, status: int, seconds: int | None) -> Reply:
        return Reply(451, (f"Microsoft Graph unavailable for upstream {name} (HTTP {status}), {_again(seconds)}",), "4.4.5", seconds)

    @staticmethod
    def graph_send_as_denied(name: str) -> Reply:
        return composed(550, "5.7.60", f"Microsoft Graph: the mailbox of upstream {name} may not send as this sender (ErrorSendAsDenied)")

    @staticmethod
    def graph_access_denied(name: str) -> Reply:
        return composed(550, "5.7.0", f"Microsoft Graph denied upstream {name} access to its mailbox (Mail.Send permission or access policy)")

    @staticmethod
    def graph_drafts_denied(name: str) -> Reply:
        which = "a message over 3 MB, or any with save_to_sent = false"
        return composed(550, "5.7.0", f"Microsoft Graph denied upstream {name} a draft ({which}): the app needs Mail.ReadWrite")

    @staticmethod
    def graph_no_smtputf8(name: str) -> Reply:
        """Graph documents no UTF-8 header (RFC 6532) in the MIME sendMail takes: SMTPUTF8 mail is not sent there."""
        return composed(553, "5.6.7", f"Microsoft Graph upstream {name} does not take international addresses (SMTPUTF8)")

    @staticmethod
    def graph_refused(name: str, status: int, code: str) -> Reply:
        return composed(554, "5.0.0", f"Microsoft Graph refused the message for upstream {name}: HTTP {status} {_shown(code)}")

    @staticmethod
    def upstream_unreachable(name: str) -> Reply:
        return composed(451, "4.4.1", f"Upstream {name} unreachable, try again later")

    @staticmethod
    def upstream_tls_failed(name: str) -> Reply:
        return composed(454, "4.7.0", f"TLS with upstream {name} failed, try again later")

    @staticmethod
    def upstream_token_failed(name: str) -> Reply:
        return composed(454, "4.7.0", f"Upstream {name} sign-in token unavailable, try again later")

    @staticmethod
    def upstream_auth_failed(name: str) -> Reply:
        return composed(454, "4.7.0", f"Upstream {name} refused the relay's credentials, try again later")
