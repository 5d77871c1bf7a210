"""The users file and the twisted.cred pieces built on it."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.python.failure import Failure

from relayproxy.config import AuthConfig, Config, ServerConfig, TLSConfig, UpstreamConfig, UserConfig
from relayproxy.credentials import IRelayUser, RelayUser, UsersFileChecker, make_portal
from relayproxy.usersfile import UsersFileError, check_password, hash_password, read_users_file, write_users_file

T = TypeVar("T")


def run_now(f: Callable[[], T]) -> defer.Deferred[T]:
    return defer.maybeDeferred(f)


def result_of(d: defer.Deferred[T]) -> T | Failure:
    """The result of a Deferred that has already fired (a Failure if it failed)."""
    results: list[T | Failure] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def failed_with(result: object, error: type[Exception]) -> bool:
    return isinstance(result, Failure) and isinstance(result.value, error)


def creds(name: bytes, password: str | bytes) -> IUsernamePassword:
    # Twisted annotates bytes, but the checker also accepts a str password.
    return UsernamePassword(name, password)  # type: ignore[arg-type]


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    users = {"alice": hash_password("alice-pw", rounds=4), "bob": hash_password("bob-pw", rounds=4)}
    write_users_file(path, users)
    return path


def test_read_users_file_accepts_htpasswd_bcrypt(tmp_path: Path) -> None:
    b_hash = hash_password("pw", rounds=4)
    y_hash = b"$2y$" + b_hash[4:]
    path = tmp_path / "users"
    path.write_bytes(b"# made by htpasswd -B\n\nalice:" + y_hash + b"\r\n  bob:" + b_hash + b"\n")
    users = read_users_file(path)
    assert users == {"alice": y_hash, "bob": b_hash}
    assert check_password("pw", users["alice"])
    assert not check_password(b"wrong", users["alice"])


def test_read_users_file_reports_every_bad_line(tmp_path: Path) -> None:
    good = hash_password("pw", rounds=4).decode()
    path = tmp_path / "users"
    path.write_text(f"alice:{good}\nno colon\nbob:$apr1$xyz$abc\nalice:{good}\ncarol dan:{good}\n")
    with pytest.raises(UsersFileError) as info:
        read_users_file(path)
    assert [p.split(": ")[0] for p in info.value.problems] == [f"{path}:{n}" for n in (2, 3, 4, 5)]
    assert "not bcrypt" in info.value.problems[1]
    assert "second time" in info.value.problems[2]


def test_write_users_file_is_private_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("old\n")
    path.chmod(0o644)
    hashed = b"$2b$04$" + b"a" * 53
    write_users_file(path, {"alice": hashed})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == b"alice:" + hashed + b"\n"
    assert os.listdir(tmp_path) == ["users"]


def test_hash_password_refuses_what_bcrypt_would_truncate() -> None:
    with pytest.raises(ValueError, match="72 bytes"):
        hash_password("x" * 73, rounds=4)


def test_long_password_checks_like_htpasswd() -> None:
    # htpasswd and other bcrypt implementations use only the first 72 bytes.
    assert check_password("x" * 80, hash_password("x" * 72, rounds=4))


@pytest.mark.parametrize("password", ["alice-pw", b"alice-pw"])
def test_checker_accepts_right_password(users_file: Path, password: str | bytes) -> None:
    checker = UsersFileChecker(users_file, run_now)
    assert result_of(checker.requestAvatarId(creds(b"alice", password))) == b"alice"


@pytest.mark.parametrize(
    ("name", "password"), [(b"alice", b"bob-pw"), (b"zoe", b"alice-pw"), (b"\xff", b"alice-pw")]
)
def test_checker_rejects(users_file: Path, name: bytes, password: bytes) -> None:
    checker = UsersFileChecker(users_file, run_now)
    failure = result_of(checker.requestAvatarId(creds(name, password)))
    assert failed_with(failure, UnauthorizedLogin)
    assert "pw" not in str(failure)


def test_checker_picks_up_file_changes(users_file: Path) -> None:
    checker = UsersFileChecker(users_file, run_now)
    assert result_of(checker.requestAvatarId(creds(b"alice", b"alice-pw"))) == b"alice"
    write_users_file(users_file, {"alice": hash_password("new-pw", rounds=4)})
    old_password = result_of(checker.requestAvatarId(creds(b"alice", b"alice-pw")))
    assert failed_with(old_password, UnauthorizedLogin)
    assert result_of(checker.requestAvatarId(creds(b"alice", b"new-pw"))) == b"alice"
    deleted_user = result_of(checker.requestAvatarId(creds(b"bob", b"bob-pw")))
    assert failed_with(deleted_user, UnauthorizedLogin)


def test_checker_reports_a_missing_file_as_no_login_failure(users_file: Path) -> None:
    # The server's fault, not a wrong password: the client should get a temporary error.
    users_file.unlink()
    checker = UsersFileChecker(users_file, run_now)
    result = result_of(checker.requestAvatarId(creds(b"alice", b"alice-pw")))
    assert failed_with(result, FileNotFoundError)


def make_config(users_file: Path) -> Config:
    def upstream(name: str) -> UpstreamConfig:
        return UpstreamConfig(name, f"{name}.example", 465, "implicit")

    return Config(
        path=users_file.parent / "relayproxy.toml",
        server=ServerConfig("relay.test"),
        tls=TLSConfig(),
        listeners=(),
        auth=AuthConfig(users_file),
        upstreams={"default": upstream("default"), "other": upstream("other")},
        users={"bob": UserConfig("bob", "other", ("bob@example.com",))},
    )


def login(config: Config, name: bytes, password: bytes) -> Any:
    portal = make_portal(config, run_now)
    return result_of(portal.login(creds(name, password), None, IRelayUser))


def test_realm_routes_users(users_file: Path) -> None:
    config = make_config(users_file)
    interface, bob, logout = login(config, b"bob", b"bob-pw")
    assert interface is IRelayUser
    assert bob == RelayUser("bob", config.users["bob"], config.upstreams["other"])
    assert IRelayUser.providedBy(bob)
    logout()
    _, alice, _ = login(config, b"alice", b"alice-pw")
    assert alice == RelayUser("alice", UserConfig("alice"), config.upstreams["default"])


def test_realm_refuses_a_user_without_upstream(users_file: Path) -> None:
    config = make_config(users_file)
    del config.upstreams["default"]
    assert failed_with(login(config, b"alice", b"alice-pw"), UnauthorizedLogin)
