"""What the relay needs of an upstream, whatever carries the message on: a transaction, not a dialogue.

The relay checks each envelope command itself (syntax, sequence, allowed senders, budgets) and then
hands the ones that passed to an ``UpstreamSession`` in groups, streams the body, and relays the
verdict. How an upstream kind implements it:

- SMTP (relayproxy.upstream.smtp): a pooled, authenticated connection; ``envelope`` writes the
  group in one write when the upstream offers PIPELINING, else one command at a time, and returns
  the upstream's own replies; ``end`` sends the final dot and returns the upstream's verdict.
- An HTTP API (Microsoft Graph's sendMail): ``acquire`` gets a token for the mailbox; ``envelope``
  answers MAIL and RCPT itself (250: the API cannot check a recipient ahead) and answers DATA with
  354 only once it holds a valid token; ``body`` spools to a private temporary file (the pause
  producer is never paused); ``end`` makes the request and turns the API's answer into the verdict.
- The spool (relayproxy.spool.intake): ``envelope`` answers 250 and 354 itself; ``body`` writes the
  spool file; ``end`` answers 250 once the file and its directory entry are on disk, 4xx if that
  fails. For relay-then-spool it wraps the user's upstream session: the transaction goes there, the
  body to both, and what the upstream defers with a 4xx (or cannot take at all) is kept on disk.
  The spool's deliveries are clients of the same Upstream, with ``patient`` pacing.

Failures never raise out of ``envelope`` or ``end``: the replies carry the 4xx the client gets, and
``failure`` says what happened for the log. ``acquire`` raises UpstreamError.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from twisted.internet.interfaces import IPushProducer

from relayproxy.errors import UpstreamError
from relayproxy.smtp.envelope import EnvelopeCommand
from relayproxy.smtp.reply import Reply


class UpstreamSession(Protocol):
    """One client's transactions through one upstream, one at a time."""

    failure: UpstreamError | None
    """Set once the session failed (its replies carried the client's 4xx); it is not used again."""

    async def envelope(self, commands: Sequence[EnvelopeCommand]) -> list[Reply]:
        """One reply per command, in order; the last command may be DATA (354 starts the body)."""

    def body(self, data: bytes) -> None:
        """Wire-ready message text (CRLF line ends, dot-stuffed) after a 354."""

    def stream_from(self, producer: IPushProducer | None) -> None:
        """Pause ``producer`` while the upstream cannot take more body (None: the body is over)."""

    async def end(self, last: bytes) -> Reply:
        """The last message text and the end of data; the upstream's verdict, or the client's 4xx."""

    def abort(self) -> None:
        """Drop the transaction so that the message is never delivered (no final dot)."""

    def release(self) -> None:
        """The client is done with the session for now: keep it for later (a transaction still open
        is reset) or close it politely."""


class Upstream(Protocol):
    """One configured upstream account; hands out sessions."""

    async def acquire(self, client: object, *, patient: bool = False) -> UpstreamSession:
        """A session for ``client`` (a kept one if there is one); raises UpstreamError.

        Under the upstream's pacing (max_sessions, max_messages_per_minute) an impatient client (a
        pass-through one) waits at most pacing_timeout, for a session here and for a message slot
        at each MAIL, then gets 451 4.7.0; a patient one (a spool delivery) waits its turn."""

    def departed(self, client: object) -> None:
        """``client`` disconnected: nothing is kept for it any more."""

    def close_idle(self) -> None:
        """Shutting down: close whatever is kept."""
