"""Listeners behind HAProxy (``endpoint = "haproxy:tcp:..."``): the client address comes from the
PROXY header (v1 and v2), from the session's first moment, and a connection without a good header
never gets an SMTP greeting. The last tests run a real HAProxy (Debian's ``haproxy`` package)."""

from __future__ import annotations

import csv
import io
import ipaddress
import os
import shutil
import smtplib
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import (
    CLIENT_PASSWORD,
    CLIENT_USER,
    PKI,
    Proxy,
    fields_of,
    free_port,
    start_proxy,
    wait_for,
    wait_listening,
    write_config,
)

from peers import Client, ScriptedUpstream, auth_plain
from relayproxy import proxyprotocol
from relayproxy.proxyprotocol import ProxyHeaderError, parse_header
from relayproxy.smtp.reply import Catalogue

GREETING = Catalogue.greeting("relay.test").to_bytes()
TOO_MANY = b"421 4.7.0 relay.test Too many connections, try again later\r\n"
V1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 587\r\n"


def v2(source: str, destination: str = "192.0.2.1", sport: int = 51234, dport: int = 587, *, local: bool = False) -> bytes:
    """A binary PROXY v2 header for TCP over IPv4 or IPv6 (LOCAL: a health check's)."""
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    family = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    return proxyprotocol.V2_SIGNATURE + bytes([0x20 if local else 0x21, family]) + struct.pack("!H", len(body)) + body


# -- the parser alone ---------------------------------------------------------------------------


def test_parser_reads_v1_v2_and_waits_for_the_rest() -> None:
    header = parse_header(V1 + b"EHLO x\r\n")
    assert header is not None and header.length == len(V1)
    assert (header.source.host, header.source.port) == ("203.0.113.7", 51234)  # type: ignore[union-attr]
    six = v2("2001:db8::7", "2001:db8::1")
    header = parse_header(six)
    assert header is not None and header.source is not None and header.source.host == "2001:db8::7"
    for whole in (V1, six):
        assert all(parse_header(whole[:i]) is None for i in range(len(whole)))
    local = parse_header(v2("203.0.113.7", local=True))
    assert local is not None and local.source is None
    unknown = parse_header(b"PROXY UNKNOWN\r\n")
    assert unknown is not None and unknown.source is None
    mapped = parse_header(v2("::ffff:203.0.113.9", "::ffff:192.0.2.1"))
    assert mapped is not None and mapped.source is not None and mapped.source.host == "203.0.113.9"


