"""Graceful shutdown: stop accepting, 421 4.3.2 to idle sessions, let transactions in flight finish."""

from __future__ import annotations

import signal
import smtplib
import subprocess
import threading
from pathlib import Path

from harness import (
    login,
    PKI,
    Proxy,
    Smarthost,
    _listening,
    reactor,
    smarthost_upstream,
    start_proxy,
    wait_for,
    write_config,
)
from test_twistd import environment, twistd

SHUTTING_DOWN = (421, b"4.3.2 relay.test Service shutting down")


def start(tmp_path: Path, pki: PKI, smarthost: Smarthost, grace: float) -> Proxy:
    path, ports = write_config(tmp_path, pki, smarthost_upstream(smarthost, pki))
    path.write_text(path.read_text().replace('hostname = "relay.test"', f'hostname = "relay.test"\nshutdown_grace = {grace}', 1))
    return start_proxy(path, ports)


def stop_in_background(proxy: Proxy) -> threading.Event:
    stopped = threading.Event()
    reactor.callFromThread(lambda: proxy.service.stopService().addBoth(lambda _: stopped.set()))
    return stopped


def in_data(smtp: smtplib.SMTP) -> None:
    assert smtp.mail("app1@example.org")[0] == 250
    assert smtp.rcpt("bob@example.net")[0] == 250
    assert smtp.docmd("DATA")[0] == 354
    smtp.send(b"Subject: in flight\r\n\r\nfirst half\r\n")


def test_idle_sessions_are_told_and_transactions_finish(tmp_path: Path, pki: PKI, smarthost: Smarthost) -> None:
    proxy = start(tmp_path, pki, smarthost, grace=30)
    idle = login(proxy.port, pki)
    busy = login(proxy.port, pki)
    in_data(busy)

    stopped = stop_in_background(proxy)
    assert idle.getreply() == SHUTTING_DOWN
    wait_for(lambda: not _listening(proxy.port))

    busy.send(b"second half\r\n.\r\n")
    assert busy.getreply() == (250, b"2.0.0 Ok: queued as TEST1")
    assert busy.getreply() == SHUTTING_DOWN
    idle.close()
    busy.close()
    assert stopped.wait(10)
    assert [m.content for m in smarthost.received] == [b"Subject: in flight\r\n\r\nfirst half\r\nsecond half\r\n"]


def test_grace_period_ends_a_stalled_body_without_delivering_it(tmp_path: Path, pki: PKI, smarthost: Smarthost) -> None:
    proxy = start(tmp_path, pki, smarthost, grace=0.5)
    stalled = login(proxy.port, pki)
    in_data(stalled)
    stopped = stop_in_background(proxy)
    assert stalled.getreply() == SHUTTING_DOWN
    stalled.close()
    assert stopped.wait(10)
    assert smarthost.received == []


def test_sigterm_to_twistd_drains(tmp_path: Path, pki: PKI, smarthost: Smarthost) -> None:
    path, ports = write_config(tmp_path, pki, smarthost_upstream(smarthost, pki))
    proc = subprocess.Popen(
        [*twistd(), "-n", "--pidfile=", "--logfile", str(tmp_path / "twistd.log"), "relayproxy", "--config", str(path)],
        env=environment(), cwd=tmp_path,
    )
    try:
        wait_for(lambda: proc.poll() is not None or all(_listening(p) for p in ports), timeout=30)
        idle = login(ports[0], pki)
        busy = login(ports[0], pki)
        in_data(busy)
        proc.send_signal(signal.SIGTERM)
        assert idle.getreply() == SHUTTING_DOWN
        busy.send(b"second half\r\n.\r\n")
        assert busy.getreply() == (250, b"2.0.0 Ok: queued as TEST1")
        idle.close()
        busy.close()
        # twistd re-raises the signal once the reactor has stopped, so the exit status says SIGTERM.
        assert proc.wait(timeout=20) == -signal.SIGTERM
        assert "Traceback" not in (tmp_path / "twistd.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
