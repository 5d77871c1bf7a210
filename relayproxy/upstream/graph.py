"""Microsoft Graph as an Upstream: each message goes out with the sending mailbox's sendMail.

The same promises as for SMTP: RCPT gets the proxy's own 250 (Graph cannot check a recipient
ahead), the client sees 354 only once the proxy holds a valid token for the mailbox, and the reply
to the final dot is Graph's own verdict (relayproxy.graphmail.verdict), never 250 before Graph's
202. The body is held in a small buffer, then in a private temporary file, so memory does not grow
with message size; file writes run in a thread while the client is paused.
"""

from __future__ import annotations

import base64
import tempfile
from collections.abc import Sequence
from typing import IO, Any

import treq
from twisted.internet import defer, threads
from twisted.internet.interfaces import IPushProducer
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.http_headers import Headers

from relayproxy.config import UpstreamConfig
from relayproxy.errors import UpstreamError
from relayproxy.graphmail import Unstuffer, fit_recipients, verdict
from relayproxy.logs import EventLog
from relayproxy.oauth import TokenError, TokenSource
from relayproxy.smtp.envelope import Data, EnvelopeCommand, Mail, Rcpt
from relayproxy.smtp.reply import Catalogue, Reply
from relayproxy.trust import trust_root

log = EventLog("relayproxy.upstream")

MAX_REQUEST = 4 * 1024 * 1024
"""Graph's limit on a request's size: the MIME message goes base64-encoded (4/3 of its size)."""
_MAX_MIME = MAX_REQUEST * 3 // 4 - 1024
_MEMORY = 256 * 1024
"""Body bytes held in memory before they go to a temporary file."""
_MAX_ANSWER = 64 * 1024
GO_AHEAD = Reply(354, ("End data with <CR><LF>.<CR><LF>",))