@pytest.mark.parametrize(
    "data",
    [
        b"EHLO client.example\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 51234\r\n",
        b"PROXY TCP4 2001:db8::1 192.0.2.1 1 2\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 65536\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 -1 587\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 587\n",
        b"PROXY UDP4 203.0.113.7 192.0.2.1 51234 587\r\n",
        b"PROXY TCP4 " + b"1" * 96,  # 107 bytes and still no CRLF
        proxyprotocol.V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 217),  # longer than 16 + 216
        proxyprotocol.V2_SIGNATURE + b"\x11\x11\x00\x0c",  # version 1 in a v2 header
        proxyprotocol.V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12),  # UDP
        proxyprotocol.V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),  # too short for TCP4 addresses
    ],
)
def test_parser_refuses(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_header(data)


def test_parser_takes_the_largest_v2_header() -> None:
    # 216 bytes of address block: the addresses, then TLVs (HAProxy's optional extras), ignored.
    body = ipaddress.ip_address("203.0.113.7").packed + bytes(4) + struct.pack("!HH", 1, 2)
    body += b"\x04" + struct.pack("!H", 216 - len(body) - 3) + bytes(216 - len(body) - 3)
    header = proxyprotocol.V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body
    parsed = parse_header(header)
    assert parsed is not None and parsed.length == 16 + 216 and parsed.source is not None
    assert parsed.source.host == "203.0.113.7"


# -- a proxy with a haproxy: listener, real sockets --------------------------------------------


@dataclass
class Behind:
    """A running proxy and the port of its haproxy: listener."""

    proxy: Proxy
    port: int

    def header_factories(self) -> list[proxyprotocol.ProxyHeaderFactory]:
        factories = [getattr(service, "factory", None) for service in self.proxy.service]
        return [f for f in factories if isinstance(f, proxyprotocol.ProxyHeaderFactory)]

    def connect(self, header: bytes | None = None, **kwargs: Any) -> Client:
        """A client on the PROXY listener; with ``header``, sent first and the greeting read."""
        client = Client(self.port, read_greeting=False, **kwargs)
        if header is not None:
            client.send(header)
            client.greeting = client.reply()
        return client


Launch = Callable[..., Behind]


@pytest.fixture
def launch(tmp_path: Path, pki: PKI, upstream: ScriptedUpstream) -> Iterator[Launch]:
    """``launch(tls="none", limits="max_connections_per_ip = 1")``: the three usual listeners
    plus a fourth, ``haproxy:tcp:PORT:interface=127.0.0.1`` (a [[listener]] after other tables)."""
    started: list[Proxy] = []

    def make(tls: str = "none", limits: str = "") -> Behind:
        directory = tmp_path / f"proxy{len(started)}"
        directory.mkdir()
        port = free_port()
        extra = (f"[limits]\n{limits}\n" if limits else "") + (
            f'\n[[listener]]\nendpoint = "haproxy:tcp:{port}:interface=127.0.0.1"\ntls = "{tls}"\n'
        )
        path, ports = write_config(directory, pki, upstream.toml(), extra=extra)
        proxy = start_proxy(path, ports)
        started.append(proxy)
        assert proxy.service.config.listeners[-1].endpoint.startswith("haproxy:tcp:")
        wait_listening(port)
        return Behind(proxy, port)

    yield make
    for proxy in started:
        if proxy.service.running:
            proxy.stop()


def failed_auth(client: Client) -> None:
    client.ehlo()
    assert client.command(auth_plain(CLIENT_USER, "wrong")).startswith(b"535 ")


def test_v1_header_then_smtp_with_the_clients_address(launch: Launch, events: list[dict[str, Any]]) -> None:
    behind = launch()
    with behind.connect() as client:
        # Nothing until the header: the session has not started (and the connection stays open).
        assert client.pending(0.3) == []
        assert client.buf == b""
        client.send(V1)
        assert client.reply() == GREETING
        failed_auth(client)
        client.login()
    wait_for(lambda: bool(fields_of(events, "auth ok")))
    assert [f["client"] for f in fields_of(events, "auth failed")] == ["203.0.113.7"]
    assert [f["client"] for f in fields_of(events, "auth ok")] == ["203.0.113.7"]


@pytest.mark.parametrize("source", ["198.51.100.23", "2001:db8:5::23"])
def test_v2_header_ipv4_and_ipv6(launch: Launch, events: list[dict[str, Any]], source: str) -> None:
    behind = launch()
    destination = "192.0.2.1" if ":" not in source else "2001:db8::1"
    with behind.connect(v2(source, destination)) as client:
        assert client.greeting == GREETING
        failed_auth(client)
    wait_for(lambda: bool(fields_of(events, "auth failed")))
    assert [f["client"] for f in fields_of(events, "auth failed")] == [source]


def test_v2_local_header_uses_the_connections_own_address(launch: Launch, events: list[dict[str, Any]]) -> None:
    """HAProxy's health checks send LOCAL: the session is HAProxy's own, from 127.0.0.1 here."""
    behind = launch()
    with behind.connect(v2("203.0.113.7", local=True), source="127.0.0.5") as client:
        assert client.greeting == GREETING
        failed_auth(client)
    wait_for(lambda: bool(fields_of(events, "auth failed")))
    assert [f["client"] for f in fields_of(events, "auth failed")] == ["127.0.0.5"]


def test_per_ip_connection_limit_counts_the_header_address(launch: Launch, events: list[dict[str, Any]]) -> None:
    behind = launch(limits="max_connections_per_ip = 1")
    first = behind.connect(V1)
    assert first.greeting == GREETING
    # Same PROXY source, through the same HAProxy address: refused.
    second = behind.connect(V1)
    assert second.greeting == TOO_MANY
    assert second.wait_closed() == b""
    second.close()
    # Another client through the very same HAProxy connection address: accepted.
    other = behind.connect(V1.replace(b"203.0.113.7", b"203.0.113.8"))
    assert other.greeting == GREETING
    other.ehlo()
    other.close()
    first.close()
    # (start_proxy's probes of the other listeners, from 127.0.0.1, can trip the limit too.)
    refused = [f["client"] for f in fields_of(events, "connection refused") if f["client"] != "127.0.0.1"]
    assert refused == ["203.0.113.7"]


@pytest.mark.parametrize("header", [V1, v2("203.0.113.7")], ids=["v1", "v2"])
def test_header_split_byte_by_byte(launch: Launch, events: list[dict[str, Any]], header: bytes) -> None:
    behind = launch()
    with behind.connect() as client:
        for i in range(len(header)):
            client.send(header[i : i + 1])
            time.sleep(0.002)
        assert client.reply() == GREETING
        failed_auth(client)
    wait_for(lambda: bool(fields_of(events, "auth failed")))
    assert [f["client"] for f in fields_of(events, "auth failed")] == ["203.0.113.7"]


@pytest.mark.parametrize(
    "garbage",
    [
        b"EHLO client.example\r\n",
        b"GET / HTTP/1.1\r\nHost: relay.test\r\n\r\n",
        b"PROXY TCP4 " + b"9" * 200 + b"\r\n",
        proxyprotocol.V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 4096) + bytes(4096),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),  # a TLS ClientHello
    ],
    ids=["smtp", "http", "long-v1", "long-v2", "tls"],
)
def test_no_header_no_greeting(launch: Launch, events: list[dict[str, Any]], garbage: bytes) -> None:
    behind = launch()
    with behind.connect() as client:
        try:
            client.send(garbage)
        except OSError:
            pass  # already closed and reset: fine too
        assert client.wait_closed() == b""
    wait_for(lambda: bool(fields_of(events, "PROXY header refused")))
    [refused] = fields_of(events, "PROXY header refused")
    assert refused["proxy"] == "127.0.0.1"
    assert "client" not in refused, "fail2ban must never see HAProxy's address as a client"
    assert not fields_of(events, "auth failed") and not fields_of(events, "connection refused")


