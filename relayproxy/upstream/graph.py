"""Microsoft Graph as an Upstream: each message goes out with the sending mailbox's sendMail.

The same promises as for SMTP: RCPT gets the proxy's own 250 (Graph cannot check a recipient
ahead), the client sees 354 only once the proxy holds a valid token for the mailbox, and the reply
to the final dot is Graph's own verdict (relayproxy.graphmail.verdict), never 250 before Graph's
202. The body is held in a small buffer, then in a private temporary file, so memory does not grow
with message size; file writes run in a thread while the client is paused.

A message within Graph's 4 MB request limit goes as MIME to sendMail. A larger one goes as a draft
[user-post-messages, "Attach large files to Outlook messages", attachment-createuploadsession,
message-send]: its top-level parts other than large attachments as the draft's MIME, each large
attachment added to the draft on its own (an upload session from 3 MB, else one POST), then the
draft is sent. The spooled message is read in bounded chunks, never whole.

With ``save_to_sent = false`` every message goes as a draft (sendMail's MIME form always saves to
Sent Items; only its JSON form has saveToSentItems), marked with PidTagDeleteAfterSubmit before it
is sent [singlevaluelegacyextendedproperty-post-singlevalueextendedproperties; MS-OXOMSG 3.3.5.1.3:
a message with it set is deleted once sent].
"""

from __future__ import annotations

import base64
import binascii
import email.policy
import json
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from typing import IO, Any
from urllib.parse import quote

from twisted.internet import defer, threads
from twisted.internet.interfaces import IPushProducer
from twisted.web.client import HTTPConnectionPool

from relayproxy.config import UpstreamConfig
from relayproxy import https
from relayproxy.errors import UpstreamError
from relayproxy.graphmail import Unstuffer, fit_recipients, verdict
from relayproxy.logs import EventLog
from relayproxy.oauth import TokenError, TokenSource
from relayproxy.smtp.envelope import Data, EnvelopeCommand, Mail, Rcpt
from relayproxy.smtp.reply import Catalogue, Reply
from relayproxy.upstream.pacing import Pacer, Paced

log = EventLog("relayproxy.upstream")

MAX_REQUEST = 4 * 1024 * 1024
"""Graph's limit on a request's size: the MIME message goes base64-encoded (4/3 of its size)."""
_MAX_MIME = MAX_REQUEST * 3 // 4 - 1024
_MEMORY = 256 * 1024
"""Body bytes held in memory before they go to a temporary file."""
_MAX_ANSWER = 64 * 1024
_CHUNK = 1024 * 1024
"""What the large-message path reads of the spooled message at a time."""
_MAX_HEADER = 256 * 1024
"""A message header block (or a part's) longer than this is not looked into."""
_APART = 1024 * 1024
"""An attachment this large (as written) goes apart from the draft even when the draft could hold it."""
_UPLOAD_SESSION = 3 * 1024 * 1024
"""Attachments of this decoded size and more need an upload session; smaller ones one POST."""
DELETE_AFTER_SUBMIT = "Boolean 0x0E01000B"
"""PidTagDeleteAfterSubmit as a Graph extended property id: "{type} {proptag}", the proptag being the
whole 32-bit MAPI property tag as in Microsoft's example "String 0x4001001E" (id 0x0E01, PT_BOOLEAN
0x000B) [Outlook extended properties overview: id formats]."""
_UPLOAD_RANGE = 12 * 320 * 1024
"""Bytes per PUT of an upload session: a multiple of 320 KiB, under Graph's 4 MB per request."""
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

    async def settle(self) -> None:
        """Everything on disk, once no write is pending (for read_at)."""
        while self._writing is not None:
            await self._writing
        chunk, self._memory, self._held = b"".join(self._memory), [], 0

        def write() -> None:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="relayproxy-")
            self._file.write(chunk)
            self._file.flush()

        await threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), write)

    async def read_at(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer at the end), after settle."""
        spooled = self._file
        assert spooled is not None

        def read() -> bytes:
            spooled.seek(offset)
            return spooled.read(length)

        return await threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), read)

    async def chunks(self, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes ``start`` to ``end``, at most _CHUNK at a time."""
        while start < end:
            chunk = await self.read_at(start, min(_CHUNK, end - start))
            if not chunk:
                return
            start += len(chunk)
            yield chunk

    def discard(self) -> None:
        self._memory, self._held = [], 0
        if self._file is not None:
            # Unlinked at creation; closing frees it on disk.
            self._file.close()
            self._file = None


