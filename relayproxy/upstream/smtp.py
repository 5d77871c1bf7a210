"""An SMTP smarthost as an Upstream: pooled connections, envelope groups pipelined (RFC 2920)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer, IStreamClientEndpoint
from twisted.python.failure import Failure

from relayproxy.config import UpstreamConfig
from relayproxy.errors import UpstreamError
from relayproxy.logs import EventLog
from relayproxy.metrics import Metrics
from relayproxy.smtp.envelope import Data, EnvelopeCommand, Mail, Rcpt
from relayproxy.smtp.reply import Catalogue, Reply
from relayproxy.upstream.connector import Connection, Connector
from relayproxy.upstream.failures import exchange_failed
from relayproxy.upstream.pacing import Pacer, Paced
from relayproxy.upstream.pool import Pool
from relayproxy.upstream.protocol import EXCHANGE_FAILURES

log = EventLog("relayproxy.upstream")


class SMTPUpstream:
    """One SMTP upstream account: its connector and its pool."""

    def __init__(
        self, reactor: Any, config: UpstreamConfig, local_hostname: str, metrics: Metrics | None = None,
        endpoint: Callable[[str, int], IStreamClientEndpoint] | None = None,
    ) -> None:
        self.config = config
        self.connector = Connector(reactor, config, local_hostname, metrics, endpoint)
        self.pool = Pool(reactor, config)
        self.pacer = Pacer(reactor, config.name, config.max_sessions, config.max_messages_per_minute, config.pacing_timeout)

    async def acquire(self, client: object, *, patient: bool = False) -> SMTPSession:
        woken = False
        while True:
            # A kept connection first: under max_sessions it is one the provider already counts.
            connection = self.pool.take(client)
            if connection is not None:
                return SMTPSession(self, connection, patient)
            if self.pacer.take_session(woken):
                break
            await self.pacer.wait_session(patient)
            woken = True
        try:
            connection = await self.connector.open()
        except BaseException:
            self.pacer.session_ended()
            raise
        # It holds its session slot until it is gone.
        connection.protocol.on_lost = self.pacer.session_ended
        connection.client = client
        return SMTPSession(self, connection, patient)

    def returned(self, connection: Connection) -> None:
        self.pool.put(connection)
        # Kept, or closed: either way the first in line for a session may go on.
        self.pacer.session_free()

    def departed(self, client: object) -> None:
        self.pool.departed(client)

    def close_idle(self) -> None:
        self.pool.close_idle()


def _command(connection: Connection, command: EnvelopeCommand) -> tuple[str, bytes]:
    if isinstance(command, Mail):
        # envelope_from: the provider accepts only its account's address as the envelope sender.
        line = f"MAIL FROM:<{connection.config.envelope_from or command.sender}>"
        if command.size is not None and connection.supports("SIZE"):
            line += f" SIZE={command.size}"
        if command.eight_bit:
            line += " BODY=8BITMIME"
        if command.smtputf8:
            line += " SMTPUTF8"
        # UTF-8 addresses come only with SMTPUTF8, which _exchange sends only where it is offered.
        return "MAIL", line.encode("utf-8")
    if isinstance(command, Rcpt):
        return "RCPT", f"RCPT TO:<{command.recipient}>".encode("utf-8")
    return "DATA", b"DATA"


def _moot(failure: Failure) -> None:
    """A reply nobody will read failed; its error must not be logged as unhandled."""


class SMTPSession:
    def __init__(self, upstream: SMTPUpstream, connection: Connection, patient: bool = False) -> None:
        self._upstream = upstream
        self._connection = connection
        self._patient = patient
        self._in_body = False
        self._accepted = 0
        """Recipients the upstream accepted in the transaction in progress."""
        self.failure: UpstreamError | None = None

    async def envelope(self, commands: Sequence[EnvelopeCommand]) -> list[Reply]:
        connection = self._connection
        kept = connection.used and isinstance(commands[0], Mail)
        replies = await self._exchange(commands)
        stale = (self.failure is not None and self.failure.step in ("RSET", "MAIL")) or replies[0].code == 421
        if kept and stale:
            # A connection that already carried mail may have been closed by the upstream while
            # idle, or hit its messages-per-connection limit (421); MAIL changed nothing there, so
            # one retry on a fresh connection is safe.
            detail = self.failure.detail if self.failure is not None else str(replies[0])
            log.info("kept upstream session failed, reconnecting", upstream=connection.config.name, detail=detail)
            # The new connection takes over the old one's session slot.
            on_lost, connection.protocol.on_lost = connection.protocol.on_lost, None
            connection.abort()
            self.failure = None
            try:
                self._connection = await self._upstream.connector.open()
            except UpstreamError as e:
                if on_lost is not None:
                    on_lost()
                self.failure = e
                return [e.reply] * len(commands)
            self._connection.protocol.on_lost = on_lost
            self._connection.client = connection.client
            replies = await self._exchange(commands)
        return replies

    async def _exchange(self, commands: Sequence[EnvelopeCommand]) -> list[Reply]:
        connection, protocol = self._connection, self._connection.protocol
        timeout = connection.config.reply_timeout
        if isinstance(commands[0], Mail):
            if commands[0].eight_bit and not connection.supports("8BITMIME"):
                # Never sent unannounced (RFC 6152 3): the upstream may mangle the eighth bit.
                return [Catalogue.UPSTREAM_NO_8BIT] + [Catalogue.MAIL_FIRST] * (len(commands) - 1)
            if commands[0].smtputf8 and not connection.supports("SMTPUTF8"):
                # RFC 6531 3.2: no downgrade; UTF-8 addresses or header fields would be refused or mangled there.
                return [Catalogue.upstream_no_smtputf8(connection.config.name)] + [Catalogue.MAIL_FIRST] * (len(commands) - 1)
            pacer = self._upstream.pacer
            if pacer.max_per_minute is not None:
                try:
                    await pacer.message(self._patient)
                except Paced as e:
                    return [e.reply] + [Catalogue.MAIL_FIRST] * (len(commands) - 1)
            if not connection.usable:
                # It went while the transaction waited its turn: the retry on a fresh one follows.
                self._fail(UpstreamError(Catalogue.UPSTREAM_LOST, f"upstream {connection.config.name}: closed while paced", step="MAIL"))
                return [Catalogue.UPSTREAM_LOST] * len(commands)
            connection.used = True
            self._accepted = 0
        lines = [_command(connection, command) for command in commands]
        resets = [connection.reset_reply] if connection.reset_reply is not None else []
        connection.reset_reply = None
        owes, connection.owes_reset = connection.owes_reset, False
        waiters: list[defer.Deferred[Reply]] = []
        replies: list[Reply] = []
        step = "RSET"
        try:
            if connection.supports("PIPELINING"):
                # RFC 2920: the RSET a kept connection owes and the whole group in one write.
                waiters = protocol.send(([("RSET", b"RSET")] if owes else []) + lines, timeout)
                for reset in resets + waiters[:owes]:
                    self._check_reset(await reset)
                for command, (step, _), waiter in zip(commands, lines, waiters[owes:]):
                    replies.append(self._account(command, await waiter))
            else:
                for reset in resets:
                    self._check_reset(await reset)
                if owes:
                    self._check_reset(await protocol.command("RSET", b"RSET", timeout))
                for command, (step, line) in zip(commands, lines):
                    refusal = self._needless(command)
                    replies.append(refusal or self._account(command, await protocol.command(step, line, timeout)))
        except UpstreamError as e:
            self._fail(e)
        except EXCHANGE_FAILURES as e:
            self._fail(exchange_failed(connection.config.name, step, e))
        finally:
            for waiter in waiters:
                waiter.addErrback(_moot)
        if self.failure is not None:
            replies += [self.failure.reply] * (len(commands) - len(replies))
        return replies

    def _account(self, command: EnvelopeCommand, reply: Reply) -> Reply:
        """Note what the upstream's reply to ``command`` changed."""
        if isinstance(command, Mail):
            self._connection.in_transaction = reply.is_positive
        elif isinstance(command, Rcpt):
            self._accepted += reply.is_positive
        elif reply.code == 354:
            self._in_body = True
        return reply

    def _needless(self, command: EnvelopeCommand) -> Reply | None:
        """Without PIPELINING, a command the upstream would refuse anyway is answered here, saving its round trip."""
        if isinstance(command, Mail):
            return None
        if not self._connection.in_transaction:
            return Catalogue.MAIL_FIRST
        if isinstance(command, Data) and self._accepted == 0:
            return Catalogue.NO_VALID_RECIPIENTS
        return None

    def _check_reset(self, reply: Reply | None) -> None:
        if reply is None or not reply.is_positive:
            name = self._connection.config.name
            raise UpstreamError(Catalogue.UPSTREAM_BAD_REPLY, f"upstream {name}: kept session refused RSET: {reply}", step="RSET")

    def _fail(self, error: UpstreamError) -> None:
        self.failure = error
        self._connection.abort()

    def body(self, data: bytes) -> None:
        self._connection.protocol.write(data)

    def stream_from(self, producer: IPushProducer | None) -> None:
        protocol = self._connection.protocol
        if producer is not None:
            protocol.transport.registerProducer(producer, True)  # type: ignore[union-attr]
        elif protocol.connected:
            protocol.transport.unregisterProducer()  # type: ignore[union-attr]

    async def end(self, last: bytes) -> Reply:
        connection = self._connection
        self.stream_from(None)
        self._in_body = False
        connection.in_transaction = False
        connection.messages += 1
        # The last body bytes and the dot go in one write: one segment, no delayed-ACK stall.
        (waiter,) = connection.protocol.send([("end-of-data", last + b".")], connection.config.data_timeout)
        try:
            return await waiter
        except EXCHANGE_FAILURES as e:
            self._fail(exchange_failed(connection.config.name, "end-of-data", e))
            assert self.failure is not None
            return self.failure.reply

    def abort(self) -> None:
        self._connection.abort()

    def release(self) -> None:
        connection = self._connection
        if self._in_body or not connection.usable:
            # Closing without the final dot is the only way to be sure a partial body is never delivered.
            connection.abort()
            return
        if connection.in_transaction:
            # Left mid-envelope: the upstream forgets the transaction now, not when it times out.
            connection.in_transaction = False
            (waiter,) = connection.protocol.send([("RSET", b"RSET")], connection.config.reply_timeout)
            connection.reset_reply = waiter.addErrback(_moot)
        self._upstream.returned(connection)