def test_header_and_ehlo_in_one_packet(launch: Launch) -> None:
    behind = launch()
    with behind.connect() as client:
        client.send(V1 + b"EHLO client.example\r\n")
        assert client.reply() == GREETING
        assert client.reply().startswith(b"250-relay.test")
        client.login()


def test_header_timeout(launch: Launch, events: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxyprotocol, "HEADER_TIMEOUT", 0.5)
    behind = launch()
    with behind.connect() as client:
        client.send(V1[:20])
        started = time.monotonic()
        assert client.wait_closed() == b""
        assert 0.3 < time.monotonic() - started < 5
    wait_for(lambda: bool(fields_of(events, "PROXY header refused")))
    [refused] = fields_of(events, "PROXY header refused")
    assert refused["reason"] == "no complete PROXY header within 0.5 seconds"


def test_shutdown_closes_connections_still_without_header(launch: Launch, events: list[dict[str, Any]]) -> None:
    behind = launch()
    with behind.connect() as client:
        client.send(V1[:10])
        # Stop only once the proxy has accepted this connection (before, the kernel resets it).
        [factory] = behind.header_factories()
        port = client.sock.getsockname()[1]
        wait_for(lambda: any(p.waiting and p.transport.getPeer().port == port for p in list(factory.protocols)))
        behind.proxy.stop()
        assert client.wait_closed() == b""
    wait_for(lambda: bool(fields_of(events, "PROXY header refused")))
    # (wait_listening's probe may still count as waiting too: its EOF can be read after the stop.)
    assert {f["reason"] for f in fields_of(events, "PROXY header refused")} == {"listener stopped"}


def test_implicit_tls_behind_the_header(launch: Launch, pki: PKI, events: list[dict[str, Any]]) -> None:
    """TCP, then the PROXY header in clear, then TLS, then SMTP (as HAProxy's send-proxy-v2 does)."""
    behind = launch(tls="implicit")
    with behind.connect() as client:
        client.send(v2("203.0.113.7"))
        client.starttls(pki.client_context())
        assert client.reply() == GREETING
        failed_auth(client)
    wait_for(lambda: bool(fields_of(events, "auth failed")))
    assert [f["client"] for f in fields_of(events, "auth failed")] == ["203.0.113.7"]


def test_starttls_behind_the_header(launch: Launch, pki: PKI, events: list[dict[str, Any]]) -> None:
    behind = launch(tls="starttls")
    with behind.connect(V1) as client:
        assert client.greeting == GREETING
        client.ehlo()
        assert client.command(b"STARTTLS").startswith(b"220 ")
        client.starttls(pki.client_context())
        failed_auth(client)
        client.login()
    wait_for(lambda: bool(fields_of(events, "auth ok")))
    assert [f["client"] for f in fields_of(events, "auth failed")] == ["203.0.113.7"]


def test_a_client_that_goes_away_before_its_header(launch: Launch) -> None:
    behind = launch()
    for _ in range(5):
        with behind.connect() as client:
            client.send(V1[:15])
    # Nothing half-started was counted against anyone: a full-limit session still works.
    with behind.connect(V1) as client:
        assert client.greeting == GREETING


# -- a real HAProxy -----------------------------------------------------------------------------


@pytest.fixture
def haproxy_bin() -> str:
    found = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None)
    if found is None:
        pytest.fail(
            "haproxy is not installed, and these tests need the real one: "
            "apt-get install haproxy (.ci/run installs it when missing)"
        )
    return found


@dataclass
class HAProxy:
    process: subprocess.Popen[bytes]
    stats: Path
    log: Path

    def show_stat(self) -> list[dict[str, str]]:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.stats))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return list(csv.DictReader(io.StringIO(data.decode().lstrip("# "))))


