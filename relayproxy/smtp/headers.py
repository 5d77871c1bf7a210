"""The header From of a streaming message: who it claims to be from, and rewriting it (providers
refuse a From that is not theirs).

Only the header block is held, up to a bound; the body streams past unchanged. Input and output
are the wire form BodyDecoder produces: CRLF line ends, dot-stuffed lines.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from email.utils import getaddresses

_END_OF_HEADER = b"\r\n\r\n"
_FROM = re.compile(rb"^from[ \t]*:", re.IGNORECASE)
_REPLY_TO = re.compile(rb"^reply-to[ \t]*:", re.IGNORECASE)
_SENDERS = re.compile(rb"^(?:from|sender)[ \t]*:", re.IGNORECASE)


class HeaderTooLong(Exception):
    """The header block grew past the bound before its end was seen."""


class FromRewriter:
    """Replaces the header From with ``header_from``; the original becomes Reply-To if there is none."""

    def __init__(self, header_from: str, max_header: int) -> None:
        self._from = header_from.encode("utf-8")
        self._max = max_header
        self._held = b""
        self._passing = False

    def feed(self, data: bytes) -> bytes:
        if self._passing:
            return data
        self._held += data
        if self._held.startswith(b"\r\n"):
            # No header block at all: the message starts with its body.
            return self._release(b"", self._held)
        end = self._held.find(_END_OF_HEADER)
        # The same limit whether the end arrived in this chunk or is still to come.
        if (end if end >= 0 else len(self._held)) > self._max:
            raise HeaderTooLong()
        if end < 0:
            return b""
        return self._release(self._held[: end + 2], self._held[end + 2 :])

    def finish(self) -> bytes:
        """At end of data: a message that is all header (no blank line) is still rewritten."""
        if self._passing:
            return b""
        if self._held and not self._held.endswith(b"\r\n"):
            self._held += b"\r\n"
        return self._release(self._held, b"")

    def _release(self, header: bytes, rest: bytes) -> bytes:
        self._passing = True
        self._held = b""
        return self._rewrite(header) + rest

    def _rewrite(self, header: bytes) -> bytes:
        fields = header_fields(header)
        has_reply_to = any(_REPLY_TO.match(f) for f in fields)
        replacement = [b"From: " + self._from]
        out: list[bytes] = []
        for field in fields:
            if not _FROM.match(field):
                out.append(field)
            elif replacement:
                if not has_reply_to:
                    replacement.append(b"Reply-To: " + field.split(b":", 1)[1].strip(b" \t"))
                out.extend(replacement)
                replacement = []
        # A message without a From gets one at the top; a second From is dropped with the first.
        return b"".join(f + b"\r\n" for f in replacement + out)


def header_fields(header: bytes) -> list[bytes]:
    """The header block's fields, folded lines joined to their field (RFC 5322 2.2.3)."""
    fields: list[bytes] = []
    for line in header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        elif line:
            fields.append(line)
    return fields


class HeaderSenders:
    """Reads, without holding the stream up, the addresses a message's From and Sender fields name."""

    def __init__(self, max_header: int) -> None:
        self._max = max_header
        self._held = b""
        self.addresses: list[str] | None = None
        """Set once the header block is complete: every address of every From and Sender field."""

    def feed(self, data: bytes) -> None:
        """Raises HeaderTooLong when the block passes the bound before its end."""
        if self.addresses is not None:
            return
        self._held += data
        end = 0 if self._held.startswith(b"\r\n") else self._held.find(_END_OF_HEADER)
        if (end if end >= 0 else len(self._held)) > self._max:
            raise HeaderTooLong()
        if end >= 0:
            self._read(self._held[:end])

    def finish(self) -> None:
        """At end of data: a message that is all header still has its senders read."""
        if self.addresses is None:
            self._read(self._held)

    def _read(self, header: bytes) -> None:
        self._held = b""
        values = [
            field.split(b":", 1)[1].replace(b"\r\n", b"").decode("utf-8", "replace")
            for field in header_fields(header) if _SENDERS.match(field)
        ]
        # An unparseable field yields an empty address, which no allowed sender matches.
        self.addresses = [address for _, address in getaddresses(values)] if values else []


class HeaderFilter:
    """What happens to a message's header block as its body streams: its From and Sender checked with
    ``may_send``, its From rewritten to ``header_from``; each holds at most ``max_header`` octets."""

    def __init__(self, max_header: int, header_from: str | None, may_send: Callable[[str], bool] | None) -> None:
        self._rewriter = FromRewriter(header_from, max_header) if header_from is not None else None
        self._senders = HeaderSenders(max_header) if may_send is not None else None
        self._may_send = may_send
        self.too_long = False
        """The header block passed max_header before its end."""
        self.foreign: str | None = None
        """The From or Sender addresses ``may_send`` refused ("no From" when there is none)."""

    @property
    def refused(self) -> bool:
        return self.too_long or self.foreign is not None

    def feed(self, data: bytes, last: bool = False) -> bytes:
        """What to send on of ``data`` (at the end of data with ``last``); b"" once refused."""
        if self.refused:
            return b""
        try:
            if self._senders is not None:
                self._senders.feed(data)
                if last:
                    self._senders.finish()
                self._check()
            if self._rewriter is not None:
                data = self._rewriter.feed(data) + (self._rewriter.finish() if last else b"")
        except HeaderTooLong:
            self.too_long = True
        return b"" if self.refused else data

    def _check(self) -> None:
        senders, may_send = self._senders, self._may_send
        if senders is None or senders.addresses is None or may_send is None:
            return
        self._senders = None
        refused = [address for address in senders.addresses if not may_send(address)]
        if refused or not senders.addresses:
            self.foreign = ", ".join(f"<{address}>" for address in refused) or "no From"


def header_block(start: bytes) -> bytes | None:
    """The header block at the start of a message, without the empty line; None if ``start`` ends first."""
    if start.startswith(b"\r\n"):
        return b""
    end = start.find(_END_OF_HEADER)
    return start[:end] if end >= 0 else None


def message_id(header: bytes) -> str | None:
    """The Message-ID field's value as one printable line, for the log; None without one."""
    for field in header_fields(header):
        name, colon, value = field.partition(b":")
        if colon and name.strip().lower() == b"message-id":
            text = value.replace(b"\r\n", b"").strip().decode("ascii", "replace")
            return "".join(c for c in text if c.isprintable())[:200] or None
    return None
