"""Delivering what the spool holds, through each message's upstream, until it is done or too old.

Every ``scan_interval`` (and whenever a message was taken or an attempt ended) queue/ is read
again in a thread: the files are the truth, so a restart, ``relayproxy queue retry`` and ``delete``
need nothing else. A message is due at its envelope's ``next_attempt``; at most ``max_deliveries``
are in progress, and each upstream's pacing (max_sessions, max_messages_per_minute) makes them
wait their turn. After a 4xx (or an unreachable upstream) a recipient is tried again after
retry_initial seconds, doubling up to retry_max, or after the upstream's Retry-After if that is
later, until max_age; after a 5xx or max_age its sender gets a delivery status notification
(RFC 3464) through the same upstream, itself spooled, and the message goes to failed/.
"""

from __future__ import annotations

import re
import urllib.parse
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import IO, Any

from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from relayproxy.config import SpoolConfig, UpstreamConfig
from relayproxy.errors import UpstreamError
from relayproxy.logs import EventLog
from relayproxy.metrics import Metrics
from relayproxy.smtp.envelope import Data, EnvelopeCommand, Mail, Rcpt
from relayproxy.smtp.headers import header_block
from relayproxy.smtp.reply import Reply
from relayproxy.spool import dsn
from relayproxy.spool.store import Envelope, Spool, new_id
from relayproxy.upstream.interface import Upstream, UpstreamSession

log = EventLog("relayproxy.spool")

_CHUNK = 64 * 1024
_HEADER = 64 * 1024
"""Octets of a message's start read for the header its notification quotes."""
_ENHANCED = re.compile(r"^\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})\b")


@dataclass
class Attempt:
    """What one attempt made of a message's pending recipients."""

    delivered: list[str] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)
    bounced: list[tuple[str, str]] = field(default_factory=list)
    last: str = "-"
    """The reply (or error) that decided the attempt, for the log and the envelope."""
    retry_after: float = 0.0

    def verdict(self, recipients: list[str], reply: Reply, detail: str | None = None) -> None:
        text = detail or str(reply)
        self.last = text
        if reply.is_positive:
            self.delivered += recipients
        elif reply.is_temporary:
            self.deferred += recipients
            self.retry_after = max(self.retry_after, reply.retry_after or 0)
        else:
            self.bounced += [(r, text) for r in recipients]


