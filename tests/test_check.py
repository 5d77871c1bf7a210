"""`relayproxy check`: every upstream tried with the central credentials, one line each, no mail sent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import SmarthostFactory
from harness import PKI, Smarthost, free_port, smarthost_upstream, write_config
from test_twistd import environment


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
