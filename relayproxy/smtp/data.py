"""Message body framing between the client's DATA and the upstream's DATA, chunk by chunk.

SMTP smuggling (CVE-2023-51766 and friends) works when two parties disagree about where a body
ends. We end DATA only at the exact bytes CRLF "." CRLF (RFC 5321 4.1.1.4), and what we send on is
unambiguous for any reader: every line ends in CRLF (bare CR and bare LF become CRLF) and every line
that begins with a dot is dot-stuffed (RFC 5321 4.5.2). The work is done with bytes operations over
whole chunks, so the cost per message does not depend on how many lines it has.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

END_OF_DATA = b"\r\n.\r\n"
MAX_BODY_LINE = 998
"""RFC 5321 4.5.3.1.6: 1000 octets with the CRLF."""


class BodyFault(enum.Enum):
    """Why a body cannot be relayed; the rest of it is still read up to the real end of data."""

    TOO_BIG = "too big"
    HEADER_TOO_BIG = "header block too big to rewrite"
    LINE_TOO_LONG = "line too long"
    NUL = "NUL character"


@dataclass(frozen=True)
class Chunk:
    """What one call to ``BodyDecoder.feed`` produced.

    ``data`` is wire-ready for the upstream (without the final "." line). When ``done``, ``rest``
    holds the bytes the client sent after its end of data (pipelined commands).
    """

    data: bytes
    done: bool = False
    rest: bytes = b""


class BodyDecoder:
    def __init__(self, max_size: int) -> None:
        self._max_size = max_size
        self._pending = b""
        # The previous byte we consumed was the LF of a real CRLF (or DATA just started): a dot
        # here is the client's dot-stuffing, or the first byte of an end of data.
        self._after_crlf = True
        # The previous byte we emitted ended a line: a dot here must be stuffed on the way out.
        self._out_line_start = True
        self._line_length = 0
        self.size = 0
        self._faults: set[BodyFault] = set()

    def refuse(self, fault: BodyFault) -> None:
        """A fault found by whoever consumes our output; the rest is still read, not passed on."""
        self._faults.add(fault)

    @property
    def fault(self) -> BodyFault | None:
        """The one fault reported, by a fixed precedence so it does not depend on how input was split."""
        return next((f for f in BodyFault if f in self._faults), None)

    def feed(self, chunk: bytes) -> Chunk:
        data = self._pending + chunk if self._pending else chunk
        # Every end of data starts with a dot line; most chunks have none, and then one search suffices.
        dot_line = data.find(b"\r\n.")
        if self._after_crlf and data.startswith(b".\r\n"):
            found = end = 0
        elif dot_line < 0:
            found = end = -1
        else:
            found = data.find(END_OF_DATA, dot_line)
            end = found + 2 if found >= 0 else -1
        if end >= 0:
            out = self._convert(data[:end], dot_line < found)
            self._pending = b""
            return Chunk(out, True, data[end + 3 :])
        keep = self._holdback(data)
        self._pending = data[len(data) - keep :] if keep else b""
        return Chunk(self._convert(data[: len(data) - keep], 0 <= dot_line < len(data) - keep))

    def _holdback(self, data: bytes) -> int:
        """How many trailing bytes could still become an end of data (or a CRLF) with more input."""
        if self._after_crlf and data in (b".", b".\r"):
            return len(data)
        for k in (4, 3, 2, 1):
            if data.endswith(END_OF_DATA[:k]):
                return k
        return 0

    def _convert(self, raw: bytes, dot_line: bool) -> bytes:
        """``raw`` as the upstream gets it; ``dot_line``: it may contain CRLF and a dot."""
        if not raw:
            return b""
        self.size += len(raw)
        if self.size > self._max_size:
            self._faults.add(BodyFault.TOO_BIG)
        if b"\x00" in raw:
            self._faults.add(BodyFault.NUL)
        # Most bodies are already what we send: CRLF line ends only, no line starting with a dot.
        # Then the chunk goes on as it is, after a few byte counts instead of six copies. The
        # holdback in feed() guarantees a chunk never ends between a CR and its LF.
        if not dot_line and not raw.startswith(b".") and raw.count(b"\n") == raw.count(b"\r\n") == raw.count(b"\r"):
            self._after_crlf = self._out_line_start = raw.endswith(b"\r\n")
            self._check_line_lengths(raw, b"\r\n")
            return b"" if self._faults else raw
        # Undo the client's dot-stuffing: only lines that started after a real CRLF were stuffed.
        body = raw.replace(b"\r\n.", b"\r\n")
        if self._after_crlf and body.startswith(b"."):
            body = body[1:]
        self._after_crlf = raw.endswith(b"\r\n")
        body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        self._check_line_lengths(body, b"\n")
        if self._faults:
            return b""
        body = body.replace(b"\n.", b"\n..")
        if self._out_line_start and body.startswith(b"."):
            body = b"." + body
        self._out_line_start = body.endswith(b"\n")
        return body.replace(b"\n", b"\r\n")

    def _check_line_lengths(self, body: bytes, line_end: bytes) -> None:
        """Track the longest line in ``body``, whose lines end in ``line_end`` (and nothing else)."""
        first = body.find(line_end)
        if first < 0:
            self._line_length += len(body)
        else:
            self._line_length_seen(self._line_length + first)
            last = body.rfind(line_end)
            if _has_long_line(body, first + len(line_end), last + len(line_end) - 1, len(line_end)):
                self._faults.add(BodyFault.LINE_TOO_LONG)
            self._line_length = len(body) - last - len(line_end)
        self._line_length_seen(self._line_length)

    def _line_length_seen(self, length: int) -> None:
        if length > MAX_BODY_LINE:
            self._faults.add(BodyFault.LINE_TOO_LONG)


def _has_long_line(body: bytes, start: int, end: int, end_length: int) -> bool:
    """Whether a line in body[start:end + 1] (whole lines, each ending in a line end of ``end_length``
    octets) is longer than MAX_BODY_LINE. Looks at one window per MAX_BODY_LINE octets, not at
    every line: the last line end within each window is where the next window starts."""
    window = MAX_BODY_LINE + end_length
    position = start
    while end - position >= window:
        found = body.rfind(b"\n", position, position + window)
        if found < 0:
            return True
        position = found + 1
    return False