_BASE64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_NOT_BASE64 = bytes(b for b in range(256) if b not in _BASE64)


class _Base64Decoder:
    """Base64 decoded chunk by chunk as RFC 2045 6.8 reads it: what is outside the alphabet (line
    breaks) is ignored, padding ends the data; anything else malformed is a ValueError."""

    def __init__(self) -> None:
        self._held = b""
        self._ended = False

    def feed(self, data: bytes) -> bytes:
        data = self._held + data.translate(None, _NOT_BASE64)
        if self._ended and data:
            raise ValueError("base64 data after its padding")
        cut = len(data) - len(data) % 4
        self._held = data[cut:]
        self._ended = self._ended or data[cut - 1 : cut] == b"="
        return binascii.a2b_base64(data[:cut], strict_mode=True)

    def finish(self) -> None:
        if self._held:
            raise ValueError("base64 data cut short")


@dataclass(frozen=True)
class _Attachment:
    """A top-level part as a Graph fileAttachment: what Graph keeps of its MIME header."""

    name: str
    content_type: str
    inline: bool
    content_id: str | None
    base64: bool


@dataclass(frozen=True)
class _Part:
    """A top-level body part of the spooled message, by offsets in it."""

    start: int
    """Its first byte (its header's)."""
    end: int
    """Just past its last byte (the CRLF before the next delimiter belongs to the delimiter)."""
    content: int
    """Its content's first byte, after the blank line that ends its header."""
    attachment: _Attachment | None
    """Set when it may go to Graph apart from the draft."""


@dataclass(frozen=True)
class _Plan:
    """A message too large for one request: the draft's MIME, and the attachments added to it."""

    draft: bytes
    apart: list[tuple[_Part, _Attachment, int]]
    """Each with its decoded size."""


def _header(block: bytes) -> Message:
    return BytesHeaderParser(policy=email.policy.default).parsebytes(block)


