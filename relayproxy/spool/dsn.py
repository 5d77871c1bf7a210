"""The delivery status notification (RFC 3464 in a multipart/report, RFC 6522) the spool sends the
sender of a message it could not deliver.

Pure: the caller gives what happened and gets the whole message as bytes, CRLF line ends, not
dot-stuffed, every line at most 998 octets. The caller sends it with the null reverse-path (RFC 5321
4.5.5), so that it can never cause a notification of its own. SMTPUTF8 mail gets the
internationalized form (RFC 6533), which may carry UTF-8 addresses and the original's UTF-8 header.
"""

from __future__ import annotations

import re
import secrets
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from email.utils import format_datetime

_STATUS = re.compile(r"^[45]\.\d{1,3}\.\d{1,3}$")
# Both end up in the Message-ID, whose parts must be dot-atoms (RFC 5322 3.6.4).
_HOST = re.compile(r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*$")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SPOOL_ID = re.compile(rf"^{_ATEXT}(?:\.{_ATEXT})*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LINE_END = re.compile(rb"\r\n|\r|\n")

_SOFT = 78
"""Header lines are folded to this where their spaces allow (RFC 5322 2.1.1)."""
_HARD = 998
"""No line may be longer, in octets without its CRLF (RFC 5322 2.1.1)."""
_TEXT_WIDTH = 76


@dataclass(frozen=True)
class Failure:
    """One recipient the message could not be delivered to."""

    recipient: str
    """The envelope recipient, as the client gave it in RCPT TO."""
    status: str
    """RFC 3463 code: the upstream's for a refusal, 4.4.7 for an expired message it never refused."""
    diagnostic: str | None
    """The upstream's reply as text ("550 5.1.1 <x@y>: no such user"); None if there was none."""
    remote: str | None
    """The upstream host it was tried through; None if unknown."""

    def __post_init__(self) -> None:
        if _STATUS.match(self.status) is None:
            raise ValueError(f"status {self.status!r} is not an RFC 3463 failure code (4.x.x or 5.x.x)")


def notification(
    *,
    reporting_host: str,
    sender: str,
    spool_id: str,
    arrival: float,
    now: float,
    failures: Sequence[Failure],
    expired: bool,
    original_header: bytes,
    smtputf8: bool = False,
    author: str | None = None,
) -> bytes:
    """The notification to ``sender`` that ``failures`` were not delivered.

    ``expired``: the spool gave up after its maximum age; else the upstream refused them for good
    (5.x.x). ``original_header`` is the message's header block, which the caller may have cut
    short. ``smtputf8``: the message came with SMTPUTF8, so its addresses and header may be UTF-8.
    ``spool_id`` must be a dot-atom (letters, digits, ``!#$%&'*+-/=?^_`{|}~`` and inner dots).
    ``author`` is the From field's value when the upstream sends only as its own mailbox (its
    header_from, or a Graph mailbox); else the mail system's MAILER-DAEMON address.
    Raises ValueError for a value that cannot be put in the notification as given.
    """
    if not failures:
        raise ValueError("a notification needs at least one failure")
    if not sender:
        # RFC 5321 4.5.5: mail from the null reverse-path is never answered, or notifications loop.
        raise ValueError("no notification is sent to the null reverse-path")
    if _HOST.match(reporting_host) is None:
        raise ValueError(f"reporting host {reporting_host!r} is not a host name")
    if _SPOOL_ID.match(spool_id) is None:
        raise ValueError(f"spool id {spool_id!r} is not a dot-atom")
    if not expired and any(f.status[0] != "5" for f in failures):
        # A temporary failure is retried, not reported, until the message expires.
        raise ValueError("a failure with a 4.x.x status is only reported once the message expired")
    _check_address(sender, smtputf8)
    if author is not None and not (author.isascii() and author.isprintable()):
        raise ValueError("the author must be one line of printable ASCII")
    for failure in failures:
        _check_address(failure.recipient, smtputf8)
    failures = [replace(f, diagnostic=_shown(f.diagnostic), remote=_shown(f.remote)) for f in failures]

    # The global types are RFC 6533's for a report and header that may hold UTF-8 (RFC 6532).
    report_type, header_type = (
        ("message/global-delivery-status", "message/global-headers")
        if smtputf8
        else ("message/delivery-status", "text/rfc822-headers")
    )
    text = _explanation(reporting_host, spool_id, now - arrival, failures, expired).encode("utf-8")
    parts = [
        (f"text/plain; charset={'us-ascii' if text.isascii() else 'utf-8'}", "Notification", text),
        (report_type, "Delivery report", _report(reporting_host, spool_id, arrival, now, failures)),
        (header_type, "Undelivered message header", _original(original_header)),
    ]
    boundary = _boundary(b"".join(body for _, _, body in parts))
    eight_bit = not all(body.isascii() for _, _, body in parts)
    fields = [
        f"From: {author}" if author is not None else f"From: Mail Delivery System <MAILER-DAEMON@{reporting_host}>",
        f"To: <{sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {_date(now)}",
        f"Message-ID: <{spool_id}.{secrets.token_hex(8)}@{reporting_host}>",
        "MIME-Version: 1.0",
        # RFC 3834 5: marks it as automatic, so that vacation responders and the like stay quiet.
        "Auto-Submitted: auto-replied",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
    ]
    if eight_bit:
        # A multipart's encoding must be 8bit when any of its parts is (RFC 2045 6.4).
        fields.append("Content-Transfer-Encoding: 8bit")
    delimiter = b"--" + boundary.encode("ascii")
    out = []
    for content_type, description, body in parts:
        part_fields = [f"Content-Type: {content_type}", f"Content-Description: {description}"]
        if not body.isascii():
            part_fields.append("Content-Transfer-Encoding: 8bit")
        out.append(delimiter + b"\r\n" + _fields(part_fields) + b"\r\n" + body)
    # The CRLF before each delimiter belongs to it (RFC 2046 5.1.1): every body ends in its own CRLF.
    return _fields(fields) + b"\r\n" + b"\r\n".join(out) + b"\r\n" + delimiter + b"--\r\n"


def _check_address(address: str, utf8: bool) -> None:
    # Addresses go into header fields as they are: a CR or LF would start a field of its own.
    if _CONTROL.search(address) is not None:
        raise ValueError(f"address {address!r} holds a control character")
    if not utf8 and not address.isascii():
        raise ValueError(f"address {address!r} is not ASCII, and the message did not use SMTPUTF8")


def _shown(text: str | None) -> str | None:
    """Outside text (an upstream's reply, a host name) as one line of printable ASCII; None if empty."""
    if text is None:
        return None
    ascii_text = text.encode("ascii", "backslashreplace").decode("ascii")
    return " ".join(_CONTROL.sub(" ", ascii_text).split()) or None


def _date(epoch: float) -> str:
    return format_datetime(datetime.fromtimestamp(epoch, timezone.utc))


def _span(seconds: float) -> str:
    unit, size = next(((u, s) for u, s in (("day", 86400), ("hour", 3600)) if seconds >= s), ("minute", 60))
    count = int(seconds // size)
    return f"{count} {unit}{'' if count == 1 else 's'}"


def _explanation(host: str, spool_id: str, age: float, failures: Sequence[Failure], expired: bool) -> str:
    if expired:
        summary = (
            f"Your message could not be delivered to the recipients below. The mail system kept it"
            f" for {_span(age)} and has now given up."
        )
    else:
        summary = "Your message could not be delivered to the recipients below: they were refused for good."
    lines = [f"This is the mail system at {host}.", "", *textwrap.wrap(summary, _TEXT_WIDTH), ""]
    for failure in failures:
        reason = "refused" if failure.status[0] == "5" else f"not delivered within {_span(age)}"
        lines.extend(_wrapped(f"<{failure.recipient}>: {reason} (status {failure.status})", ""))
        remote, diagnostic = failure.remote, failure.diagnostic
        if remote is not None and diagnostic is not None:
            detail = f"{remote} replied: {diagnostic}"
        elif remote is not None:
            detail = f"last tried through {remote}"
        else:
            detail = f"the reply was: {diagnostic}" if diagnostic is not None else ""
        lines.extend(_wrapped(detail, "    "))
    lines += ["", f"The message is {spool_id} in the spool of {host}; its header is attached."]
    return "".join(f"{line}\r\n" for line in lines)


def _wrapped(text: str, indent: str) -> list[str]:
    # Not at hyphens: addresses and host names would be split there.
    return textwrap.wrap(text, _TEXT_WIDTH, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False)


def _report(host: str, spool_id: str, arrival: float, now: float, failures: Sequence[Failure]) -> bytes:
    groups = [[f"Reporting-MTA: dns; {host}", f"X-Relayproxy-Spool-Id: {spool_id}", f"Arrival-Date: {_date(arrival)}"]]
    for failure in failures:
        # RFC 6533 3: the utf-8 type is for the addresses rfc822 cannot carry.
        kind = "rfc822" if failure.recipient.isascii() else "utf-8"
        group = [f"Final-Recipient: {kind}; {failure.recipient}", "Action: failed", f"Status: {failure.status}"]
        if failure.remote is not None:
            group.append(f"Remote-MTA: dns; {failure.remote}")
        if failure.diagnostic is not None:
            group.append(f"Diagnostic-Code: smtp; {failure.diagnostic}")
        group.append(f"Last-Attempt-Date: {_date(now)}")
        groups.append(group)
    return b"\r\n".join(_fields(group) for group in groups)


def _original(header: bytes) -> bytes:
    """The original header block as lines of at most 998 octets, each with its CRLF.

    A cut-short header may end mid-line or mid-CRLF, and an empty line would end the embedded
    block early, so lines are taken at any line end and empty ones dropped. A longer line is folded.
    """
    lines = [line for line in _LINE_END.split(header) if line]
    return b"".join(b"\r\n ".join(_cut(line, _HARD - 1)) + b"\r\n" for line in lines)


def _fields(fields: Sequence[str]) -> bytes:
    return "".join(_folded(field) + "\r\n" for field in fields).encode("utf-8")


def _folded(field: str) -> str:
    """``field`` folded at its spaces into lines of at most 78 octets where they allow, never over 998.

    A run of more than 997 octets without a space (a hostile upstream's reply) is cut too, which
    adds a space to it when unfolded: better than a line a server may refuse or truncate.
    """
    pieces = [
        piece.decode("utf-8")
        for word in field.split(" ")
        if word
        for piece in _cut(word.encode("utf-8"), _HARD - 1)
    ]
    lines = [pieces[0]]
    for piece in pieces[1:]:
        if len(lines[-1].encode("utf-8")) + 1 + len(piece.encode("utf-8")) <= _SOFT:
            lines[-1] += " " + piece
        else:
            lines.append(piece)
    return "\r\n ".join(lines)


def _cut(data: bytes, limit: int) -> list[bytes]:
    """``data`` in pieces of at most ``limit`` octets, not splitting a UTF-8 sequence if it can help it."""
    pieces = []
    while len(data) > limit:
        cut = limit
        while cut > 0 and data[cut] & 0xC0 == 0x80:
            cut -= 1
        cut = cut or limit
        pieces.append(data[:cut])
        data = data[cut:]
    return pieces + [data]


def _boundary(content: bytes) -> str:
    # "=_" cannot occur in quoted-printable text; random, and checked, it occurs nowhere in the parts.
    while True:
        boundary = f"=_{secrets.token_hex(12)}"
        if boundary.encode("ascii") not in content:
            return boundary
