"""``relayproxy passwd``: managing the users file from the command line."""

from __future__ import annotations

import io
import stat
from pathlib import Path

import pytest

from relayproxy.cli import main
from relayproxy.usersfile import read_users_file


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    return tmp_path / "users"


def run(monkeypatch: pytest.MonkeyPatch, users_file: Path, *argv: str, stdin: str = "") -> int:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return main(["passwd", "--users-file", str(users_file), *argv])


def add(monkeypatch: pytest.MonkeyPatch, users_file: Path, name: str, password: str) -> int:
    return run(monkeypatch, users_file, "add", name, "--password-stdin", "--rounds", "4", stdin=password + "\n")


def test_add_list_check_delete(
    monkeypatch: pytest.MonkeyPatch, users_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert add(monkeypatch, users_file, "bob", "bob pw") == 0
    assert add(monkeypatch, users_file, "alice", "alice-pw") == 0
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600
    assert set(read_users_file(users_file)) == {"alice", "bob"}
    capsys.readouterr()

    assert run(monkeypatch, users_file, "list") == 0
    assert capsys.readouterr().out == "alice\nbob\n"

    assert run(monkeypatch, users_file, "check", "bob", "--password-stdin", stdin="bob pw\n") == 0
    assert run(monkeypatch, users_file, "check", "bob", "--password-stdin", stdin="alice-pw\n") == 1

    assert add(monkeypatch, users_file, "bob", "changed") == 0
    assert "changed the password of user bob" in capsys.readouterr().out
    assert run(monkeypatch, users_file, "check", "bob", "--password-stdin", stdin="changed\n") == 0

    assert run(monkeypatch, users_file, "delete", "bob") == 0
    assert set(read_users_file(users_file)) == {"alice"}
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600


def test_password_prompted_twice(monkeypatch: pytest.MonkeyPatch, users_file: Path) -> None:
    answers = iter(["pw", "pw"])
    monkeypatch.setattr("getpass.getpass", lambda prompt: next(answers))
    assert main(["passwd", "--users-file", str(users_file), "add", "alice", "--rounds", "4"]) == 0
    answers = iter(["pw", "typo"])
    assert main(["passwd", "--users-file", str(users_file), "add", "bob", "--rounds", "4"]) == 2
    assert set(read_users_file(users_file)) == {"alice"}


@pytest.mark.parametrize("name", ["", "a:b", "a b", "a\tb"])
def test_bad_names_refused(
    monkeypatch: pytest.MonkeyPatch, users_file: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    assert add(monkeypatch, users_file, name, "pw") == 2
    assert capsys.readouterr().err.startswith("relayproxy: ")
    assert not users_file.exists()


def test_empty_password_refused(
    monkeypatch: pytest.MonkeyPatch, users_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert add(monkeypatch, users_file, "alice", "") == 2
    assert "empty" in capsys.readouterr().err
    assert not users_file.exists()


def test_errors_exit_2(monkeypatch: pytest.MonkeyPatch, users_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(monkeypatch, users_file, "list") == 2
    assert "does not exist" in capsys.readouterr().err
    assert add(monkeypatch, users_file, "alice", "pw") == 0
    assert run(monkeypatch, users_file, "delete", "zoe") == 2
    assert run(monkeypatch, users_file, "check", "zoe", "--password-stdin", stdin="pw\n") == 2
    users_file.write_text("broken line\n")
    assert add(monkeypatch, users_file, "bob", "pw") == 2
    assert f"{users_file}:1: expected NAME:HASH" in capsys.readouterr().err
    assert users_file.read_text() == "broken line\n"


def test_users_file_from_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "relayproxy.toml"
    # Only [auth] is read: the rest need not be set up yet.
    config.write_text('[auth]\nusers_file = "users"\n[server]\nunknown = 1\n')
    monkeypatch.setattr("sys.stdin", io.StringIO("pw\n"))
    assert main(["passwd", "--config", str(config), "add", "alice", "--password-stdin", "--rounds", "4"]) == 0
    assert set(read_users_file(tmp_path / "users")) == {"alice"}


def test_config_without_users_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "relayproxy.toml"
    config.write_text("[server]\n")
    assert main(["passwd", "--config", str(config), "list"]) == 2
    assert "auth.users_file is not set" in capsys.readouterr().err
    assert main(["passwd", "--config", str(tmp_path / "missing.toml"), "list"]) == 2
