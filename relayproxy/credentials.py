"""Who may log in: the users file (relayproxy.usersfile) behind twisted.cred."""

from __future__ import annotations

import collections
import hmac
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bcrypt
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, succeed
from zope.interface import Attribute, Interface, implementer

from relayproxy.config import Config, UpstreamConfig, UserConfig
from relayproxy.config.sections import Network
from relayproxy.logs import EventLog
from relayproxy.usersfile import DEFAULT_ROUNDS, check_password, read_users_file
# bench/run.py makes its users file with these, imported from here.
from relayproxy.usersfile import hash_password as hash_password, write_users_file as write_users_file

# What twisted.cred passes from checker to realm: a user name in UTF-8 (or
# ANONYMOUS, the empty tuple, which this module never produces).
AvatarId = bytes | tuple[()]
RunInThread = Callable[[Callable[[], AvatarId]], Deferred[AvatarId]]

_log = EventLog("relayproxy.credentials")


class IRelayUser(Interface):
    """A logged-in SMTP client: who it is and where its mail goes."""

    name = Attribute("The user name it logged in with (str).")
    config = Attribute("Its UserConfig.")
    upstream = Attribute("The UpstreamConfig its mail is relayed through.")


@implementer(IRelayUser)
@dataclass(frozen=True)
class RelayUser:
    name: str
    config: UserConfig
    upstream: UpstreamConfig


@dataclass(frozen=True)
class _Snapshot:
    """The users file as last read, and what identifies that version of it."""

    version: tuple[int, int, int, int]
    users: dict[str, bytes]
    # Checked for unknown users, at the cost most users have, so that a failed
    # login takes as long whether or not the name exists.
    dummy_hash: bytes