class Deliveries:
    def __init__(
        self, reactor: Any, spool: Spool, config: SpoolConfig, hostname: str,
        upstreams: Callable[[], Mapping[str, Upstream]], metrics: Metrics,
    ) -> None:
        self._reactor = reactor
        self._spool = spool
        self.config = config
        self._hostname = hostname
        self._upstreams = upstreams
        self._metrics = metrics
        self._busy: dict[str, defer.Deferred[None]] = {}
        """Attempts in progress by message id."""
        self._sending: set[str] = set()
        """Those whose body is on its way: a shutdown lets them finish (within shutdown_grace)."""
        self._due: deque[str] = deque()
        """Due at the last read of queue/ (or taken since), not started yet: the next to start."""
        self._loop = task.LoopingCall(self.scan)
        self._loop.clock = reactor
        self._scanning: defer.Deferred[None] | None = None
        self._stopped = False
        self.idle: defer.Deferred[None] | None = None

    def _thread(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)

    @property
    def running(self) -> bool:
        return bool(self._loop.running)

    def start(self) -> None:
        self._stopped = False
        self._loop.start(self.config.scan_interval, now=True)

    def stop(self) -> defer.Deferred[None]:
        """No new attempt; those still waiting for a session or their turn stop (the message is
        tried again after the restart); fires once those sending are over too."""
        self._stopped = True
        if self._loop.running:
            self._loop.stop()
        for spool_id, attempt in list(self._busy.items()):
            if spool_id not in self._sending:
                attempt.cancel()
        if not self._busy:
            return defer.succeed(None)
        self.idle = defer.Deferred()
        return self.idle

    def force_stop(self) -> None:
        """shutdown_grace is over: what is still sending is cut off, never with a final dot after this."""
        for attempt in list(self._busy.values()):
            attempt.cancel()

    def taken(self, envelope: Envelope) -> None:
        """A message just committed: tried at once if it is due (delivery = "spool"), without
        reading queue/ again, which under load would cost a read of every envelope per message."""
        if envelope.next_attempt <= self._reactor.seconds():
            self._due.append(envelope.id)
            self._fill()

    def scan(self) -> None:
        """Read queue/ (unless a read is in progress): what is due, the gauges, corrupt files."""
        if self._stopped or self._scanning is not None:
            return
        self._scanning = defer.Deferred.fromCoroutine(self._scan())
        self._scanning.addErrback(lambda f: log.failure("spool scan failed", f))

    async def _scan(self) -> None:
        try:
            listing = await self._thread(self._spool.list)
        finally:
            self._scanning = None
        now = self._reactor.seconds()
        for name, why in listing.corrupt:
            log.error("spool file corrupt", file=name, reason=why, moved_to=str(self._spool.corrupt))
            self._metrics.spool_delivery("-", "corrupt")
        envelopes = listing.envelopes
        self._metrics.spool_state(len(envelopes), max((now - e.received for e in envelopes), default=0.0))
        due = sorted((e for e in envelopes if e.next_attempt <= now and e.id not in self._busy), key=lambda e: e.next_attempt)
        self._due = deque(e.id for e in due)
        self._fill()

    def _fill(self) -> None:
        while self._due and len(self._busy) < self.config.max_deliveries and not self._stopped:
            spool_id = self._due.popleft()
            if spool_id not in self._busy:
                attempt = defer.Deferred.fromCoroutine(self._deliver(spool_id))
                if not attempt.called:
                    self._busy[spool_id] = attempt
                attempt.addErrback(self._failed, spool_id)
                attempt.addBoth(self._done, spool_id)

    def _failed(self, failure: Failure, spool_id: str) -> None:
        if isinstance(failure.value, defer.CancelledError):
            log.info("spool attempt stopped for the shutdown", id=spool_id)
        else:
            log.failure("spool delivery failed", failure, id=spool_id)

    def _done(self, _: object, spool_id: str) -> None:
        self._busy.pop(spool_id, None)
        self._sending.discard(spool_id)
        if self._stopped:
            if not self._busy and self.idle is not None:
                idle, self.idle = self.idle, None
                idle.callback(None)
            return
        self._fill()

    async def _deliver(self, spool_id: str) -> None:
        taken: tuple[IO[bytes], Envelope] | None = await self._thread(self._spool.take, spool_id)
        if taken is None:
            return  # delivered, deleted, or held by `relayproxy queue` right now
        text, envelope = taken
        try:
            if envelope.next_attempt > self._reactor.seconds() or not envelope.pending:
                return
            upstream = self._upstreams().get(envelope.upstream)
            # Before the message goes: should the process die after the upstream's 250 and before
            # the file is removed, this line and the next attempt's show the Message-ID twice.
            log.info(
                "spool attempt", id=envelope.id, message_id=envelope.message_id or "-", upstream=envelope.upstream,
                attempt=envelope.attempts + 1, rcpts=len(envelope.pending),
            )
            attempt = Attempt()
            if upstream is None:
                attempt.deferred += envelope.pending
                attempt.last = f"upstream {envelope.upstream} is not in the configuration"
            else:
                await self._try(upstream, envelope, text, attempt)
            await self._record(envelope, attempt, text, upstream)
        finally:
            await self._thread(text.close)

    async def _try(self, upstream: Upstream, envelope: Envelope, text: IO[bytes], attempt: Attempt) -> None:
        pending = list(envelope.pending)
        client = object()
        try:
            # Patient: a spool delivery waits for the upstream's pacing however long it takes.
            session = await upstream.acquire(client, patient=True)
        except UpstreamError as e:
            attempt.verdict(pending, e.reply, e.detail)
            return
        try:
            mail = Mail(envelope.sender, envelope.size, envelope.eight_bit, envelope.smtputf8)
            commands: list[EnvelopeCommand] = [mail, *(Rcpt(r) for r in pending), Data()]
            replies = await session.envelope(commands)
            failure = session.failure.detail if session.failure is not None else None
            if not replies[0].is_positive:
                attempt.verdict(pending, replies[0], failure)
                return
            accepted = []
            for recipient, reply in zip(pending, replies[1:-1]):
                if reply.is_positive:
                    accepted.append(recipient)
                else:
                    attempt.verdict([recipient], reply, failure)
            if not accepted:
                return
            if replies[-1].code != 354:
                attempt.verdict(accepted, replies[-1], failure)
                return
            self._sending.add(envelope.id)
            await _stream(self._reactor, session, text)
            verdict = await session.end(b"")
            attempt.verdict(accepted, verdict, session.failure.detail if session.failure is not None else None)
        finally:
            session.release()
            # A kept connection is for whoever needs one next.
            upstream.departed(client)

    async def _record(self, envelope: Envelope, attempt: Attempt, text: IO[bytes], upstream: Upstream | None) -> None:
        now = self._reactor.seconds()
        config = self.config
        expired: list[tuple[str, str]] = []
        if attempt.deferred and now - envelope.received >= config.max_age:
            expired = [(r, attempt.last) for r in attempt.deferred]
            attempt.deferred = []
        log.info(
            "spool delivery", id=envelope.id, message_id=envelope.message_id or "-", user=envelope.user, upstream=envelope.upstream,
            attempt=envelope.attempts + 1, delivered=len(attempt.delivered), deferred=len(attempt.deferred),
            bounced=len(attempt.bounced), expired=len(expired), reply=attempt.last,
        )
        for outcome, count in (("delivered", len(attempt.delivered)), ("deferred", len(attempt.deferred)),
                               ("bounced", len(attempt.bounced)), ("expired", len(expired))):
            if count:
                self._metrics.spool_delivery(envelope.upstream, outcome, count)  # type: ignore[arg-type]
        if (attempt.bounced or expired) and envelope.sender and not envelope.notification:
            await self._notify(envelope, attempt.bounced, expired, text, upstream, now)
        bounced = envelope.bounced + tuple(attempt.bounced) + tuple(expired)
        if attempt.deferred:
            attempts = envelope.attempts + 1
            delay = max(min(config.retry_initial * 2 ** (attempts - 1), config.retry_max), attempt.retry_after)
            # The last attempt comes at max_age, not up to retry_max after it.
            later = min(now + delay, max(now, envelope.received + config.max_age))
            again = replace(envelope, pending=tuple(attempt.deferred), bounced=bounced, attempts=attempts, next_attempt=later, last_error=attempt.last)
            await self._thread(self._spool.update, again)
        elif bounced:
            done = replace(envelope, pending=(), bounced=bounced, attempts=envelope.attempts + 1, last_error=attempt.last)
            await self._thread(self._spool.give_up, done)
            log.warn("spool gave up", id=envelope.id, message_id=envelope.message_id or "-", user=envelope.user,
                     recipients=len(bounced), moved_to=str(self._spool.failed), notified=bool(envelope.sender) and not envelope.notification)
        else:
            await self._thread(self._spool.remove, envelope.id)

    async def _notify(
        self, envelope: Envelope, bounced: list[tuple[str, str]], expired: list[tuple[str, str]], text: IO[bytes],
        upstream: Upstream | None, now: float,
    ) -> None:
        """A delivery status notification to the sender, spooled as a message of its own."""
        remote = _remote(upstream)
        failures = [dsn.Failure(r, _status(why, "5.0.0"), why if why[:1].isdigit() else None, remote) for r, why in bounced]
        failures += [dsn.Failure(r, _status(why, "4.4.7") if why.startswith("5") else "4.4.7", why if why[:1].isdigit() else None, remote)
                     for r, why in expired]

        def start() -> bytes:
            text.seek(0)
            return text.read(_HEADER)

        header = header_block(await self._thread(start)) or b""
        try:
            message = dsn.notification(
                reporting_host=self._hostname, sender=envelope.sender, spool_id=envelope.id, arrival=envelope.received, now=now,
                failures=failures, expired=bool(expired), original_header=header, smtputf8=envelope.smtputf8,
                author=_author(upstream),
            )
        except ValueError as e:
            # Nothing that can be put in a notification (a sender it cannot be sent to): the message
            # still goes to failed/, and the log says why nobody was told.
            log.error("spool notification not possible", id=envelope.id, to=envelope.sender, reason=str(e))
            return
        wire = stuffed(message)
        notice = Envelope(
            id=new_id(now), user=envelope.user, upstream=envelope.upstream, sender="", recipients=(envelope.sender,),
            received=now, size=len(wire), message_id=None, smtputf8=envelope.smtputf8, pending=(envelope.sender,),
            next_attempt=now, notification=True, client="-", session=envelope.id,
        )

        def write() -> None:
            out = self._spool.open_new(notice.id)
            try:
                out.write(wire)
                self._spool.commit(out, notice)
            except OSError:
                self._spool.discard(notice.id, out)
                raise

        try:
            await self._thread(write)
        except OSError as e:
            log.error("spool notification not written", id=envelope.id, error=str(e))
            return
        log.info("spool notification", id=envelope.id, notification=notice.id, to=envelope.sender,
                 recipients=len(failures), expired=bool(expired))
        self.taken(notice)


