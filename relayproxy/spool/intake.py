"""Taking a client's message into the spool, as an Upstream the relay hands transactions to.

``delivery = "spool"``: the spool answers the envelope itself and 250 once the message is on disk.
``delivery = "relay-then-spool"``: the transaction goes to the user's upstream as always, and the
message is written to the spool alongside; what the upstream cannot take now (it cannot be
reached, times out, or answers 4xx to MAIL, a RCPT, DATA or the end of data) is kept, so the
client hears 250, and a 5xx still reaches the client as the upstream's own reply. A 250 means every
recipient that got a 250 was either accepted by the upstream or is on disk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

from twisted.internet import defer, threads
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from relayproxy.config import UserConfig
from relayproxy.errors import UpstreamError
from relayproxy.logs import EventLog
from relayproxy.smtp.envelope import Data, EnvelopeCommand, Mail, Rcpt
from relayproxy.smtp.headers import header_block, message_id
from relayproxy.smtp.reply import Catalogue, Reply
from relayproxy.spool.store import NO_SPACE, Envelope, Spool, new_id
from relayproxy.upstream.interface import Upstream, UpstreamSession

log = EventLog("relayproxy.spool")

_AHEAD = 256 * 1024
"""Octets held before they go to the disk (a small message goes in one write, with its commit);
twice this waiting pauses the client."""
_PEEK = 64 * 1024
"""Octets of the message's start kept to find its Message-ID."""

GO_AHEAD = Reply(354, ("End data with <CR><LF>.<CR><LF>",))


@dataclass(frozen=True)
class Origin:
    """Whose message it is, for the envelope file and the log."""

    user: str
    upstream: str
    client: str
    session: str


class Spooler:
    """The spool as the relay sees it: an Upstream for each user whose delivery uses it."""

    def __init__(self, reactor: Any, spool: Spool, retry_initial: float, taken: Callable[[Envelope], None]) -> None:
        self.reactor = reactor
        self.spool = spool
        self.retry_initial = retry_initial
        self.taken = taken
        """Called with each message once it is on disk: the deliveries take it from there."""

    def upstream_for(self, user: UserConfig, upstream: Upstream, origin: Origin) -> Upstream:
        """What the user's transactions go to: its upstream itself, or the spool (in front of it)."""
        if user.delivery == "relay":
            return upstream
        return _Intake(self, upstream if user.delivery == "relay-then-spool" else None, origin)


class _Intake:
    def __init__(self, spooler: Spooler, upstream: Upstream | None, origin: Origin) -> None:
        self._spooler = spooler
        self._upstream = upstream
        self._origin = origin

    async def acquire(self, client: object, *, patient: bool = False) -> IntakeSession:
        relay: UpstreamSession | None = None
        why = None
        if self._upstream is not None:
            try:
                relay = await self._upstream.acquire(client)
            except UpstreamError as e:
                if not e.reply.is_temporary:
                    raise
                why = e.detail
        return IntakeSession(self._spooler, self._origin, relay, why)

    def departed(self, client: object) -> None:
        if self._upstream is not None:
            self._upstream.departed(client)

    def close_idle(self) -> None:
        pass