@implementer(ICredentialsChecker)
class UsersFileChecker:
    """Checks user names and passwords against the users file.

    ``run_in_thread`` runs the blocking work (file reads and the deliberately slow
    bcrypt) off the reactor thread, such as ``twisted.internet.threads.deferToThread``.
    A wrong name or password fails with UnauthorizedLogin; an unreadable or broken
    users file with OSError or UsersFileError, which is the server's fault, not the client's.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(
        self, path: Path, run_in_thread: RunInThread, cache_seconds: float = 0.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._path = path
        self._run_in_thread = run_in_thread
        self._snapshot: _Snapshot | None = None
        self._cache_seconds = cache_seconds
        self._clock = clock
        # Verified pairs, as keyed digests (never the password): digest -> (expiry, file version, name).
        self._cache: dict[bytes, tuple[float, tuple[int, int, int, int], bytes]] = {}
        self._key = secrets.token_bytes(32)

    def known(self, name: str) -> bool:
        """Whether ``name`` is in the users file as last read; no file access, so fine on the reactor thread."""
        snapshot = self._snapshot
        return snapshot is not None and name in snapshot.users

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[AvatarId]:
        username: str | bytes = credentials.username
        password: str | bytes = credentials.password
        if not self._cache_seconds:
            return self._run_in_thread(lambda: self._check(username, password))
        digest = self._digest(username, password)
        hit = self._cache.get(digest)
        # A stat is cheap enough for the reactor thread; any change to the file (a new password,
        # a deleted user) changes its version and so drops every cached pair at once.
        if hit is not None and hit[0] > self._clock() and hit[1] == _version(self._path):
            return succeed(hit[2])
        checked = self._run_in_thread(lambda: self._check(username, password))
        return checked.addCallback(self._remember, digest)

    def _digest(self, username: str | bytes, password: str | bytes) -> bytes:
        user = username.encode("utf-8") if isinstance(username, str) else username
        secret = password.encode("utf-8") if isinstance(password, str) else password
        return hmac.digest(self._key, user + b"\x00" + secret, "sha256")

    def _remember(self, name: AvatarId, digest: bytes) -> AvatarId:
        snapshot = self._snapshot
        if snapshot is not None and isinstance(name, bytes):
            if len(self._cache) >= _MAX_CACHED:
                self._cache.clear()
            self._cache[digest] = (self._clock() + self._cache_seconds, snapshot.version, name)
        return name

    def _check(self, username: str | bytes, password: str | bytes) -> bytes:
        snapshot = self._current()
        name = _text_or_none(username)
        hashed = None if name is None else snapshot.users.get(name)
        if name is None or hashed is None:
            check_password(password, snapshot.dummy_hash)
        elif check_password(password, hashed):
            return name.encode("utf-8")
        # One message for both cases: the reply must not tell which names exist.
        raise UnauthorizedLogin("unknown user or wrong password")

    def _current(self) -> _Snapshot:
        """The users file, re-read only if it changed since the last read."""
        version = _version(self._path)
        snapshot = self._snapshot
        if snapshot is not None and snapshot.version == version:
            return snapshot
        users = read_users_file(self._path)
        costs = collections.Counter(int(h[4:6]) for h in users.values())
        cost = costs.most_common(1)[0][0] if costs else DEFAULT_ROUNDS
        if snapshot is not None and int(snapshot.dummy_hash[4:6]) == cost:
            dummy_hash = snapshot.dummy_hash
        else:
            dummy_hash = bcrypt.hashpw(b"not a password", bcrypt.gensalt(cost))
        # Checks may run in several threads at once; replacing one immutable
        # snapshot keeps each of them consistent without a lock.
        self._snapshot = _Snapshot(version, users, dummy_hash)
        return self._snapshot


def _version(path: Path) -> tuple[int, int, int, int]:
    stat = os.stat(path)
    # The inode changes on an atomic replace even within one mtime tick.
    return (stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)


_MAX_CACHED = 10_000
"""Verified pairs kept at most; past that the cache starts over (it only saves time)."""


def _text_or_none(name: str | bytes) -> str | None:
    if isinstance(name, str):
        return name
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        # Such a name cannot be in the file, which is read as UTF-8.
        return None


_NAME_KEY = secrets.token_bytes(32)


def name_digest(name: str) -> str:
    """How a user name that is not in the users file is logged: often it is a password typed into
    the wrong field, so never as typed; a keyed digest stable within one run, so repeated guesses
    still correlate in the log."""
    return "unknown-" + hmac.digest(_NAME_KEY, name.encode("utf-8", "surrogatepass"), "sha256")[:5].hex()


def known_names(portal: Portal) -> Callable[[str], bool] | None:
    """The users file's membership test of ``portal``'s checker, if it has one."""
    checker = portal.checkers.get(IUsernamePassword)
    return checker.known if isinstance(checker, UsersFileChecker) else None


@implementer(IRealm)
class RelayRealm:
    """Turns a checked user name into a RelayUser with its configuration."""

    def __init__(self, config: Config) -> None:
        self._config = config

    def requestAvatar(
        self, avatarId: AvatarId, mind: object, *interfaces: type[Interface]
    ) -> tuple[type[Interface], RelayUser, Callable[[], None]]:
        if IRelayUser not in interfaces:
            raise NotImplementedError("RelayRealm only provides IRelayUser")
        if not isinstance(avatarId, bytes):
            # ANONYMOUS: no checker here produces it, but a Portal may hold others.
            raise UnauthorizedLogin("anonymous users may not relay")
        name = avatarId.decode("utf-8")
        user_config = self._config.user(name)
        upstream = self._config.upstreams.get(user_config.upstream)
        if upstream is None:
            # Possible for a user added to the users file after the configuration
            # was checked, when there is no default upstream.
            _log.error("user routed nowhere", user=name, upstream=user_config.upstream, fix=f"add [users.{name}] or [upstream.{user_config.upstream}]")
            raise UnauthorizedLogin("user has no upstream")
        return IRelayUser, RelayUser(name, user_config, upstream), lambda: None


def make_portal(config: Config, run_in_thread: RunInThread) -> Portal:
    """The Portal that SMTP AUTH logs in through; its avatars provide IRelayUser."""
    return Portal(RelayRealm(config), [UsersFileChecker(config.auth.users_file, run_in_thread, config.auth.cache_seconds)])


def device_users(config: Config) -> tuple[tuple[Network, RelayUser], ...]:
    """Every user's devices networks, each with the user a client from there is (allow_ip_login)."""
    return tuple(
        (network, RelayUser(name, user, config.upstreams[user.upstream]))
        for name, user in config.users.items()
        # load_config refuses a user routed nowhere; here such a user has no device to be.
        if user.upstream in config.upstreams
        for network in user.devices
    )
