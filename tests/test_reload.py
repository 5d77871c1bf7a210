"""Live reload: users file changes without a signal, SIGHUP for the rest, sessions in flight unharmed."""

from __future__ import annotations

import errno
import os
import signal
import smtplib
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from harness import (
    login,
    CLIENT_PASSWORD,
    CLIENT_USER,
    PKI,
    Proxy,
    Smarthost,
    reactor,
    _listening,
    fields_of,
    free_port,
    smarthost_upstream,
    start_proxy,
    wait_for,
    write_config,
)
from peers import Client
from test_twistd import environment, twistd
from twisted.internet.threads import blockingCallFromThread

from relayproxy.usersfile import hash_password, read_users_file, write_users_file


def refused_login(port: int, pki: PKI) -> smtplib.SMTPAuthenticationError:
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=20)
    smtp.starttls(context=pki.client_context())
    try:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            smtp.login(CLIENT_USER, CLIENT_PASSWORD)
    finally:
        smtp.close()
    return refused.value


def reload(proxy: Proxy) -> bool:
    result: bool = blockingCallFromThread(reactor, proxy.service.reload)
    return result


def test_users_file_changes_apply_without_a_signal(proxy: Proxy, pki: PKI) -> None:
    users_file = proxy.config_path.parent / "users"
    users = read_users_file(users_file)
    users["app2"] = hash_password("app2-password", rounds=4)
    del users[CLIENT_USER]
    write_users_file(users_file, users)
    login(proxy.port, pki, "app2", "app2-password").quit()
    refused = refused_login(proxy.port, pki)
    assert (refused.smtp_code, refused.smtp_error) == (535, b"5.7.8 Authentication credentials invalid")


def test_reload_applies_user_rules_to_new_sessions_only(proxy: Proxy, pki: PKI, smarthost: Smarthost) -> None:
    before = login(proxy.port, pki, CLIENT_USER, CLIENT_PASSWORD)
    config = proxy.config_path.read_text()
    proxy.config_path.write_text(config + f'\n[users.{CLIENT_USER}]\nallowed_senders = ["@only.example"]\n')
    assert reload(proxy)
    after = login(proxy.port, pki, CLIENT_USER, CLIENT_PASSWORD)
    assert after.mail("app1@example.org") == (553, b"5.7.1 Sender address not owned by user app1")
    # The session that started before the reload finishes with the rules it started with.
    assert before.sendmail("app1@example.org", ["bob@example.net"], b"Subject: old rules\r\n\r\nhi\r\n") == {}
    before.quit()
    after.quit()
    assert len(smarthost.received) == 1


def test_broken_config_on_reload_keeps_the_running_one(proxy: Proxy, pki: PKI, smarthost: Smarthost) -> None:
    proxy.config_path.write_text(proxy.config_path.read_text() + "\n[server2]\n")
    assert not reload(proxy)
    with login(proxy.port, pki, CLIENT_USER, CLIENT_PASSWORD) as smtp:
        assert smtp.sendmail("app1@example.org", ["bob@example.net"], b"Subject: still up\r\n\r\nhi\r\n") == {}