class IntakeSession:
    """One transaction into the spool, relayed first when there is a relay session."""

    def __init__(self, spooler: Spooler, origin: Origin, relay: UpstreamSession | None, why: str | None) -> None:
        self._spooler = spooler
        self._origin = origin
        self._relay = relay
        self._why = why
        """Why the upstream did not take (all of) the message now: the spool's first attempt's error."""
        self._retry_after = 0
        """The upstream's Retry-After with that, in seconds (0: none)."""
        self._relaying = False
        """This transaction is with the upstream too."""
        self._mail: Mail | None = None
        self._relayed: list[str] = []
        self._deferred: list[str] = []
        self._writer: _Writer | None = None
        self.failure: UpstreamError | None = None
        self.spooled: str | None = None
        """The spool id, once the message is on disk."""

    async def envelope(self, commands: Sequence[EnvelopeCommand]) -> list[Reply]:
        if isinstance(commands[0], Mail):
            self._mail, self._relayed, self._deferred = commands[0], [], []
            self._relaying = self._relay is not None
        answers: list[Reply | None] = [None] * len(commands)
        if self._relaying:
            relay = self._relay
            assert relay is not None
            answers = list(await relay.envelope(commands))
            if relay.failure is not None:
                # The connection is gone (its replies are the client's 4xx): this transaction is the spool's.
                self._why, self._relay, self._relaying = relay.failure.detail, None, False
                answers = [None] * len(commands)
        replies: list[Reply] = []
        for command, answer in zip(commands, answers):
            if not self._relaying:
                # Left the upstream earlier in this group: its replies to the rest no longer count.
                answer = None
            if isinstance(command, Mail):
                if answer is not None and not answer.is_temporary:
                    if not answer.is_positive:
                        # Refused for good: the client hears it, and the rest of the group is read again after it.
                        self._mail = None
                        return [answer] + [Catalogue.MAIL_FIRST] * (len(commands) - 1)
                    replies.append(answer)
                    continue
                if answer is not None:
                    self._leave_relay(answer)
                replies.append(Catalogue.MAIL_OK)
            elif isinstance(command, Rcpt):
                replies.append(self._recipient(command.recipient, answer))
            else:
                replies.append(self._data(answer))
        return replies

    def _recipient(self, recipient: str, answer: Reply | None) -> Reply:
        if self._mail is None:
            return Catalogue.MAIL_FIRST
        if answer is None or answer.is_temporary:
            if answer is not None:
                self._deferred_by(answer)
            self._deferred.append(recipient)
            return Catalogue.RCPT_OK
        if answer.is_positive:
            self._relayed.append(recipient)
        return answer

    def _data(self, answer: Reply | None) -> Reply:
        if self._mail is None:
            return Catalogue.MAIL_FIRST
        if not self._relayed and not self._deferred:
            return answer if answer is not None else Catalogue.NO_VALID_RECIPIENTS
        if answer is not None and not self._relayed:
            # Every recipient is the spool's: the upstream's transaction is not needed.
            self._leave_relay(None)
        elif answer is not None and answer.code != 354:
            if not answer.is_temporary:
                return answer
            self._leave_relay(answer)
        self._writer = _Writer(self._spooler.reactor, self._spooler.spool, new_id(self._spooler.reactor.seconds()))
        return answer if answer is not None and self._relaying else GO_AHEAD

    def _leave_relay(self, answer: Reply | None) -> None:
        """The rest of the transaction is the spool's, the recipients the upstream accepted too."""
        if answer is not None:
            self._deferred_by(answer)
        self._deferred = self._relayed + self._deferred
        self._relayed = []
        if self._relaying and self._relay is not None:
            relay, self._relay = self._relay, None
            # In the body (a 354 with no recipient left for it) only closing keeps it undelivered.
            relay.release()
        self._relaying = False

    def _deferred_by(self, reply: Reply) -> None:
        self._why = str(reply)
        self._retry_after = max(self._retry_after, reply.retry_after or 0)

    def body(self, data: bytes) -> None:
        if self._relaying:
            assert self._relay is not None
            self._relay.body(data)
        if self._writer is not None:
            self._writer.write(data)

    def stream_from(self, producer: IPushProducer | None) -> None:
        if producer is None or not self._relaying:
            if self._relaying and self._relay is not None:
                self._relay.stream_from(None)
            if self._writer is not None:
                self._writer.stream_from(producer)
            return
        joint = _Joint(producer)
        assert self._relay is not None
        self._relay.stream_from(joint.share())
        if self._writer is not None:
            self._writer.stream_from(joint.share())

    async def end(self, last: bytes) -> Reply:
        writer, self._writer = self._writer, None
        assert writer is not None and self._mail is not None
        writer.write(last)
        writer.stream_from(None)
        if self._relaying:
            relay = self._relay
            assert relay is not None
            verdict = await relay.end(last)
            self._relaying = False
            if relay.failure is not None:
                self._why, self._relay = relay.failure.detail, None
            elif verdict.is_temporary:
                self._deferred_by(verdict)
            if not verdict.is_temporary:
                if verdict.is_positive and self._deferred:
                    refusal = await self._commit(writer, self._deferred)
                    return refusal or verdict
                writer.discard()
                return verdict
            recipients = self._relayed + self._deferred
        else:
            recipients = self._deferred
        return await self._commit(writer, recipients) or Catalogue.spooled(writer.id)

    async def _commit(self, writer: _Writer, recipients: list[str]) -> Reply | None:
        """On disk, or the 4xx the client gets."""
        mail, origin, now = self._mail, self._origin, self._spooler.reactor.seconds()
        assert mail is not None
        header = header_block(writer.start)
        first_try = self._why is None
        envelope = Envelope(
            id=writer.id, user=origin.user, upstream=origin.upstream, sender=mail.sender, recipients=tuple(recipients),
            received=now, size=writer.size, client=origin.client, session=origin.session,
            message_id=message_id(header) if header is not None else None, eight_bit=mail.eight_bit, smtputf8=mail.smtputf8,
            pending=tuple(recipients), attempts=0 if first_try else 1,
            next_attempt=now if first_try else now + max(self._spooler.retry_initial, self._retry_after), last_error=self._why,
        )
        refusal = await writer.commit(envelope)
        if refusal is None:
            self.spooled = writer.id
            log.info(
                "spooled", id=writer.id, session=origin.session, user=origin.user, upstream=origin.upstream,
                rcpts=len(recipients), size=writer.size, message_id=envelope.message_id or "-", why=self._why or "-",
            )
            self._spooler.taken(envelope)
        return refusal

    def abort(self) -> None:
        if self._relay is not None:
            self._relay.abort()
            self._relay = None
        self._relaying = False
        if self._writer is not None:
            self._writer.discard()
            self._writer = None

    def release(self) -> None:
        if self._writer is not None:
            self._writer.discard()
            self._writer = None
        if self._relay is not None:
            self._relay.release()
            self._relay = None