@pytest.fixture
def run_haproxy(tmp_path: Path, haproxy_bin: str) -> Iterator[Callable[[str], HAProxy]]:
    """Start ``haproxy -db`` with a global section (stats socket) and the given proxies."""
    running: list[subprocess.Popen[bytes]] = []

    def start(proxies: str) -> HAProxy:
        stats = tmp_path / f"haproxy{len(running)}.sock"
        config = tmp_path / f"haproxy{len(running)}.cfg"
        log = tmp_path / f"haproxy{len(running)}.log"
        config.write_text(
            f"""
global
    stats socket {stats} mode 600 level admin

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s

{proxies}
"""
        )
        checked = subprocess.run([haproxy_bin, "-c", "-f", str(config)], capture_output=True, text=True, check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        process = subprocess.Popen([haproxy_bin, "-db", "-f", str(config)], stdout=log.open("wb"), stderr=subprocess.STDOUT)
        running.append(process)
        try:
            wait_for(lambda: stats.exists() or process.poll() is not None)
        except AssertionError:
            raise AssertionError(f"haproxy did not start: {log.read_text()}") from None
        assert process.poll() is None, f"haproxy exited: {log.read_text()}"
        return HAProxy(process, stats, log)

    yield start
    for process in running:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def haproxy_version(haproxy_bin: str) -> str:
    return subprocess.run([haproxy_bin, "-v"], capture_output=True, text=True, check=False).stdout.splitlines()[0]


@pytest.mark.parametrize(
    ("send_proxy", "tls"),
    [("send-proxy-v2", "none"), ("send-proxy", "none"), ("send-proxy-v2", "implicit")],
)
def test_through_haproxy(
    launch: Launch,
    run_haproxy: Callable[[str], HAProxy],
    upstream: ScriptedUpstream,
    pki: PKI,
    events: list[dict[str, Any]],
    send_proxy: str,
    tls: str,
) -> None:
    behind = launch(tls=tls)
    front = free_port()
    run_haproxy(
        f"""
frontend submission
    bind 127.0.0.1:{front}
    default_backend relayproxy

backend relayproxy
    server relay1 127.0.0.1:{behind.port} {send_proxy}
"""
    )
    wait_listening(front)
    source = ("127.0.0.9", 0)
    smtp: smtplib.SMTP
    if tls == "implicit":
        smtp = smtplib.SMTP_SSL("127.0.0.1", front, timeout=20, source_address=source, context=pki.client_context())
    else:
        smtp = smtplib.SMTP("127.0.0.1", front, timeout=20, source_address=source)
    with smtp:
        smtp.login(CLIENT_USER, CLIENT_PASSWORD)
        smtp.sendmail("app1@example.org", ["bob@example.net"], b"Subject: via HAProxy\r\n\r\nhello\r\n")
    wait_for(lambda: bool(fields_of(events, "message")))
    assert [f["client"] for f in fields_of(events, "auth ok")] == ["127.0.0.9"]
    [message] = fields_of(events, "message")
    assert message["client"] == "127.0.0.9" and message["outcome"] == "relayed"
    assert upstream.bodies and b"via HAProxy" in upstream.bodies[-1]


def test_haproxy_health_checks_pass(launch: Launch, run_haproxy: Callable[[str], HAProxy], haproxy_bin: str) -> None:
    """``option smtpchk`` with send-proxy-v2, as in etc/haproxy.cfg: HAProxy's checks send a LOCAL
    header (then TLS for the implicit-TLS backend, with check-ssl) and see a 2xx greeting."""
    starttls, implicit = launch(tls="starttls"), launch(tls="implicit")
    haproxy = run_haproxy(
        f"""
backend relay_submission
    option smtpchk EHLO haproxy.test
    server relay1 127.0.0.1:{starttls.port} send-proxy-v2 check inter 200ms

backend relay_submissions
    option smtpchk EHLO haproxy.test
    server relay1 127.0.0.1:{implicit.port} send-proxy-v2 check inter 200ms check-ssl verify none
"""
    )

    def statuses() -> dict[str, tuple[str, str]]:
        return {row["pxname"]: (row["status"], row["check_status"]) for row in haproxy.show_stat() if row["svname"] == "relay1"}

    try:
        wait_for(lambda: set(statuses().values()) == {("UP", "L7OK")}, timeout=15)
    except AssertionError:
        raise AssertionError(f"{haproxy_version(haproxy_bin)}: checks {statuses()}; {haproxy.log.read_text()}") from None


def test_the_example_haproxy_config_is_valid(haproxy_bin: str) -> None:
    example = Path(__file__).parent.parent / "etc" / "haproxy.cfg"
    checked = subprocess.run([haproxy_bin, "-c", "-f", str(example)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert sum(line.strip().startswith("server ") and "send-proxy-v2" in line for line in example.read_text().splitlines()) == 4


def test_haproxy_listener_uses_our_header_reader(launch: Launch) -> None:
    """The haproxy: listener is ours, not Twisted's: Twisted's connects the session at TCP connect."""
    behind = launch()
    assert len(behind.header_factories()) == 1