async def _stream(reactor: Any, session: UpstreamSession, text: IO[bytes]) -> None:
    """The message file to the upstream a chunk at a time, read in a thread, paused with the upstream."""
    reader = _Reader()
    session.stream_from(reader)
    text.seek(0)
    while not reader.stopped:
        chunk: bytes = await threads.deferToThreadPool(reactor, reactor.getThreadPool(), text.read, _CHUNK)
        if chunk:
            session.body(chunk)
        if len(chunk) < _CHUNK:
            return  # a regular file reads short only at its end
        if reader.paused:
            await reader.resumed()


@implementer(IPushProducer)
class _Reader:
    def __init__(self) -> None:
        self.paused = False
        self.stopped = False
        self._waiting: defer.Deferred[None] | None = None

    def resumed(self) -> defer.Deferred[None]:
        self._waiting = defer.Deferred()
        return self._waiting

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)

    def stopProducing(self) -> None:
        self.stopped = True
        self.resumeProducing()


def stuffed(message: bytes) -> bytes:
    """Message text as SMTP carries it (RFC 5321 4.5.2): a line starting with "." gets another."""
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    return (b"." if message.startswith(b".") else b"") + message.replace(b"\r\n.", b"\r\n..")


def _status(reply: str, default: str) -> str:
    found = _ENHANCED.match(reply)
    return found.group(1) if found else default


def _author(upstream: Upstream | None) -> str | None:
    """The notification's From where the provider sends only as its account: Graph as the mailbox,
    an SMTP upstream with header_from as that."""
    config = getattr(upstream, "config", None)
    if not isinstance(config, UpstreamConfig):
        return None
    if config.kind == "graph":
        return f"Mail Delivery System <{config.username}>" if config.username else None
    return config.header_from


def _remote(upstream: Upstream | None) -> str | None:
    config = getattr(upstream, "config", None)
    if not isinstance(config, UpstreamConfig):
        return None
    if config.kind == "graph":
        return urllib.parse.urlsplit(config.graph_url).hostname
    return config.host or None