class _Writer:
    """One message being written to tmp/: in a thread, one write at a time; the client is paused
    while more than _AHEAD octets wait, so memory does not grow with the message."""

    def __init__(self, reactor: Any, spool: Spool, spool_id: str) -> None:
        self._reactor = reactor
        self._spool = spool
        self.id = spool_id
        self._file: IO[bytes] | None = None
        self._pending: list[bytes] = []
        self._held = 0
        self._writing: defer.Deferred[None] | None = None
        self._producer: IPushProducer | None = None
        self._paused = False
        self._discarded = False
        self.error: BaseException | None = None
        self.size = 0
        self.start = b""

    def _thread(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)

    def write(self, data: bytes) -> None:
        if self.error is not None or self._discarded or not data:
            return
        self.size += len(data)
        if len(self.start) < _PEEK:
            self.start += data[: _PEEK - len(self.start)]
        self._pending.append(data)
        self._held += len(data)
        if self._held < _AHEAD:
            return
        if self._writing is None:
            self._flush()
        elif self._held >= 2 * _AHEAD:
            self._pause(True)

    def stream_from(self, producer: IPushProducer | None) -> None:
        if producer is None and self._paused and self._producer is not None:
            self._producer.resumeProducing()
        self._producer, self._paused = producer, False

    def _pause(self, paused: bool) -> None:
        if self._producer is not None and paused != self._paused:
            self._paused = paused
            (self._producer.pauseProducing if paused else self._producer.resumeProducing)()

    def _flush(self) -> None:
        chunk, self._pending, self._held = b"".join(self._pending), [], 0
        self._writing = self._thread(self._write_chunk, chunk)
        self._writing.addCallbacks(self._written, self._failed)

    def _write_chunk(self, chunk: bytes) -> None:
        if self._file is None:
            self._file = self._spool.open_new(self.id)
        self._file.write(chunk)

    def _written(self, _: object) -> None:
        self._writing = None
        if self._discarded:
            self._thread(self._spool.discard, self.id, self._file)
            return
        if self._held >= _AHEAD:
            self._flush()
        if self._held < 2 * _AHEAD:
            self._pause(False)

    def _failed(self, failure: Failure) -> None:
        self._writing = None
        self.error = failure.value
        # What is left of the body is read and dropped: the client gets its 4xx at the end of data.
        self._pending, self._held = [], 0
        self._pause(False)
        if self._discarded:
            self._thread(self._spool.discard, self.id, self._file)

    async def commit(self, envelope: Envelope) -> Reply | None:
        while self._writing is not None:
            await self._writing
        rest, self._pending, self._held = b"".join(self._pending), [], 0
        if self.error is None:
            try:
                await self._thread(self._commit, rest, envelope)
                return None
            except Exception as e:
                self.error = e
        await self._thread(self._spool.discard, self.id, self._file)
        error = self.error
        full = isinstance(error, OSError) and error.errno in NO_SPACE
        log.error("spool write failed", id=self.id, user=envelope.user, error=str(error), directory=str(self._spool.directory))
        return Catalogue.SPOOL_FULL if full else Catalogue.SPOOL_FAILED

    def _commit(self, rest: bytes, envelope: Envelope) -> None:
        self._write_chunk(rest)
        assert self._file is not None
        self._spool.commit(self._file, envelope)

    def discard(self) -> None:
        if self._discarded:
            return
        self._discarded = True
        self._pending, self._held = [], 0
        self._pause(False)
        if self._writing is None:
            self._thread(self._spool.discard, self.id, self._file)


class _Joint:
    """The client's producer held by two: it reads only while neither the upstream nor the disk pauses it."""

    def __init__(self, producer: IPushProducer) -> None:
        self.producer = producer
        self._shares: list[_Share] = []
        self._paused = False

    def share(self) -> _Share:
        share = _Share(self)
        self._shares.append(share)
        return share

    def update(self) -> None:
        paused = any(share.paused for share in self._shares)
        if paused != self._paused:
            self._paused = paused
            (self.producer.pauseProducing if paused else self.producer.resumeProducing)()


@implementer(IPushProducer)
class _Share:
    def __init__(self, joint: _Joint) -> None:
        self._joint = joint
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True
        self._joint.update()

    def resumeProducing(self) -> None:
        self.paused = False
        self._joint.update()

    def stopProducing(self) -> None:
        self._joint.producer.stopProducing()