def test_certificate_swap_while_a_transaction_is_in_flight(tmp_path: Path, pki: PKI, smarthost: Smarthost) -> None:
    path, ports = write_config(tmp_path, pki, smarthost_upstream(smarthost, pki))
    proxy = start_proxy(path, ports)
    try:
        smtp = login(proxy.port, pki, CLIENT_USER, CLIENT_PASSWORD)
        first_cert = smtp.sock.getpeercert()  # type: ignore[union-attr]
        smtp.mail("app1@example.org")
        smtp.rcpt("bob@example.net")
        assert smtp.docmd("DATA")[0] == 354
        smtp.send(b"Subject: in flight\r\n\r\nfirst half\r\n")

        new_cert, new_key = pki.issue("relay-renewed", "relay.test", "localhost", "127.0.0.1")
        text = path.read_text()
        old_cert_line = next(line for line in text.splitlines() if line.startswith("certificate ="))
        old_key_line = next(line for line in text.splitlines() if line.startswith("key ="))
        path.write_text(text.replace(old_cert_line, f'certificate = "{new_cert}"').replace(old_key_line, f'key = "{new_key}"'))
        assert reload(proxy)

        smtp.send(b"second half\r\n.\r\n")
        assert smtp.getreply() == (250, b"2.0.0 Ok: queued as TEST1")
        smtp.quit()
        assert smarthost.received[0].content == b"Subject: in flight\r\n\r\nfirst half\r\nsecond half\r\n"

        fresh = login(proxy.port, pki, CLIENT_USER, CLIENT_PASSWORD)
        renewed = fresh.sock.getpeercert()  # type: ignore[union-attr]
        fresh.quit()
        assert renewed["serialNumber"] != first_cert["serialNumber"]
        # Implicit TLS picks up the new certificate as well.
        context = pki.client_context()
        with smtplib.SMTP_SSL("127.0.0.1", proxy.tls_port, context=context, timeout=20) as implicit:
            assert implicit.sock.getpeercert()["serialNumber"] == renewed["serialNumber"]  # type: ignore[union-attr]
    finally:
        proxy.stop()


def test_sighup_reloads_a_twistd_process(tmp_path: Path, pki: PKI, smarthost: Smarthost) -> None:
    path, ports = write_config(tmp_path, pki, smarthost_upstream(smarthost, pki))
    log = tmp_path / "twistd.log"
    proc = subprocess.Popen(
        [*twistd(), "-n", "--pidfile=", "--logfile", str(log), "relayproxy", "--config", str(path)],
        env=environment(), cwd=tmp_path,
    )
    try:
        wait_for(lambda: proc.poll() is not None or all(_listening(p) for p in ports), timeout=30)
        with login(ports[0], pki, CLIENT_USER, CLIENT_PASSWORD) as smtp:
            assert smtp.mail("app1@example.org")[0] == 250
        path.write_text(path.read_text() + f'\n[users.{CLIENT_USER}]\nallowed_senders = ["@only.example"]\n')
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload: configuration applied" in log.read_text())
        with login(ports[0], pki, CLIENT_USER, CLIENT_PASSWORD) as smtp:
            assert smtp.mail("app1@example.org") == (553, b"5.7.1 Sender address not owned by user app1")
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_reload_adds_and_removes_users(proxy: Proxy, pki: PKI) -> None:
    users_file = proxy.config_path.parent / "users"
    write_users_file(users_file, {"app2": hash_password("app2-password", rounds=4)})
    assert reload(proxy)
    login(proxy.port, pki, "app2", "app2-password").quit()
    refused = refused_login(proxy.port, pki)
    assert refused.smtp_code == 535


IN_USE = f"[Errno {errno.EADDRINUSE}] {os.strerror(errno.EADDRINUSE)}"


def listener(endpoint: str, tls: str) -> str:
    return f'[[listener]]\nendpoint = "{endpoint}"\ntls = "{tls}"\n'


def written_listener(port: int, tls: str) -> str:
    """A listener's block as write_config wrote it."""
    return listener(f"tcp:{port}:interface=127.0.0.1:backlog=1024", tls)


def greeting(port: int, pki: PKI | None = None) -> bytes:
    with Client(port, tls=pki.client_context() if pki else None) as client:
        return client.greeting


