"""The spool directory: how a message is kept on disk, found again, and let go.

Layout of ``[spool] directory``::

    tmp/ID.msg          a message being received: never delivered, removed at start
    queue/ID.msg        the message text as the upstream takes it (CRLF, dot-stuffed, no final dot)
    queue/ID.env        its envelope and delivery state (JSON): the message exists once this does
    failed/ID.msg/.env  given up (5xx or max_age): kept for the operator
    corrupt/ID.*        files that could not be read, moved aside

Committing a message is: the text to tmp/, fsync, rename to queue/; the envelope to tmp/, fsync,
rename to queue/; fsync queue/. Only then does the client hear 250, so a crash at any point before
leaves nothing that is later delivered. A delivery, ``relayproxy queue retry`` and ``delete`` all
hold an exclusive flock on the .msg file, so the proxy and the command line never act on one
message at once.

Every function here does file I/O and is run in a thread by the proxy (``threads.deferToThread``);
the command line calls them directly.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any

FORMAT = 1
"""The envelope file's format; a file of another format is moved to corrupt/."""

_ID = re.compile(r"^[0-9a-f]{14,16}-[0-9a-f]{8}$")

NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""Errors that mean the disk (or the quota, or the file size limit) is full: 452 4.3.1, not 451 4.3.0."""


def new_id(now: float) -> str:
    """Sortable by arrival (microseconds, hex, padded to the year 4253), unique by its random part."""
    return f"{int(now * 1_000_000):014x}-{secrets.token_hex(4)}"


def valid_id(spool_id: str) -> bool:
    return _ID.fullmatch(spool_id) is not None


@dataclass(frozen=True)
class Envelope:
    """One spooled message: what the client's transaction said, and where delivery stands."""

    id: str
    user: str
    upstream: str
    sender: str
    """The reverse-path, "" for the null sender (a delivery status notification)."""
    recipients: tuple[str, ...]
    """Every recipient the message was taken for."""
    received: float
    size: int
    """Octets of the message file."""
    client: str = "-"
    session: str = "-"
    message_id: str | None = None
    eight_bit: bool = False
    smtputf8: bool = False
    pending: tuple[str, ...] = ()
    """Recipients still to deliver (the others were delivered or refused)."""
    bounced: tuple[tuple[str, str], ...] = ()
    """Recipients given up on, each with the reply or reason."""
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str | None = None
    notification: bool = False
    """This message is itself a delivery status notification: when it fails, nobody is told."""

    def to_json(self) -> bytes:
        data: dict[str, Any] = {"format": FORMAT, **asdict(self)}
        return json.dumps(data, ensure_ascii=True, sort_keys=True).encode("ascii") + b"\n"

    @staticmethod
    def from_json(raw: bytes) -> Envelope:
        """Raises ValueError for anything that is not an envelope file of this format."""
        data = json.loads(raw)
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise ValueError("not an envelope of format 1")
        try:
            envelope = Envelope(
                **{
                    **data,
                    "recipients": tuple(data["recipients"]),
                    "pending": tuple(data.get("pending", ())),
                    "bounced": tuple((str(r), str(why)) for r, why in data.get("bounced", ())),
                }
            )
        except TypeError as e:
            raise ValueError(str(e)) from None
        checks = (
            valid_id(envelope.id), isinstance(envelope.user, str), isinstance(envelope.upstream, str),
            isinstance(envelope.sender, str), all(isinstance(r, str) for r in envelope.recipients + envelope.pending),
            isinstance(envelope.received, int | float), isinstance(envelope.next_attempt, int | float),
            isinstance(envelope.attempts, int), isinstance(envelope.size, int),
        )
        if not all(checks):
            raise ValueError("a field of the wrong type")
        return envelope

    def retried(self, now: float) -> Envelope:
        return replace(self, next_attempt=now)


