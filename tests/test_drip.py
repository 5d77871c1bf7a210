"""Clients that drip bytes, never log in, or spread over an IPv6 network cannot hold the proxy's slots.

The drips run against `twistd -n relayproxy` on real sockets; counting by prefix uses the PROXY
protocol to present IPv6 client addresses from loopback.
"""

from __future__ import annotations

import base64
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ProxyFactory
from harness import CLIENT_PASSWORD, CLIENT_USER, PKI, Smarthost, _listening, free_port, smarthost_upstream, wait_for, write_config
from peers import Client
from test_twistd import environment, twistd

TIMEOUT = b"421 4.4.2 relay.test Timeout, closing connection\r\n"
TOO_MANY = b"421 4.7.0 relay.test Too many connections, try again later\r\n"
LOGIN = b"AUTH PLAIN " + base64.b64encode(f"\0{CLIENT_USER}\0{CLIENT_PASSWORD}".encode())


Twistd = Callable[[str], tuple[int, Path]]


@pytest.fixture
def twistd_with(tmp_path: Path, pki: PKI, smarthost: Smarthost) -> Iterator[Twistd]:
    """``twistd_with("[limits] lines")``: a running `twistd -n relayproxy`; its plaintext port and log."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(limits: str) -> tuple[int, Path]:
        directory = tmp_path / f"twistd{len(procs)}"
        directory.mkdir()
        path, ports = write_config(directory, pki, smarthost_upstream(smarthost, pki), extra=f"[limits]\n{limits}\n")
        log = directory / "twistd.log"
        proc = subprocess.Popen(
            [*twistd(), "-n", "--pidfile=", "--logfile", str(log), "relayproxy", "--config", str(path)],
            env=environment(), cwd=directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        wait_for(lambda: proc.poll() is not None or all(_listening(p) for p in ports), timeout=30)
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        return ports[2], log

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            # A failed test may leave a session open for the whole shutdown grace.
            proc.kill()
            proc.wait()


def logged(log: Path, text: str) -> str:
    wait_for(lambda: text in log.read_text())
    return next(line for line in log.read_text().splitlines() if text in line)


def test_a_command_dripped_byte_by_byte_has_command_timeout_in_all(twistd_with: Twistd) -> None:
    port, log = twistd_with("command_timeout = 2\nunauthenticated_timeout = 60")
    client = Client(port)
    started = time.monotonic()
    # 1 byte every 0.4 s: the line would take 8 s; each byte comes well within the 2 s of silence.
    assert client.drip(b"EHLO a-rather-long-client-name.example\r\n", every=0.4) == TIMEOUT
    assert time.monotonic() - started < 6
    assert client.wait_closed() == b""
    assert "limit=command_timeout" in logged(log, "timeout session=")


def test_a_session_that_never_logs_in_has_unauthenticated_timeout(twistd_with: Twistd) -> None:
    port, log = twistd_with("command_timeout = 30\nunauthenticated_timeout = 2")
    client = Client(port)
    started = time.monotonic()
    replies = []
    while not replies or replies[-1] != TIMEOUT:
        replies.append(client.command(b"NOOP"))
        time.sleep(0.3)
        assert time.monotonic() - started < 10, replies[-3:]
    assert set(replies[:-1]) == {b"250 2.0.0 OK\r\n"}
    assert "limit=unauthenticated_timeout" in logged(log, "timeout session=")


def test_a_body_dripped_below_min_data_rate_is_cut_and_never_delivered(twistd_with: Twistd, smarthost: Smarthost) -> None:
    port, log = twistd_with("data_timeout = 30\nmin_data_rate = 200\ndata_rate_grace = 1\nunauthenticated_timeout = 2")
    client = Client(port)
    client.command(b"EHLO client.test")
    assert client.command(LOGIN).startswith(b"235 ")
    assert client.command(b"MAIL FROM:<app1@example.org>").startswith(b"250 ")
    assert client.command(b"RCPT TO:<bob@example.net>").startswith(b"250 ")
    assert client.command(b"DATA").startswith(b"354 ")
    # 3 octets a second, far below 200; long after unauthenticated_timeout, which no longer applies.
    assert client.drip(b"Subject: slow\r\n\r\n" + b"x" * 200 + b"\r\n.\r\n", every=0.3) == TIMEOUT
    assert "limit=min_data_rate" in logged(log, "timeout session=")
    assert smarthost.received == []


def test_unauthenticated_sessions_cannot_take_the_slots_of_authenticated_ones(make_proxy: ProxyFactory, smarthost: Smarthost, pki: PKI, log_lines: list[str]) -> None:
    proxy = make_proxy(smarthost_upstream(smarthost, pki), limits="max_connections = 4\nmax_unauthenticated = 2")
    first, second = greeted(proxy.plain_port), greeted(proxy.plain_port)
    third = Client(proxy.plain_port)
    assert third.greeting == TOO_MANY and third.wait_closed() == b""
    assert any("connection refused" in line and "limit=max_unauthenticated" in line for line in log_lines)
    # Once one logs in, its slot is an authenticated one: an unauthenticated slot is free again.
    first.command(b"EHLO client.test")
    assert first.command(LOGIN).startswith(b"235 ")
    fourth = Client(proxy.plain_port)
    assert fourth.greeting.startswith(b"220 ")
    fifth = Client(proxy.plain_port)
    assert fifth.greeting == TOO_MANY
    assert first.command(b"NOOP") == b"250 2.0.0 OK\r\n"


def greeted(port: int) -> Client:
    """A client the proxy greeted, once the start-up's probes of the listeners have left."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        client = Client(port)
        if client.greeting.startswith(b"220 "):
            return client
        client.close()
        time.sleep(0.05)
    raise AssertionError("never greeted")