class _Spool:
    """The message text: in memory while small, else in an unlinked 0600 temporary file."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._memory: list[bytes] = []
        self._held = 0
        self._file: IO[bytes] | None = None
        self._writing: defer.Deferred[None] | None = None
        self.size = 0

    def write(self, data: bytes, producer: IPushProducer | None) -> None:
        self.size += len(data)
        self._memory.append(data)
        self._held += len(data)
        if self._held >= _MEMORY and self._writing is None:
            self._spill(producer)

    def _spill(self, producer: IPushProducer | None) -> None:
        chunk, self._memory, self._held = b"".join(self._memory), [], 0
        if producer is not None:
            # The client waits while the disk takes the chunk: memory stays at one chunk.
            producer.pauseProducing()

        def write() -> None:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="relayproxy-")
            self._file.write(chunk)

        self._writing = threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), write)

        def written(result: object) -> object:
            self._writing = None
            if producer is not None:
                producer.resumeProducing()
            if self._held >= _MEMORY:
                self._spill(producer)
            return result

        self._writing.addBoth(written)

    async def read(self) -> bytes:
        """All of it, once no write is pending (the caller bounds the size first)."""
        while self._writing is not None:
            await self._writing
        head = b""
        if self._file is not None:
            spooled = self._file

            def read() -> bytes:
                spooled.seek(0)
                return spooled.read()

            head = await threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), read)
        return head + b"".join(self._memory)

    def discard(self) -> None:
        self._memory, self._held = [], 0
        if self._file is not None:
            # Unlinked at creation; closing frees it on disk.
            self._file.close()
            self._file = None


class GraphUpstream:
    """One mailbox sending through Microsoft Graph; its token is shared by every session."""

    def __init__(self, reactor: Any, config: UpstreamConfig, tokens: TokenSource | None = None) -> None:
        self.config = config
        self.reactor = reactor
        self.tokens = tokens or TokenSource(reactor, config)
        trust = trust_root(config.ca_file)
        pool = HTTPConnectionPool(reactor)  # type: ignore[no-untyped-call]
        # Graph allows 4 concurrent requests per mailbox; more would only be throttled.
        pool.maxPersistentPerHost = 4
        agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trust), pool=pool)  # type: ignore[no-untyped-call]
        self.http = treq.client.HTTPClient(agent)
        self.url = f"{config.graph_url.rstrip('/')}/users/{config.username}/sendMail"

    async def acquire(self, client: object) -> GraphSession:
        return GraphSession(self)

    def departed(self, client: object) -> None:
        pass

    def close_idle(self) -> None:
        pass


class GraphSession:
    def __init__(self, upstream: GraphUpstream) -> None:
        self._upstream = upstream
        self._recipients: list[str] = []
        self._spool: _Spool | None = None
        self._unstuffer = Unstuffer()
        self._producer: IPushProducer | None = None
        self.failure: UpstreamError | None = None

    async def envelope(self, commands: Sequence[EnvelopeCommand]) -> list[Reply]:
        replies = []
        for command in commands:
            if isinstance(command, Mail):
                # The sender is the mailbox's: Graph sends as the user of the URL, whatever MAIL said.
                self._recipients = []
                replies.append(Catalogue.OK)
            elif isinstance(command, Rcpt):
                self._recipients.append(command.recipient)
                replies.append(Catalogue.OK)
            else:
                assert isinstance(command, Data)
                replies.append(await self._ready())
        return replies

    async def _ready(self) -> Reply:
        """354 only with a token that Graph will take: later there is no asking the client again."""
        try:
            await self._upstream.tokens.token()
        except TokenError as e:
            self.failure = UpstreamError(Catalogue.upstream_token_failed(self._upstream.config.name), e.detail, step="DATA")
            return self.failure.reply
        self._spool = _Spool(self._upstream.reactor)
        self._unstuffer = Unstuffer()
        return GO_AHEAD

    def body(self, data: bytes) -> None:
        if self._spool is not None and self._spool.size <= _MAX_MIME:
            self._spool.write(self._unstuffer.feed(data), self._producer)

    def stream_from(self, producer: IPushProducer | None) -> None:
        self._producer = producer

    async def end(self, last: bytes) -> Reply:
        self.body(last)
        spool, self._spool = self._spool, None
        assert spool is not None
        try:
            if spool.size > _MAX_MIME:
                return Catalogue.graph_too_big(self._upstream.config.name)
            message = fit_recipients(await spool.read(), self._recipients)
        finally:
            spool.discard()
        return await self._send(message)

    async def _send(self, message: bytes) -> Reply:
        upstream, cfg = self._upstream, self._upstream.config
        body = base64.b64encode(message)
        for attempt in (1, 2):
            try:
                token = await upstream.tokens.token()
            except TokenError as e:
                self.failure = UpstreamError(Catalogue.upstream_token_failed(cfg.name), e.detail, step="end-of-data")
                return self.failure.reply
            try:
                response = await upstream.http.post(
                    upstream.url, data=body, timeout=cfg.data_timeout,
                    headers=Headers({"Authorization": [f"Bearer {token}"], "Content-Type": ["text/plain"], "User-Agent": ["relayproxy"]}),
                )
                answer = await treq.content(response)
            except defer.CancelledError:
                self.failure = UpstreamError(Catalogue.UPSTREAM_TIMEOUT, f"upstream {cfg.name}: Graph did not answer sendMail within {cfg.data_timeout:g} s", step="end-of-data")
                return self.failure.reply
            except Exception as e:
                self.failure = UpstreamError(
                    Catalogue.upstream_unreachable(cfg.name), f"upstream {cfg.name}: sendMail failed: {type(e).__name__} {e}"[:300], step="end-of-data"
                )
                return self.failure.reply
            if response.code == 401 and attempt == 1:
                # A token revoked before its expiry: one fresh one.
                upstream.tokens.invalidate(token)
                continue
            break
        headers = {name.decode("latin-1").lower(): values[-1].decode("latin-1") for name, values in response.headers.getAllRawHeaders()}
        reply = verdict(response.code, headers, answer[:_MAX_ANSWER], cfg.name)
        if not reply.is_positive:
            log.info("graph refused", upstream=cfg.name, status=response.code, request=headers.get("request-id", "-"), answer=answer[:300])
        return reply

    def abort(self) -> None:
        if self._spool is not None:
            self._spool.discard()
            self._spool = None

    def release(self) -> None:
        self.abort()