def test_reload_adds_and_removes_listeners(proxy: Proxy, pki: PKI, events: list[dict[str, Any]]) -> None:
    on_removed = Client(proxy.plain_port)
    new_port = free_port()
    new_endpoint = f"tcp:{new_port}:interface=127.0.0.1"
    text = proxy.config_path.read_text()
    proxy.config_path.write_text(text.replace(written_listener(proxy.plain_port, "none"), listener(new_endpoint, "none")))
    assert reload(proxy)
    assert greeting(new_port).startswith(b"220 relay.test ESMTP")
    wait_for(lambda: not _listening(proxy.plain_port))
    # A session the removed listener accepted carries on to its end.
    assert on_removed.command(b"EHLO client.test").startswith(b"250-relay.test")
    assert on_removed.command(b"QUIT").startswith(b"221")
    on_removed.close()
    assert [f["endpoint"] for f in fields_of(events, "reload: listener added")] == [new_endpoint]
    assert [f["endpoint"] for f in fields_of(events, "reload: listener removed")] == [
        f"tcp:{proxy.plain_port}:interface=127.0.0.1:backlog=1024"
    ]
    # The listeners whose endpoint stayed kept their sockets.
    assert greeting(proxy.port).startswith(b"220 ") and greeting(proxy.tls_port, pki).startswith(b"220 ")


def test_a_reload_whose_new_listener_cannot_bind_changes_nothing(proxy: Proxy, pki: PKI, events: list[dict[str, Any]]) -> None:
    port = free_port()
    endpoint = f"tcp:{port}:interface=127.0.0.1"
    rules = f'\n[users.{CLIENT_USER}]\nallowed_senders = ["@only.example"]\n'
    with socket.create_server(("127.0.0.1", port)):
        proxy.config_path.write_text(proxy.config_path.read_text() + rules + listener(endpoint, "starttls"))
        assert not reload(proxy)
    assert [f["problem"] for f in fields_of(events, "reload refused")] == [f"{proxy.config_path}: cannot listen on {endpoint}: {IN_USE}"]
    # Refused as a whole: not the new user rules either, and the port stays unused.
    with login(proxy.port, pki, CLIENT_USER, CLIENT_PASSWORD) as smtp:
        assert smtp.mail("app1@example.org") == (250, b"2.1.0 OK")
    assert not _listening(port)


def test_a_change_to_implicit_tls_of_a_running_listener_waits_for_a_restart(proxy: Proxy, pki: PKI, events: list[dict[str, Any]]) -> None:
    text = proxy.config_path.read_text()
    proxy.config_path.write_text(text.replace(written_listener(proxy.port, "starttls"), written_listener(proxy.port, "implicit")))
    assert reload(proxy)
    assert [f["endpoint"] for f in fields_of(events, 'reload: a change to or from tls = "implicit" takes effect only after a restart')] == [
        f"tcp:{proxy.port}:interface=127.0.0.1:backlog=1024"
    ]
    login(proxy.port, pki, CLIENT_USER, CLIENT_PASSWORD).quit()


def test_sighup_with_a_listener_that_cannot_bind_is_refused_and_the_old_listeners_serve(
    tmp_path: Path, pki: PKI, smarthost: Smarthost
) -> None:
    path, ports = write_config(tmp_path, pki, smarthost_upstream(smarthost, pki))
    log = tmp_path / "twistd.log"
    proc = subprocess.Popen(
        [*twistd(), "-n", "--pidfile=", "--logfile", str(log), "relayproxy", "--config", str(path)],
        env=environment(), cwd=tmp_path,
    )
    try:
        wait_for(lambda: proc.poll() is not None or all(_listening(p) for p in ports), timeout=30)
        port = free_port()
        endpoint = f"tcp:{port}:interface=127.0.0.1"
        with socket.create_server(("127.0.0.1", port)):
            path.write_text(path.read_text() + listener(endpoint, "starttls"))
            proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "reload failed, keeping the running configuration" in log.read_text())
        assert f'reload refused problem="{path}: cannot listen on {endpoint}: {IN_USE}"' in log.read_text()
        assert proc.poll() is None
        assert greeting(ports[0]).startswith(b"220 relay.test ESMTP")
        assert greeting(ports[1], pki).startswith(b"220 relay.test ESMTP")
        assert greeting(ports[2]).startswith(b"220 relay.test ESMTP")
        # With the port free, the next SIGHUP binds it.
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload: configuration applied" in log.read_text())
        assert greeting(port).startswith(b"220 relay.test ESMTP")
        assert "Traceback" not in log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
