"""`relayproxy check`: every upstream tried with the central credentials, one line each, no mail sent."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SmarthostFactory
from harness import PKI, Smarthost, free_port, smarthost_upstream, write_config
from test_twistd import environment

from relayproxy.config.schema import key_names
from relayproxy.config.sections import TABLES


def check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relayproxy", "check", "--config", str(config)],
        env=environment(), capture_output=True, text=True, timeout=60,
    )


def test_all_upstreams_work(tmp_path: Path, pki: PKI, smarthost: Smarthost) -> None:
    config, _ = write_config(tmp_path, pki, smarthost_upstream(smarthost, pki))
    result = check(config)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert f"ok   users file {tmp_path / 'users'}: 1 user(s)" in lines
    [line] = [line for line in lines if "upstream default" in line]
    assert line.startswith(f"ok   upstream default localhost:{smarthost.port} (starttls): TLSv1.3, certificate ")
    assert ", expires 3000-01-01; " in line and line.endswith("authenticated as central@example.com")
    assert smarthost.received == []


def test_failures_are_named_with_a_hint_and_exit_1(tmp_path: Path, pki: PKI, make_smarthost: SmarthostFactory) -> None:
    good = make_smarthost()
    refused = make_smarthost(password="changed-at-the-provider")
    down = free_port()
    config, _ = write_config(
        tmp_path, pki,
        smarthost_upstream(good, pki) + smarthost_upstream(refused, pki, name="refused")
        + f'[upstream.down]\nhost = "127.0.0.1"\nport = {down}\ntls = "none"\n',
        extra='[users.printer]\nupstream = "refused"\n',
    )
    result = check(config)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert "warn user printer: has a [users.printer] section but no entry in" in "\n".join(lines)
    assert "warn upstream down: no user is routed to it" in lines
    failure = lines.index(next(line for line in lines if line.startswith("FAIL upstream refused ")))
    assert "refused the credentials for central@example.com: 535" in lines[failure]
    assert lines[failure + 1].startswith("     hint: upstream refused refused the proxy's own relay credentials")
    assert any(line.startswith(f"FAIL upstream down 127.0.0.1:{down} (none): connect to 127.0.0.1:{down}") for line in lines)
    assert any(line.startswith("ok   upstream default ") for line in lines)
    assert "central-secret" not in result.stdout + result.stderr


def test_bad_config_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "relayproxy.toml"
    config.write_text("[server]\n")
    result = check(config)
    assert result.returncode == 2
    assert "server.hostname" in result.stderr


def check_offline(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relayproxy", "check", "--offline", "--config", str(config)],
        env=environment(), capture_output=True, text=True, timeout=60,
    )


def xoauth2_upstream(name: str, secret_file: Path) -> str:
    """An xoauth2 upstream whose token endpoint nothing serves."""
    secret_file.write_text("client-secret\n")
    return f"""
[upstream.{name}]
host = "smtp.office365.com"
auth = "xoauth2"
username = "alerts@example.org"
token_url = "https://127.0.0.1:{free_port()}/token"
client_id = "client-1"
grant = "client_credentials"
client_secret_file = "{secret_file}"
scope = "https://outlook.office365.com/.default"
"""


def test_offline_validates_without_connecting(tmp_path: Path, pki: PKI) -> None:
    # An upstream that would accept a connection, and a Redis store and a token endpoint that would
    # not: an offline check must try none of them.
    with socket.create_server(("127.0.0.1", 0)) as upstream:
        port = upstream.getsockname()[1]
        config, _ = write_config(
            tmp_path, pki,
            f'[upstream.default]\nhost = "127.0.0.1"\nport = {port}\ntls = "none"\n'
            + xoauth2_upstream("m365", tmp_path / "client-secret"),
            extra=f'[users.printer]\nupstream = "m365"\n\n[limits]\nstore = "redis://127.0.0.1:{free_port()}/0"\n',
        )
        result = check_offline(config)
        upstream.settimeout(0.5)
        with pytest.raises(TimeoutError):
            upstream.accept()
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert f"ok   users file {tmp_path / 'users'}: 1 user(s)" in lines
    assert lines[-1] == (
        f"ok   configuration {config}: 3 listener(s), 2 upstream(s) (default, m365), 1 [users] section(s); "
        "no connection made (--offline)"
    )
    assert "warn user printer: has a [users.printer] section but no entry in" in result.stdout
    assert result.stderr == ""


def test_offline_bad_config_exits_2_with_every_problem(tmp_path: Path, pki: PKI) -> None:
    config, _ = write_config(tmp_path, pki, '[upstream.default]\nhost = "smtp.example.com"\nprot = 25\n', extra="[limits]\nmax_connections = 0\n")
    (tmp_path / "users").write_text("alice:not-a-hash\n")
    result = check_offline(config)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"relayproxy: {config}: auth.users_file: {tmp_path / 'users'}:1: the hash of user alice is not bcrypt ($2a$, $2b$ or $2y$); "
        "set the password again with: relayproxy passwd add alice",
        f"relayproxy: {config}: upstream.default.prot: unknown key; remove it or check the spelling (known keys: "
        + ", ".join(key_names(*TABLES["upstream.NAME"])) + ")",
        f"relayproxy: {config}: limits.max_connections: expected an integer from 1 to 1000000000, got 0; "
        "write a whole number of at least 1",
    ]


def test_an_ip_literal_host_is_checked_against_the_certificates_ip_addresses(
    tmp_path: Path, pki: PKI, make_smarthost: SmarthostFactory
) -> None:
    by_address = make_smarthost(hostname="127.0.0.1")
    # Its certificate names localhost only, not the address the proxy dials.
    by_name = make_smarthost()
    config, _ = write_config(
        tmp_path, pki,
        smarthost_upstream(by_address, pki) + smarthost_upstream(by_name, pki, name="by_name").replace('"localhost"', '"127.0.0.1"'),
    )
    result = check(config)
    lines = result.stdout.splitlines()
    [ok] = [line for line in lines if "upstream default" in line]
    assert ok.startswith(f"ok   upstream default 127.0.0.1:{by_address.port} (starttls): TLSv1.3, certificate "), ok
    assert ok.endswith("authenticated as central@example.com")
    [failed] = [line for line in lines if line.startswith("FAIL upstream by_name ")]
    assert failed.startswith(f"FAIL upstream by_name 127.0.0.1:{by_name.port} (starttls): TLS with 127.0.0.1:{by_name.port} failed: ")
    assert "IPAddressMismatch" in failed
    assert result.returncode == 1
    assert by_name.auth_attempts == []