def _as_attachment(header: Message) -> _Attachment | None:
    """The part as a file attachment, when Graph can take it as one without losing its content."""
    disposition = header.get_content_disposition()
    filename = header.get_filename()
    content_id = str(header.get("Content-ID", "")).strip().strip("<>") or None
    if disposition != "attachment" and not (disposition == "inline" and (filename or content_id)):
        return None
    encoding = str(header.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    # Quoted-printable (or anything unknown) stays in the draft, where Graph decodes it itself.
    if header.get_content_maintype() == "multipart" or encoding not in ("base64", "7bit", "8bit", "binary"):
        return None
    return _Attachment(filename or "attachment", header.get_content_type(), disposition == "inline", content_id, encoding == "base64")


async def _delimiters(spool: _Spool, start: int, boundary: bytes) -> list[tuple[int, int, bool]]:
    """The delimiter lines of ``boundary`` from ``start`` (RFC 2046 5.1.1): where each one's CRLF
    begins, where the line after it begins, and whether it closes the multipart."""
    needle = b"\r\n--" + boundary
    found: list[tuple[int, int, bool]] = []
    buffer, base, at = b"", start, 0
    while True:
        ended = base + len(buffer) >= spool.size
        hit = buffer.find(needle, at)
        if hit >= 0:
            eol = buffer.find(b"\r\n", hit + len(needle))
            # A line is at most 1000 octets: a longer "delimiter" is not one.
            if eol >= 0 or ended or len(buffer) - hit > 1000:
                tail = buffer[hit + len(needle) : eol if eol >= 0 else len(buffer)]
                close = tail.startswith(b"--")
                if not tail[2 if close else 0 :].strip(b" \t") and (eol >= 0 or ended):
                    found.append((base + hit, base + (eol + 2 if eol >= 0 else len(buffer)), close))
                    if close:
                        return found
                at = hit + len(needle)
                continue
            keep = hit
        elif ended:
            return found
        else:
            # A delimiter may straddle two chunks.
            keep = max(at, len(buffer) - len(needle) + 1)
        buffer, base, at = buffer[keep:], base + keep, 0
        buffer += await spool.read_at(base + len(buffer), _CHUNK)


async def _decoded(spool: _Spool, part: _Part, attachment: _Attachment, step: int) -> AsyncIterator[bytes]:
    """The attachment's content decoded, ``step`` bytes at a time (fewer at the end)."""
    decoder = _Base64Decoder() if attachment.base64 else None
    held = b""
    async for chunk in spool.chunks(part.content, part.end):
        held += decoder.feed(chunk) if decoder is not None else chunk
        while len(held) >= step:
            yield held[:step]
            held = held[step:]
    if decoder is not None:
        decoder.finish()
    if held:
        yield held


async def _decoded_size(spool: _Spool, part: _Part, attachment: _Attachment) -> int | None:
    """Exactly what the upload will send, by decoding it once; None when it does not decode."""
    if not attachment.base64:
        return part.end - part.content
    size = 0
    try:
        async for data in _decoded(spool, part, attachment, _CHUNK):
            size += len(data)
    except ValueError:
        return None
    return size


def _attachment_item(attachment: _Attachment) -> dict[str, object]:
    item: dict[str, object] = {"name": attachment.name, "contentType": attachment.content_type, "isInline": attachment.inline}
    if attachment.content_id is not None:
        item["contentId"] = attachment.content_id
    return item


def _file_attachment(attachment: _Attachment, content: bytes) -> bytes:
    """The JSON of POST .../attachments: a fileAttachment with its content base64-encoded."""
    item = {"@odata.type": "#microsoft.graph.fileAttachment", **_attachment_item(attachment), "contentBytes": base64.b64encode(content).decode()}
    return json.dumps(item).encode()


async def _plan(spool: _Spool, recipients: Sequence[str], upstream: str) -> _Plan | Reply:
    """How a message over one request's limit goes as a draft: its top-level parts stay in the
    draft's MIME, but for attachments of _APART bytes and more and, largest first, as many smaller
    ones as the draft needs to fit in one request."""
    head = await spool.read_at(0, _MAX_HEADER)
    end = head.find(b"\r\n\r\n")
    header = _header(head[: end + 4]) if end >= 0 else None
    boundary = header.get_boundary() if header is not None and header.get_content_maintype() == "multipart" else None
    if header is None or not boundary or not boundary.isascii():
        return Catalogue.graph_too_big(upstream)
    fitted = fit_recipients(head[: end + 4], recipients)
    body = end + 4
    delimiters = await _delimiters(spool, body - 2, boundary.encode("ascii"))
    preamble_size = delimiters[0][0] - body if delimiters else 0
    if preamble_size > _MAX_MIME:
        return Catalogue.graph_body_too_big(upstream)
    preamble = await spool.read_at(body, preamble_size) if preamble_size > 0 else b""
    parts: list[_Part] = []
    for (_, start, close), following in zip(delimiters, delimiters[1:] + [(spool.size, 0, True)]):
        if close:
            break
        part_end = following[0]
        block = await spool.read_at(start, min(part_end - start, _MAX_HEADER))
        # -2: no header at all; -1: none that ends within _MAX_HEADER, so not an attachment.
        split = -2 if block.startswith(b"\r\n") else block.find(b"\r\n\r\n")
        attachment = _as_attachment(_header(block[: split + 2])) if split > 0 else None
        parts.append(_Part(start, part_end, start + split + 4, attachment))
    delimiter = b"--" + boundary.encode("ascii") + b"\r\n"
    draft_size = len(fitted) + len(preamble) + (2 if preamble else 0) + sum(len(delimiter) + part.end - part.start + 2 for part in parts) + len(delimiter) + 2
    apart: list[tuple[_Part, _Attachment, int]] = []
    for part in sorted(parts, key=lambda p: p.end - p.start, reverse=True):
        if part.attachment is None or (part.end - part.start < _APART and draft_size <= _MAX_MIME):
            continue
        size = await _decoded_size(spool, part, part.attachment)
        # Just under 3 MB an attachment may not fit one POST, and an upload session refuses it.
        if size is None or (size < _UPLOAD_SESSION and len(_file_attachment(part.attachment, b"")) + 4 * -(-size // 3) > MAX_REQUEST):
            continue
        apart.append((part, part.attachment, size))
        draft_size -= len(delimiter) + part.end - part.start + 2
    if draft_size > _MAX_MIME:
        return Catalogue.graph_body_too_big(upstream)
    kept = [part for part in parts if all(part is not p for p, _, _ in apart)]
    draft = [fitted, preamble, b"\r\n" if preamble else b""]
    for part in kept:
        draft += [delimiter, await spool.read_at(part.start, part.end - part.start), b"\r\n"]
    if not kept:
        # A multipart has at least one part (RFC 2046 5.1.1): an empty text stands for the body.
        draft += [delimiter, b"Content-Type: text/plain; charset=us-ascii\r\n\r\n\r\n"]
    draft.append(delimiter[:-2] + b"--\r\n")
    return _Plan(b"".join(draft), sorted(apart, key=lambda a: a[0].start))


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def field(self, name: str) -> str | None:
        """A string member of the JSON object the body holds."""
        try:
            value = json.loads(self.body).get(name)
        except (ValueError, AttributeError):
            return None
        return value if isinstance(value, str) and value else None


class GraphUpstream:
    """One mailbox sending through Microsoft Graph; its token is shared by every session."""

    def __init__(self, reactor: Any, config: UpstreamConfig, tokens: TokenSource | None = None) -> None:
        self.config = config
        self.reactor = reactor
        self.tokens = tokens or TokenSource(reactor, config)
        pool = HTTPConnectionPool(reactor)  # type: ignore[no-untyped-call]
        # Graph allows 4 concurrent requests per mailbox; more would only be throttled.
        pool.maxPersistentPerHost = 4
        self.http = https.client(reactor, config.ca_file, pool=pool)
        self.mailbox_url = f"{config.graph_url.rstrip('/')}/users/{config.username}"
        # A session is one client's transaction, whose requests run one after another: max_sessions
        # bounds the requests in flight for the mailbox.
        self.pacer = Pacer(reactor, config.name, config.max_sessions, config.max_messages_per_minute, config.pacing_timeout)

    async def acquire(self, client: object, *, patient: bool = False) -> GraphSession:
        woken = False
        while not self.pacer.take_session(woken):
            await self.pacer.wait_session(patient)
            woken = True
        return GraphSession(self, patient)

    def departed(self, client: object) -> None:
        pass

    def close_idle(self) -> None:
        pass


class GraphSession:
    def __init__(self, upstream: GraphUpstream, patient: bool = False) -> None:
        self._upstream = upstream
        self._patient = patient
        self._holds_slot = True
        self._recipients: list[str] = []
        self._spool: _Spool | None = None
        self._unstuffer = Unstuffer()
        self._producer: IPushProducer | None = None
        self.failure: UpstreamError | None = None

    async def envelope(self, commands: Sequence[EnvelopeCommand]) -> list[Reply]:
        first = commands[0]
        if isinstance(first, Mail) and first.smtputf8:
            # Graph documents sendMail's MIME as RFC 5322 text and says nothing of UTF-8 header
            # fields (RFC 6532) or non-ASCII addresses: refused here rather than mangled there.
            # The rest get MAIL_FIRST: the session reads them again after a refused MAIL, and a
            # DATA must not get a 354 for a transaction that does not exist.
            refusal = Catalogue.graph_no_smtputf8(self._upstream.config.name)
            return [refusal] + [Catalogue.MAIL_FIRST] * (len(commands) - 1)
        if isinstance(first, Mail) and self._upstream.pacer.max_per_minute is not None:
            try:
                await self._upstream.pacer.message(self._patient)
            except Paced as e:
                return [e.reply] + [Catalogue.MAIL_FIRST] * (len(commands) - 1)
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
            return self._failed(UpstreamError(Catalogue.upstream_token_failed(self._upstream.config.name), e.detail, step="DATA"))
        self._spool = _Spool(self._upstream.reactor)
        self._unstuffer = Unstuffer()
        return GO_AHEAD

    def body(self, data: bytes) -> None:
        # [server] max_message_size bounds what arrives here.
        if self._spool is not None:
            self._spool.write(self._unstuffer.feed(data), self._producer)

    def stream_from(self, producer: IPushProducer | None) -> None:
        self._producer = producer

    async def end(self, last: bytes) -> Reply:
        self.body(last)
        spool, self._spool = self._spool, None
        assert spool is not None
        try:
            if spool.size > _MAX_MIME or not self._upstream.config.save_to_sent:
                return await self._send_draft(spool)
            message = fit_recipients(await spool.read(), self._recipients)
        finally:
            spool.discard()
        answer = await self._call("sendMail", "POST", f"{self._upstream.mailbox_url}/sendMail", base64.b64encode(message), "text/plain")
        return self._failed(answer) if isinstance(answer, UpstreamError) else self._verdict("sendMail", answer, final=True)

    async def _send_draft(self, spool: _Spool) -> Reply:
        """A draft with the large attachments added apart, then sent; deleted unless Graph took it."""
        save_to_sent = self._upstream.config.save_to_sent
        plan: _Plan | Reply
        if spool.size <= _MAX_MIME:
            # Here only for save_to_sent = false: the whole message fits the draft's one request,
            # so nothing goes apart and it need not be multipart.
            plan = _Plan(fit_recipients(await spool.read(), self._recipients), [])
        else:
            await spool.settle()
            plan = await _plan(spool, self._recipients, self._upstream.config.name)
        if isinstance(plan, Reply):
            return plan
        created = await self._call("createDraft", "POST", f"{self._upstream.mailbox_url}/messages", base64.b64encode(plan.draft), "text/plain")
        if isinstance(created, UpstreamError):
            return self._failed(created)
        draft_id = created.field("id")
        if created.status != 201 or draft_id is None:
            return self._verdict("createDraft", created)
        draft = f"{self._upstream.mailbox_url}/messages/{quote(draft_id, safe='=')}"
        sent = False
        try:
            if not save_to_sent:
                # A draft created from MIME cannot carry extended properties in the same request
                # (that needs the JSON form), so a PATCH marks it; before the uploads, so that a
                # refusal costs no upload. Without the mark the copy would land in Sent Items.
                failed = await self._mark_delete_after_submit(draft)
                if failed is not None:
                    return failed
            for part, attachment, size in plan.apart:
                failed = await (self._upload(spool, draft, part, attachment, size) if size >= _UPLOAD_SESSION else self._attach(spool, draft, part, attachment))
                if failed is not None:
                    return failed
            answer = await self._call("send", "POST", f"{draft}/send", b"", None)
            if isinstance(answer, UpstreamError):
                return self._failed(answer)
            reply = self._verdict("send", answer, final=True)
            sent = reply.is_positive
            return reply
        finally:
            if not sent:
                await self._delete(draft)

    async def _mark_delete_after_submit(self, draft: str) -> Reply | None:
        """PidTagDeleteAfterSubmit on the draft: Exchange deletes it once sent, leaving no copy in Sent Items."""
        body = json.dumps({"singleValueExtendedProperties": [{"id": DELETE_AFTER_SUBMIT, "value": "true"}]}).encode()
        answer = await self._call("markDeleteAfterSubmit", "PATCH", draft, body, "application/json")
        if isinstance(answer, UpstreamError):
            return self._failed(answer)
        # Graph answers 200 with the message; anything else leaves the draft unmarked, and sending
        # it would save the copy this upstream is configured not to keep.
        return None if 200 <= answer.status < 300 else self._verdict("markDeleteAfterSubmit", answer)

    async def _attach(self, spool: _Spool, draft: str, part: _Part, attachment: _Attachment) -> Reply | None:
        """An attachment under 3 MB in one POST (it was sized to fit one request)."""
        content = b"".join([data async for data in _decoded(spool, part, attachment, _CHUNK)])
        answer = await self._call("addAttachment", "POST", f"{draft}/attachments", _file_attachment(attachment, content), "application/json")
        if isinstance(answer, UpstreamError):
            return self._failed(answer)
        return None if 200 <= answer.status < 300 else self._verdict("addAttachment", answer)

    async def _upload(self, spool: _Spool, draft: str, part: _Part, attachment: _Attachment, size: int) -> Reply | None:
        """An attachment of 3 MB or more through an upload session, decoded as it goes, a range per PUT."""
        item = {"attachmentType": "file", **_attachment_item(attachment), "size": size}
        body = json.dumps({"AttachmentItem": item}).encode()
        answer = await self._call("createUploadSession", "POST", f"{draft}/attachments/createUploadSession", body, "application/json")
        if isinstance(answer, UpstreamError):
            return self._failed(answer)
        url = answer.field("uploadUrl")
        if not 200 <= answer.status < 300 or url is None:
            return self._verdict("createUploadSession", answer)
        offset = 0
        async for data in _decoded(spool, part, attachment, _UPLOAD_RANGE):
            # The upload URL is pre-authenticated: Graph refuses a bearer token sent to it.
            content_range = f"bytes {offset}-{offset + len(data) - 1}/{size}"
            answer = await self._call("upload", "PUT", url, data, "application/octet-stream", bearer=False, content_range=content_range)
            if isinstance(answer, UpstreamError):
                return self._failed(answer)
            if not 200 <= answer.status < 300:
                return self._verdict("upload", answer)
            offset += len(data)
        return None

    async def _delete(self, draft: str) -> None:
        """The draft goes, so a failed message leaves nothing in the mailbox's Drafts."""
        answer = await self._call("deleteDraft", "DELETE", draft, b"", None)
        if isinstance(answer, UpstreamError) or answer.status >= 300:
            detail = answer.detail if isinstance(answer, UpstreamError) else f"HTTP {answer.status}"
            log.info("graph draft left", upstream=self._upstream.config.name, draft=draft, detail=detail)

    async def _call(
        self, what: str, method: str, url: str, body: bytes, content_type: str | None, *, bearer: bool = True, content_range: str | None = None
    ) -> _Answer | UpstreamError:
        """One request to Graph with the mailbox's token (a fresh one once, if Graph says 401)."""
        upstream, cfg = self._upstream, self._upstream.config
        for attempt in (1, 2):
            headers: dict[str, list[str]] = {}
            if content_type is not None:
                headers["Content-Type"] = [content_type]
            if content_range is not None:
                headers["Content-Range"] = [content_range]
            token = None
            if bearer:
                try:
                    token = await upstream.tokens.token()
                except TokenError as e:
                    return UpstreamError(Catalogue.upstream_token_failed(cfg.name), e.detail, step="end-of-data")
                headers["Authorization"] = [f"Bearer {token}"]
            try:
                status, answered, answer = await https.fetch(
                    upstream.reactor, upstream.http, method, url, timeout=cfg.data_timeout, limit=_MAX_ANSWER, headers=headers, data=body,
                )
            except https.RequestFailed as e:
                why = Catalogue.UPSTREAM_TIMEOUT if e.timed_out else Catalogue.upstream_unreachable(cfg.name)
                return UpstreamError(why, f"upstream {cfg.name}: Graph {what}: {e.what}", step="end-of-data")
            if status == 401 and token is not None and attempt == 1:
                # A token revoked before its expiry: one fresh one.
                upstream.tokens.invalidate(token)
                continue
            break
        names = {name.decode("latin-1").lower(): values[-1].decode("latin-1") for name, values in answered.getAllRawHeaders()}
        return _Answer(status, names, answer)

    def _failed(self, error: UpstreamError) -> Reply:
        self.failure = error
        # A failed session is dropped without a release: its pacing slot goes now.
        self.abort()
        return error.reply

    def _verdict(self, what: str, answer: _Answer, final: bool = False) -> Reply:
        """Graph's answer as the client's reply; only the final request's success is a 250."""
        name = self._upstream.config.name
        reply = verdict(answer.status, answer.headers, answer.body, name)
        if reply.is_positive and not final:
            reply = Catalogue.graph_refused(name, answer.status, what)
        elif answer.status == 403 and not final and reply.enhanced == "5.7.0":
            # Drafts (large messages, and every message with save_to_sent = false) need a permission of their own.
            reply = Catalogue.graph_drafts_denied(name)
        if not reply.is_positive:
            log.info("graph refused", upstream=name, step=what, status=answer.status, request=answer.headers.get("request-id", "-"), answer=answer.body[:300])
        return reply

    def abort(self) -> None:
        if self._spool is not None:
            self._spool.discard()
            self._spool = None
        if self._holds_slot:
            self._holds_slot = False
            self._upstream.pacer.session_ended()

    def release(self) -> None:
        self.abort()
