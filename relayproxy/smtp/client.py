"""The upstream side of SMTP as a pure machine: replies framed strictly and matched, in order, to the
commands that asked for them, each checked against the codes that command may get.

A reply nobody asked for (an injection, a server out of step) or one that does not fit its command
(221 after the final dot, 250 to DATA, 354 to RCPT) means the upstream cannot be trusted with the
next command: the caller fails the session and never reuses it.
"""

from __future__ import annotations

from collections import deque

from relayproxy.smtp.lines import LineBuffer, TooLong
from relayproxy.smtp.reply import MAX_LINE, Reply, ReplyError, ReplyParser

FITTING: dict[str, frozenset[int]] = {
    "greeting": frozenset({220}),
    "EHLO": frozenset({250}),
    "STARTTLS": frozenset({220}),
    "AUTH": frozenset({235, 334}),
    "RSET": frozenset({250}),
    "MAIL": frozenset({250}),
    "RCPT": frozenset({250, 251}),
    "DATA": frozenset({354}),
    "end-of-data": frozenset({250}),
    "QUIT": frozenset({221}),
}
"""The positive codes each step may get (RFC 5321 4.3.2, RFC 3207, RFC 4954); any 4xx or 5xx fits every step."""


class Unsolicited(ReplyError):
    """A reply arrived while no command waited for one."""


class Unfitting(ReplyError):
    """A reply code the command cannot get."""


class ClientSession:
    def __init__(self) -> None:
        self._lines = LineBuffer(MAX_LINE)
        self._parser = ReplyParser()
        self._expected: deque[str] = deque(["greeting"])

    def command(self, step: str) -> None:
        """A command of ``step`` (a key of FITTING) is being sent: its reply comes after the others'."""
        self._expected.append(step)

    def feed(self, data: bytes) -> None:
        self._lines.feed(data)

    def next_reply(self) -> tuple[str, Reply] | None:
        """The next complete reply and the step it answers, or None until one is complete.

        One at a time, so the caller can act on a reply (start TLS after 220) before reading what
        followed it: bytes after the 220 to STARTTLS came in plaintext and must not be trusted.
        """
        while True:
            if self._lines.overflowing:
                raise ReplyError("reply line too long")
            line = self._lines.next_line()
            if line is None:
                return None
            if isinstance(line, TooLong):
                raise ReplyError("reply line too long")
            reply = self._parser.line(line)
            if reply is None:
                if not self._expected:
                    raise Unsolicited("a reply began while no command was waiting")
                continue
            if not self._expected:
                raise Unsolicited(f"reply {reply} while no command was waiting")
            step = self._expected.popleft()
            if reply.code < 400 and reply.code not in FITTING[step]:
                raise Unfitting(f"reply {reply} does not fit {step}")
            return step, reply

    @property
    def waiting(self) -> int:
        """Commands sent whose replies have not come."""
        return len(self._expected)

    @property
    def partial(self) -> bool:
        """Bytes that are not a complete reply yet, or a multi-line reply begun."""
        return self._lines.partial or self._parser.in_progress
