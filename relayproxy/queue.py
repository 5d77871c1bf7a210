"""``relayproxy queue``: the spool as its operator sees it, from the files alone.

It needs no running proxy and is safe beside one: ``retry`` and ``delete`` take the message's lock
as a delivery does, so a message being delivered right now is left alone (exit status 1).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from relayproxy.smtp.headers import header_block
from relayproxy.spool.store import Envelope, Spool

Print = Callable[[str], None]


def _when(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _span(seconds: float) -> str:
    """A duration in its largest whole unit: 45s, 12m, 3h, 2d."""
    whole = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size:
            return f"{whole // size}{unit}"
    return f"{whole}s"


def list_messages(spool: Spool, out: Print, *, failed: bool = False, now: float | None = None) -> int:
    now = time.time() if now is None else now
    folder = spool.failed if failed else spool.queue
    listing = spool.list(folder)
    for name, why in listing.corrupt:
        out(f"unreadable: {name} ({why})" + ("; moved to " + str(spool.corrupt) if not failed else ""))
    envelopes = sorted(listing.envelopes, key=lambda e: e.received)
    out(f"{'ID':<24} {'AGE':>5} {'SIZE':>9} {'RCPTS':>5} {'TRIES':>5} {'NEXT':>5}  FROM, USER")
    for e in envelopes:
        upcoming = "-" if failed else ("now" if e.next_attempt <= now else _span(e.next_attempt - now))
        rcpts = f"{len(e.pending)}/{len(e.recipients)}"
        out(f"{e.id:<24} {_span(now - e.received):>5} {e.size:>9} {rcpts:>5} {e.attempts:>5} {upcoming:>5}  <{e.sender}>, {e.user}")
        if e.last_error:
            out(f"{'':<24} {e.last_error[:200]}")
    out(f"{len(envelopes)} message{'' if len(envelopes) == 1 else 's'} in {folder}")
    return 0


def show(spool: Spool, spool_id: str, out: Print) -> int:
    found = _found(spool, spool_id, out)
    if found is None:
        return 1
    folder, envelope = found
    fields: list[tuple[str, object]] = [
        ("id", envelope.id), ("where", folder), ("user", envelope.user), ("upstream", envelope.upstream),
        ("from", f"<{envelope.sender}>"), ("recipients", ", ".join(envelope.recipients)),
        ("pending", ", ".join(envelope.pending) or "-"), ("received", _when(envelope.received)),
        ("client", envelope.client), ("session", envelope.session), ("size", envelope.size),
        ("message-id", envelope.message_id or "-"), ("attempts", envelope.attempts),
        ("next attempt", _when(envelope.next_attempt) if envelope.pending else "-"),
        ("last error", envelope.last_error or "-"),
    ]
    fields += [("refused", f"{recipient}: {why}") for recipient, why in envelope.bounced]
    for name, value in fields:
        out(f"{name + ':':<14}{value}")
    with open(folder / f"{spool_id}.msg", "rb") as text:
        header = header_block(text.read(65536))
    out("")
    out(header.decode("utf-8", "replace") if header is not None else "(the header is longer than 64 KiB)")
    return 0


def _found(spool: Spool, spool_id: str, out: Print) -> tuple[Path, Envelope] | None:
    try:
        return spool.find(spool_id)
    except FileNotFoundError:
        out(f"relayproxy: no message {spool_id} in {spool.queue} or {spool.failed}")
    except ValueError as e:
        # The proxy's next read of queue/ moves such a file to corrupt/.
        out(f"relayproxy: the envelope of {spool_id} cannot be read ({e})")
    return None


def _held(spool: Spool, spool_id: str, out: Print) -> tuple[Path, Envelope, IO[bytes]] | None:
    """The message's folder, envelope and locked file; None (said why) if it is unknown or busy."""
    found = _found(spool, spool_id, out)
    if found is None:
        return None
    folder, envelope = found
    text = spool.lock(spool_id, folder)
    if text is None:
        out(f"relayproxy: {spool_id} is being delivered right now (or was just removed); try again in a moment")
        return None
    return folder, envelope, text


def retry(spool: Spool, spool_id: str, out: Print, now: float | None = None) -> int:
    held = _held(spool, spool_id, out)
    if held is None:
        return 1
    folder, envelope, text = held
    with text:
        if folder == spool.failed:
            spool.restore(spool_id, time.time() if now is None else now)
            out(f"{spool_id}: back from {spool.failed} to {spool.queue}, to be tried again at once")
        else:
            spool.update(envelope.retried(time.time() if now is None else now))
            out(f"{spool_id}: to be tried again at once")
    return 0


def delete(spool: Spool, spool_id: str, out: Print) -> int:
    held = _held(spool, spool_id, out)
    if held is None:
        return 1
    folder, envelope, text = held
    with text:
        spool.remove(spool_id, folder)
    out(f"{spool_id}: deleted (from <{envelope.sender}>, {len(envelope.pending)} recipient(s) not delivered; nobody is told)")
    return 0
