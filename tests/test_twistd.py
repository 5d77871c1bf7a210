"""`twistd -n relayproxy --config PATH` as an operator runs it: a real process, a real config file."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import (
    CLIENT_PASSWORD,
    CLIENT_USER,
    PKI,
    UPSTREAM_PASSWORD,
    Smarthost,
    _listening,
    free_port,
    smarthost_upstream,
    wait_for,
    write_config,
)
from peers import Client, ScriptedUpstream, auth_plain

REPO = Path(__file__).resolve().parent.parent


def twistd() -> list[str]:
    exe = shutil.which("twistd", path=str(Path(sys.executable).parent)) or shutil.which("twistd")
    assert exe, "twistd is not installed next to this Python"
    return [exe]


def environment() -> dict[str, str]:
    env = dict(os.environ)
    # The checkout under test, not an installed copy, provides both the package and the plugin.
    env["PYTHONPATH"] = str(REPO)
    env["RELAYPROXY_TEST_UPSTREAM_PASSWORD"] = UPSTREAM_PASSWORD
    return env


@pytest.fixture
def twistd_proxy(tmp_path: Path, pki: PKI, smarthost: Smarthost) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    path, ports = write_config(tmp_path, pki, smarthost_upstream(smarthost, pki))
    log = tmp_path / "twistd.log"
    proc = subprocess.Popen(
        [*twistd(), "-n", "--pidfile=", "--logfile", str(log), "relayproxy", "--config", str(path)],
        env=environment(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: proc.poll() is not None or all(_listening(p) for p in ports), timeout=30)
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        yield ports[0], proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_twistd_serves_a_message(twistd_proxy: tuple[int, subprocess.Popen[bytes]], pki: PKI, smarthost: Smarthost) -> None:
    port, _ = twistd_proxy
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.starttls(context=pki.client_context())
        smtp.login(CLIENT_USER, CLIENT_PASSWORD)
        code, text = smtp.mail("app1@example.org")
        assert (code, text) == (250, b"2.1.0 OK")
        smtp.rcpt("bob@example.net")
        code, text = smtp.data(b"Subject: via twistd\r\n\r\nhello\r\n")
    assert (code, text) == (250, b"2.0.0 Ok: queued as TEST1")
    assert [m.content for m in smarthost.received] == [b"Subject: via twistd\r\n\r\nhello\r\n"]


def test_broken_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "relayproxy.toml"
    config.write_text('[server]\nhostname = "relay.test"\nport_typo = 25\n')
    result = subprocess.run(
        [*twistd(), "-n", "--pidfile=", "relayproxy", "--config", str(config)],
        env=environment(), cwd=tmp_path, capture_output=True, timeout=60,
    )
    assert result.returncode == 2
    err = result.stderr.decode()
    assert f"{config}: server.port_typo: unknown key" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("interface", "error"),
    [
        # A port a socket of the test already listens on.
        ("127.0.0.1", errno.EADDRINUSE),
        # 192.0.2.0/24 is TEST-NET-1, never a local address: binding fails, no packet is sent.
        ("192.0.2.1", errno.EADDRNOTAVAIL),
    ],
)
def test_a_listener_that_cannot_bind_stops_start_up_with_one_line(
    tmp_path: Path, pki: PKI, upstream: ScriptedUpstream, interface: str, error: int
) -> None:
    port = free_port()
    endpoint = f"tcp:{port}:interface={interface}"
    path, _ = write_config(tmp_path, pki, upstream.toml(), extra=f'[[listener]]\nendpoint = "{endpoint}"\ntls = "starttls"\n')
    log = tmp_path / "twistd.log"
    # Held in both cases; only the first listener asks for its address.
    with socket.create_server(("127.0.0.1", port)):
        started = time.monotonic()
        result = subprocess.run(
            [*twistd(), "-n", "--pidfile=", "--logfile", str(log), "relayproxy", "--config", str(path)],
            env=environment(), cwd=tmp_path, capture_output=True, timeout=60,
        )
    assert result.returncode == 1
    assert time.monotonic() - started < 10
    line = f"relayproxy: cannot listen on {endpoint}: [Errno {error}] {os.strerror(error)}\n"
    assert result.stderr.decode() == line
    [logged] = [entry for entry in log.read_text().splitlines() if "cannot listen" in entry]
    assert logged.endswith(f'[relayproxy.tap#error] cannot listen endpoint="{endpoint}" error="[Errno {error}] {os.strerror(error)}"')
    assert "Traceback" not in log.read_text() and not result.stdout


def test_help_documents_the_config_option() -> None:
    result = subprocess.run([*twistd(), "relayproxy", "--help"], env=environment(), capture_output=True, timeout=60)
    assert result.returncode == 0
    out = result.stdout.decode()
    assert "--config" in out and "etc/relayproxy.toml" in out


def test_auth_failure_log_line_matches_the_documented_fail2ban_filter(
    twistd_proxy: tuple[int, subprocess.Popen[bytes]], pki: PKI, tmp_path: Path
) -> None:
    port, _ = twistd_proxy
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.starttls(context=pki.client_context())
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            smtp.login(CLIENT_USER, "not-the-password")
    assert refused.value.smtp_code == 535
    readme = (REPO / "README.md").read_text()
    failregex = re.search(r"^failregex = (.*)$", readme, re.MULTILINE)
    assert failregex, "README documents a fail2ban failregex"
    # fail2ban's <HOST> stands for an address; the documented filter must match what twistd writes.
    pattern = re.compile(failregex.group(1).replace("<HOST>", r"(?P<host>[0-9a-fA-F.:]+)"))
    log = tmp_path / "twistd.log"
    wait_for(lambda: log.read_text().count("auth failed") >= 2)
    lines = [line for line in log.read_text().splitlines() if "auth failed" in line]
    # smtplib tries PLAIN, then LOGIN: two failures, one line each.
    assert len(lines) == 2
    for line in lines:
        match = pattern.search(line)
        assert match and match.group("host") == "127.0.0.1"
        assert " user=app1 " in line
    assert "not-the-password" not in log.read_text()


def test_a_user_name_with_a_line_break_is_logged_on_one_line(
    twistd_proxy: tuple[int, subprocess.Popen[bytes]], pki: PKI, tmp_path: Path
) -> None:
    """A user name ending in a newline, or a command word with a bare CR, must not end the log line:
    the rest would be a forged line."""
    port, _ = twistd_proxy
    client = Client(port)
    client.command(b"EHLO client.test")
    client.command(b"STARTTLS")
    client.starttls(pki.client_context())
    client.command(b"EHLO client.test")
    assert client.command(auth_plain("alice\n", "not-the-password")).startswith(b"535 5.7.8")
    assert client.command(b"NOOP\rX forged=yes").startswith(b"501 5.5.2")
    client.close()
    log = tmp_path / "twistd.log"
    wait_for(lambda: "auth failed" in log.read_text() and "refused" in log.read_text())
    [failed] = [line for line in log.read_text().splitlines() if "auth failed" in line]
    # Not a user of the users file: a digest, never the typed name.
    assert re.search(r' user=unknown-[0-9a-f]{10} reason="bad credentials" session=', failed)
    [refused] = [line for line in log.read_text().splitlines() if "refused" in line]
    assert ' command="NOOP\\rX" reply=' in refused
    # Nothing of either event went on a line of its own.
    assert [line for line in log.read_text().splitlines() if "reason=" in line or "session=" in line] == [failed, refused]


def test_json_log_lines(tmp_path: Path, pki: PKI, smarthost: Smarthost) -> None:
    path, ports = write_config(tmp_path, pki, smarthost_upstream(smarthost, pki), extra='[log]\nformat = "json"\n')
    out = tmp_path / "stdout.jsonl"
    with out.open("wb") as stdout:
        proc = subprocess.Popen(
            [*twistd(), "-n", "--pidfile=", "relayproxy", "--config", str(path)],
            env=environment(), cwd=tmp_path, stdout=stdout, stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: proc.poll() is not None or all(_listening(p) for p in ports), timeout=30)
        with smtplib.SMTP("127.0.0.1", ports[0], timeout=20) as smtp:
            smtp.starttls(context=pki.client_context())
            smtp.login(CLIENT_USER, CLIENT_PASSWORD)
            smtp.sendmail("app1@example.org", ["bob@example.net"], b"Subject: json\r\n\r\nhi\r\n")
        wait_for(lambda: b'"event": "message"' in out.read_bytes())
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    [message] = [r for r in records if r.get("event") == "message"]
    assert message["level"] == "info" and message["user"] == "app1" and message["outcome"] == "relayed"
    assert message["from"] == "<app1@example.org>" and message["rcpts"] == 1
    assert message["reply"] == "250 2.0.0 Ok: queued as TEST1"
    assert all("time" in r and "level" in r for r in records)
