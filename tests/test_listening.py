"""Every listener of a configuration is bound before any serves: one that cannot bind (a port in
use, an address not on this host) stops the whole start, and nothing is left listening.

The twistd process (exit status, the one line on stderr) is in test_twistd.py; reloads in
test_reload.py.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import PKI, _listening, ensure_reactor, free_port, reactor, wait_for, write_config
from peers import ScriptedUpstream
from twisted.internet.threads import blockingCallFromThread

from relayproxy.config import load_config
from relayproxy.listening import CannotListen
from relayproxy.tap import build_service


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that a socket of the test listens on."""
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        yield port


def start(path: Path) -> None:
    ensure_reactor()
    config = load_config(path)
    blockingCallFromThread(reactor, lambda: build_service(config, reactor).startService())


def test_a_listener_on_a_port_in_use_stops_the_start_and_unbinds_the_others(
    tmp_path: Path, pki: PKI, upstream: ScriptedUpstream, busy_port: int
) -> None:
    extra = f'[[listener]]\nendpoint = "tcp:{busy_port}:interface=127.0.0.1"\ntls = "starttls"\n'
    path, ports = write_config(tmp_path, pki, upstream.toml(), extra=extra)
    with pytest.raises(CannotListen) as refused:
        start(path)
    assert str(refused.value) == (
        f"cannot listen on tcp:{busy_port}:interface=127.0.0.1: [Errno {errno.EADDRINUSE}] {os.strerror(errno.EADDRINUSE)}"
    )
    # The three listeners before it were bound, and are closed again.
    wait_for(lambda: not any(_listening(port) for port in ports))


def test_a_metrics_endpoint_in_use_stops_the_start(tmp_path: Path, pki: PKI, upstream: ScriptedUpstream, busy_port: int) -> None:
    extra = f'[metrics]\nendpoint = "tcp:{busy_port}:interface=127.0.0.1"\n'
    path, ports = write_config(tmp_path, pki, upstream.toml(), extra=extra)
    with pytest.raises(CannotListen, match=f"^cannot listen on tcp:{busy_port}:interface=127.0.0.1: "):
        start(path)
    wait_for(lambda: not any(_listening(port) for port in ports))


def test_an_interface_address_not_on_this_host_stops_the_start(tmp_path: Path, pki: PKI, upstream: ScriptedUpstream) -> None:
    # 192.0.2.0/24 is TEST-NET-1: never a local address; binding it fails without sending a packet.
    extra = f'[[listener]]\nendpoint = "haproxy:tcp:{free_port()}:interface=192.0.2.1"\ntls = "implicit"\n'
    path, ports = write_config(tmp_path, pki, upstream.toml(), extra=extra)
    with pytest.raises(CannotListen) as refused:
        start(path)
    # The endpoint as configured, prefix and all: what the operator finds in the file.
    assert refused.value.endpoint.startswith("haproxy:tcp:") and refused.value.endpoint.endswith(":interface=192.0.2.1")
    assert refused.value.reason == f"[Errno {errno.EADDRNOTAVAIL}] {os.strerror(errno.EADDRNOTAVAIL)}"
    wait_for(lambda: not any(_listening(port) for port in ports))
