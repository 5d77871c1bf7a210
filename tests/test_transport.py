"""write_now: sent in the same reactor turn when nothing is queued, in order when something is."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from harness import ensure_reactor, wait_for
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.tcp import Port
from twisted.internet.threads import blockingCallFromThread

from relayproxy.transport import write_now


class _Held(Protocol):
    connections: list[_Held] = []

    def connectionMade(self) -> None:
        self.connections.append(self)


@pytest.fixture
def connection() -> Iterator[tuple[_Held, socket.socket]]:
    ensure_reactor()
    _Held.connections = []
    port: Port = blockingCallFromThread(reactor, reactor.listenTCP, 0, Factory.forProtocol(_Held), interface="127.0.0.1")  # type: ignore[attr-defined]
    client = socket.socket()
    # Small kernel buffers on both ends, so that a few MB must wait in Twisted's queue whatever
    # this machine's autotuning limits are.
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", port.getHost().port))
    wait_for(lambda: bool(_Held.connections))
    yield _Held.connections[0], client
    client.close()
    blockingCallFromThread(reactor, port.stopListening)


def test_sent_before_the_reactor_turn_ends(connection: tuple[_Held, socket.socket]) -> None:
    server, client = connection
    client.settimeout(5)

    def write_and_read_in_one_turn() -> bytes:
        write_now(server.transport, b"250 2.0.0 Ok\r\n")
        # The reactor thread is busy here: only a send made by write_now itself can arrive.
        return client.recv(100)

    assert blockingCallFromThread(reactor, write_and_read_in_one_turn) == b"250 2.0.0 Ok\r\n"


def test_order_kept_when_the_kernel_buffer_is_full(connection: tuple[_Held, socket.socket]) -> None:
    server, client = connection
    pieces = [bytes([65 + i % 26]) * 65536 for i in range(50)] + [b"tail\r\n"]

    def write_all() -> int:
        server.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # type: ignore[union-attr]
        for piece in pieces:
            write_now(server.transport, piece)
        queued: int = server.transport._tempDataLen + len(server.transport.dataBuffer)  # type: ignore[attr-defined]
        return queued

    # Nobody reads yet: most of 3 MB must wait in Twisted's queue, and later pieces behind it.
    assert blockingCallFromThread(reactor, write_all) > 0
    expected = b"".join(pieces)
    received = bytearray()
    client.settimeout(10)
    while len(received) < len(expected):
        data = client.recv(1 << 20)
        assert data, "connection closed early"
        received += data
    assert bytes(received) == expected
