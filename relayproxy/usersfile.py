"""The users file: htpasswd-style ``name:bcrypt-hash`` lines, the format ``htpasswd -B`` writes.

Its own module, below both the configuration (which checks the file at load time) and the
twisted.cred checker (which reads it at each login), so that neither imports the other for it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import bcrypt

from relayproxy.files import current_owner, write_private_file

# bcrypt ignores everything after the 72nd byte; bcrypt 5 raises instead, so
# truncate as htpasswd and every other bcrypt implementation do.
_BCRYPT_MAX_BYTES = 72
_BCRYPT_HASH = re.compile(rb"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")
DEFAULT_ROUNDS = 12


class UsersFileError(ValueError):
    """The users file has bad lines; ``problems`` holds one ``path:lineno: problem; fix`` each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def user_name_problem(name: str) -> str | None:
    """What makes ``name`` unusable as a user name, if anything."""
    if not name:
        return "the user name is empty"
    if ":" in name:
        return "a user name cannot contain ':'"
    if any(c.isspace() or not c.isprintable() for c in name):
        return "a user name cannot contain spaces or control characters"
    return None


def read_users_file(path: Path) -> dict[str, bytes]:
    """The users in ``path`` as name → bcrypt hash.

    Raises OSError if the file cannot be read, UsersFileError listing every bad line.
    """
    users: dict[str, bytes] = {}
    problems = []
    for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        problem = _line_problem(line, users)
        if problem is None:
            name, _, hashed = line.partition(b":")
            users[name.decode("utf-8")] = hashed
        else:
            problems.append(f"{path}:{lineno}: {problem}")
    if problems:
        raise UsersFileError(problems)
    return users


def _line_problem(line: bytes, users: Mapping[str, bytes]) -> str | None:
    """What is wrong with a ``NAME:HASH`` line, and the fix, if anything."""
    name_bytes, colon, hashed = line.partition(b":")
    if not colon:
        return "expected NAME:HASH; write one user per line as NAME:HASH, or delete the line"
    try:
        name = name_bytes.decode("utf-8")
    except UnicodeDecodeError:
        return "the user name is not UTF-8; rename the user"
    problem = user_name_problem(name)
    if problem:
        return f"{problem}; rename the user"
    if name in users:
        return f"user {name} appears a second time; delete one of the lines"
    if not _BCRYPT_HASH.fullmatch(hashed):
        return (
            f"the hash of user {name} is not bcrypt ($2a$, $2b$ or $2y$); "
            f"set the password again with: relayproxy passwd add {name}"
        )
    return None


def write_users_file(path: Path, users: Mapping[str, bytes]) -> None:
    """Replace ``path`` with ``users`` atomically, mode 0600.

    The owner and group of an existing file (typically the daemon's) are kept when root edits it.
    """
    text = b"".join(name.encode("utf-8") + b":" + hashed + b"\n" for name, hashed in users.items())
    write_private_file(path, text, current_owner(path))


def hash_password(password: str, rounds: int = DEFAULT_ROUNDS) -> bytes:
    """A ``$2b$`` bcrypt hash of ``password``.

    Raises ValueError for a password bcrypt would silently truncate.
    """
    secret = password.encode("utf-8")
    if len(secret) > _BCRYPT_MAX_BYTES:
        raise ValueError(f"the password is longer than bcrypt's {_BCRYPT_MAX_BYTES} bytes")
    return bcrypt.hashpw(secret, bcrypt.gensalt(rounds, prefix=b"2b"))


def check_password(password: str | bytes, hashed: bytes) -> bool:
    """Does ``password`` match the bcrypt ``hashed``?  Slow on purpose: call it in a thread."""
    secret = password.encode("utf-8") if isinstance(password, str) else password
    # bcrypt 5 accepts $2y$ (htpasswd's prefix) as well as $2a$ and $2b$.
    return bcrypt.checkpw(secret[:_BCRYPT_MAX_BYTES], hashed)