def proxied(port: int, address: str) -> Client:
    """A client behind a PROXY header from ``address``; its greeting is not read yet."""
    client = Client(port, read_greeting=False)
    client.send(f"PROXY TCP6 {address} ::1 40000 25\r\n".encode())
    return client


def behind_haproxy(make_proxy: ProxyFactory, smarthost: Smarthost, pki: PKI, limits: str) -> int:
    port = free_port()
    extra = f'\n[[listener]]\nendpoint = "haproxy:tcp:{port}:interface=127.0.0.1"\ntls = "none"\n'
    make_proxy(smarthost_upstream(smarthost, pki), limits=limits, extra=extra)
    wait_for(lambda: _listening(port))
    return port


def test_ipv6_clients_are_counted_per_64(make_proxy: ProxyFactory, smarthost: Smarthost, pki: PKI) -> None:
    port = behind_haproxy(make_proxy, smarthost, pki, "max_connections_per_ip = 1")
    one = proxied(port, "2001:db8:1:2::10")
    assert one.reply().startswith(b"220 ")
    # Another address of the same /64: the same client, over its limit.
    assert proxied(port, "2001:db8:1:2:ffff::20").reply() == TOO_MANY
    assert proxied(port, "2001:db8:1:3::10").reply().startswith(b"220 ")


def test_the_prefix_length_is_configurable(make_proxy: ProxyFactory, smarthost: Smarthost, pki: PKI) -> None:
    port = behind_haproxy(make_proxy, smarthost, pki, "max_connections_per_ip = 1\nipv6_prefix = 128")
    assert proxied(port, "2001:db8:1:2::10").reply().startswith(b"220 ")
    assert proxied(port, "2001:db8:1:2::20").reply().startswith(b"220 ")


def test_auth_failures_are_counted_per_64(make_proxy: ProxyFactory, smarthost: Smarthost, pki: PKI) -> None:
    port = behind_haproxy(make_proxy, smarthost, pki, "auth_failures_per_ip = 2\nauth_failures_per_user = 100")
    wrong = b"AUTH PLAIN " + base64.b64encode(f"\0{CLIENT_USER}\0wrong".encode())
    for host in ("2001:db8:1:2::1", "2001:db8:1:2::2"):
        client = proxied(port, host)
        client.reply()
        client.command(b"EHLO client.test")
        assert client.command(wrong).startswith(b"535 ")
    guesser = proxied(port, "2001:db8:1:2::3")
    guesser.reply()
    guesser.command(b"EHLO client.test")
    assert guesser.command(LOGIN).startswith(b"454 4.7.0")
    elsewhere = proxied(port, "2001:db8:9:9::1")
    elsewhere.reply()
    elsewhere.command(b"EHLO client.test")
    assert elsewhere.command(LOGIN).startswith(b"235 ")
