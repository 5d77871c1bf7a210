"""Writing the files that hold secrets: atomically, mode 0600, owned by whoever must read them."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_private_file(path: Path, data: bytes, owner: tuple[int, int] | None = None) -> None:
    """Replace ``path`` with ``data``: readers see the old file or the new, never half of one.

    ``owner`` (uid, gid) is given to the new file when root writes it for the daemon.
    """
    # mkstemp creates the file with mode 0600: the content is never readable by others, not even briefly.
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if owner is not None and owner != (os.getuid(), os.getgid()):
                os.fchown(f.fileno(), *owner)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_name, path)
    except BaseException:
        os.unlink(temp_name)
        raise
    # The rename itself is only durable once the directory is on disk.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def current_owner(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return (stat.st_uid, stat.st_gid)
