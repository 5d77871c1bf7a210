"""The AUTH verification cache: one bcrypt per user and password, dropped when the users file changes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer

from relayproxy.credentials import UsersFileChecker
from relayproxy.usersfile import hash_password, write_users_file


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


class Counting:
    """A synchronous run_in_thread that counts the bcrypt checks (each check is one call)."""

    calls = 0

    def __call__(self, work: Callable[[], Any]) -> defer.Deferred[Any]:
        self.calls += 1
        return defer.maybeDeferred(work)


def login(checker: UsersFileChecker, user: str, password: str) -> bytes:
    result: list[Any] = []
    checker.requestAvatarId(UsernamePassword(user.encode(), password.encode())).addBoth(result.append)
    [outcome] = result
    if isinstance(outcome, Exception) or hasattr(outcome, "raiseException"):
        outcome.raiseException()
    return outcome  # type: ignore[no-any-return]


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    write_users_file(path, {"app1": hash_password("first", rounds=4)})
    return path


def test_second_auth_skips_bcrypt(users: Path) -> None:
    threads, clock = Counting(), Clock()
    checker = UsersFileChecker(users, threads, cache_seconds=300, clock=clock)
    assert login(checker, "app1", "first") == b"app1"
    assert login(checker, "app1", "first") == b"app1"
    assert threads.calls == 1


def test_a_wrong_password_is_never_served_from_the_cache(users: Path) -> None:
    threads = Counting()
    checker = UsersFileChecker(users, threads, cache_seconds=300, clock=Clock())
    login(checker, "app1", "first")
    with pytest.raises(UnauthorizedLogin):
        login(checker, "app1", "First")
    assert threads.calls == 2


def test_cached_auth_is_refused_once_the_password_changes(users: Path) -> None:
    threads = Counting()
    checker = UsersFileChecker(users, threads, cache_seconds=300, clock=Clock())
    login(checker, "app1", "first")
    write_users_file(users, {"app1": hash_password("second", rounds=4)})
    with pytest.raises(UnauthorizedLogin):
        login(checker, "app1", "first")
    assert login(checker, "app1", "second") == b"app1"


def test_entries_expire(users: Path) -> None:
    threads, clock = Counting(), Clock()
    checker = UsersFileChecker(users, threads, cache_seconds=300, clock=clock)
    login(checker, "app1", "first")
    clock.now += 301
    login(checker, "app1", "first")
    assert threads.calls == 2


def test_cache_off(users: Path) -> None:
    threads = Counting()
    checker = UsersFileChecker(users, threads, cache_seconds=0)
    login(checker, "app1", "first")
    login(checker, "app1", "first")
    assert threads.calls == 2