@dataclass
class Listing:
    """What one read of queue/ found."""

    envelopes: list[Envelope] = field(default_factory=list)
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    """(file name, why) of files moved to corrupt/."""


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.tmp = directory / "tmp"
        self.queue = directory / "queue"
        self.failed = directory / "failed"
        self.corrupt = directory / "corrupt"

    def prepare(self) -> list[str]:
        """Create the folders; remove what a crash left being received (no client got 250 for it).
        Returns the names removed. Run before anything is received."""
        for folder in (self.tmp, self.queue, self.failed, self.corrupt):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        removed = []
        for entry in os.scandir(self.tmp):
            os.unlink(entry.path)
            removed.append(entry.name)
        for entry in os.scandir(self.queue):
            # The text was renamed, the envelope was not: the crash came before the 250.
            name, dot, kind = entry.name.partition(".")
            if kind == "msg" and not (self.queue / f"{name}.env").exists():
                os.unlink(entry.path)
                removed.append(entry.name)
        return removed

    # -- receiving ------------------------------------------------------------------------------

    def open_new(self, spool_id: str) -> IO[bytes]:
        return open(os.open(self.tmp / f"{spool_id}.msg", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")

    def commit(self, text: IO[bytes], envelope: Envelope) -> None:
        """Make the message durable; raises OSError, leaving nothing in queue/ (tmp/ is cleaned by ``discard``)."""
        text.flush()
        os.fsync(text.fileno())
        text.close()
        spool_id = envelope.id
        env_tmp = self.tmp / f"{spool_id}.env"
        _write_synced(env_tmp, envelope.to_json())
        os.rename(self.tmp / f"{spool_id}.msg", self.queue / f"{spool_id}.msg")
        try:
            os.rename(env_tmp, self.queue / f"{spool_id}.env")
            _sync_directory(self.queue)
        except OSError:
            # Not committed: the client gets a 4xx, so the text must not stay to be delivered.
            _unlink(self.queue / f"{spool_id}.env")
            _unlink(self.queue / f"{spool_id}.msg")
            raise

    def discard(self, spool_id: str, text: IO[bytes] | None) -> None:
        if text is not None:
            text.close()
        _unlink(self.tmp / f"{spool_id}.msg")
        _unlink(self.tmp / f"{spool_id}.env")

    # -- reading --------------------------------------------------------------------------------

    def list(self, folder: Path | None = None) -> Listing:
        """Every envelope in queue/ (or ``folder``); unreadable ones in queue/ go to corrupt/."""
        listing = Listing()
        where = folder or self.queue
        names = sorted(entry.name for entry in os.scandir(where))
        present = set(names)
        for name in names:
            spool_id, _, kind = name.partition(".")
            if kind != "env":
                continue
            try:
                envelope = self.envelope(spool_id, where)
                # A commit renames the text just before the envelope: the listing may hold the new
                # envelope and not the text, which is there all the same.
                if f"{spool_id}.msg" not in present and not (where / f"{spool_id}.msg").exists():
                    raise ValueError("its message file is missing")
            except FileNotFoundError:
                continue  # delivered or deleted since the scandir
            except (ValueError, OSError) as e:
                if where == self.queue:
                    self._move_aside(spool_id, str(e))
                listing.corrupt.append((name, str(e)))
                continue
            listing.envelopes.append(envelope)
        return listing

    def envelope(self, spool_id: str, folder: Path | None = None) -> Envelope:
        raw = ((folder or self.queue) / f"{spool_id}.env").read_bytes()
        envelope = Envelope.from_json(raw)
        if envelope.id != spool_id:
            raise ValueError(f"its id is {envelope.id!r}")
        return envelope

    def _move_aside(self, spool_id: str, why: str) -> None:
        for kind in ("env", "msg"):
            source = self.queue / f"{spool_id}.{kind}"
            if source.exists():
                os.rename(source, self.corrupt / source.name)
        (self.corrupt / f"{spool_id}.why").write_text(why + "\n")

    def find(self, spool_id: str) -> tuple[Path, Envelope]:
        """The folder (queue/ or failed/) and envelope of ``spool_id``; raises FileNotFoundError."""
        if not valid_id(spool_id):
            raise FileNotFoundError(spool_id)
        for folder in (self.queue, self.failed):
            if (folder / f"{spool_id}.env").exists():
                return folder, self.envelope(spool_id, folder)
        raise FileNotFoundError(spool_id)

    # -- delivering -----------------------------------------------------------------------------

    def lock(self, spool_id: str, folder: Path | None = None) -> IO[bytes] | None:
        """The message file opened and exclusively locked; None if someone else holds it or it is gone."""
        try:
            text = open((folder or self.queue) / f"{spool_id}.msg", "rb")
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(text.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text.close()
            return None
        if not (folder or self.queue).joinpath(f"{spool_id}.env").exists():
            # Delivered and removed between the open and the lock.
            text.close()
            return None
        return text

    def take(self, spool_id: str) -> tuple[IO[bytes], Envelope] | None:
        """For a delivery: the message locked, and its envelope read again under the lock (``relayproxy
        queue`` may have changed it since the last scan); None if it is gone or held."""
        text = self.lock(spool_id)
        if text is None:
            return None
        try:
            return text, self.envelope(spool_id)
        except BaseException:
            text.close()
            raise

    def update(self, envelope: Envelope, folder: Path | None = None) -> None:
        """Rewrite the envelope (delivery state) atomically, under the message's lock."""
        target = (folder or self.queue) / f"{envelope.id}.env"
        staging = target.with_suffix(".env-new")
        _write_synced(staging, envelope.to_json())
        os.rename(staging, target)

    def remove(self, spool_id: str, folder: Path | None = None) -> None:
        """Delivered (or deleted): the envelope first, so a crash between leaves no message to deliver."""
        where = folder or self.queue
        _unlink(where / f"{spool_id}.env")
        _unlink(where / f"{spool_id}.msg")
        _sync_directory(where)

    def give_up(self, envelope: Envelope) -> None:
        """To failed/, envelope last: queue/ no longer has it once its envelope is gone."""
        os.rename(self.queue / f"{envelope.id}.msg", self.failed / f"{envelope.id}.msg")
        _write_synced(self.failed / f"{envelope.id}.env", envelope.to_json())
        _unlink(self.queue / f"{envelope.id}.env")
        _sync_directory(self.queue)

    def restore(self, spool_id: str, now: float) -> Envelope:
        """failed/ back to queue/ for one more attempt (``relayproxy queue retry`` of a failed message)."""
        envelope = self.envelope(spool_id, self.failed)
        again = replace(envelope, pending=envelope.pending or tuple(r for r, _ in envelope.bounced), bounced=(), next_attempt=now)
        os.rename(self.failed / f"{spool_id}.msg", self.queue / f"{spool_id}.msg")
        _write_synced(self.queue / f"{spool_id}.env", again.to_json())
        _unlink(self.failed / f"{spool_id}.env")
        _sync_directory(self.queue)
        return again


def chunks(text: IO[bytes], size: int = 65536) -> Iterator[bytes]:
    while chunk := text.read(size):
        yield chunk


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
