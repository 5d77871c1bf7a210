"""CRLF line framing with a hard length limit, for both sides: client commands and upstream replies.

Memory stays bounded whatever a peer sends: a line that outgrows the limit is dropped as it
arrives, and only the fact that it was too long survives until its CRLF.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TooLong:
    """A line was longer than the limit; ``start`` holds its first octets (enough to name the verb)."""

    start: bytes


class LineBuffer:
    def __init__(self, max_length: int) -> None:
        """``max_length`` counts the CRLF, as RFC 5321 4.5.3.1 does."""
        self._limit = max_length - 2
        self._buffer = b""
        self._skipping: bytes | None = None

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def take(self) -> bytes:
        """Everything buffered and not yet framed (the bytes after DATA's 354 are body, not lines)."""
        data, self._buffer = self._buffer, b""
        return data

    def clear(self) -> None:
        """Forget what is buffered (RFC 3207 4.2: plaintext that followed STARTTLS)."""
        self._buffer = b""
        self._skipping = None

    def __len__(self) -> int:
        return len(self._buffer)

    @property
    def partial(self) -> bool:
        """Bytes of a line that has not ended yet (a reply begun, a command half sent)."""
        return bool(self._buffer) or self._skipping is not None

    @property
    def overflowing(self) -> bool:
        """The current line is already too long, though its end has not come."""
        return self._skipping is not None

    def next_line(self) -> bytes | TooLong | None:
        """The next complete line without its CRLF, TooLong at the end of an over-long one, or None."""
        end = self._buffer.find(b"\r\n")
        if self._skipping is not None:
            if end < 0:
                # Keep a trailing CR: it may be the first half of the CRLF we are looking for.
                self._buffer = self._buffer[-1:] if self._buffer.endswith(b"\r") else b""
                return None
            start, self._skipping = self._skipping, None
            self._buffer = self._buffer[end + 2 :]
            return TooLong(start)
        if end < 0:
            if len(self._buffer) > self._limit + 1:
                self._skipping = self._buffer[:16]
                self._buffer = self._buffer[-1:] if self._buffer.endswith(b"\r") else b""
            return None
        if end > self._limit:
            start = self._buffer[:16]
            self._buffer = self._buffer[end + 2 :]
            return TooLong(start)
        line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
        return line
