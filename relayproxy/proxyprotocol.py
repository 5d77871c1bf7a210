"""The PROXY protocol (v1 and v2) for listeners behind HAProxy: ``endpoint = "haproxy:tcp:..."``.

HAProxy opens a TCP connection to us and first sends one header naming the client it accepted the
connection from. Twisted's own ``HAProxyProtocolWrapper`` connects the wrapped protocol as soon as
TCP connects, before that header arrived, so the SMTP session would see HAProxy's address in
``connectionMade`` (per-IP limits, AUTH throttling and every log line keyed on one address). This
wrapper starts the wrapped protocol only once the whole header has been read, so ``getPeer()`` is
the real client from the session's first moment. A connection whose header is malformed, too long
or missing (the peer says nothing for ``timeout`` seconds) is closed before the SMTP greeting.

Only public Twisted API is used: ``policies.ProtocolWrapper`` (which relays every transport call
of the wrapped protocol to the real transport) and ``WrappingFactory``; the header parser is ours
(https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocol, IProtocolFactory, IReactorTime, ITransport
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from relayproxy.listening import ListenerService
from relayproxy.logs import EventLog

log = EventLog("relayproxy.proxyprotocol")

ENDPOINT_PREFIX = "haproxy:"
"""A listener endpoint starting with this takes the PROXY header; the rest is the real endpoint."""

HEADER_TIMEOUT = 10.0
"""Seconds a new connection has to send its whole PROXY header."""

V1_MAX = 107
"""The longest v1 header, CRLF included (spec 2.1)."""

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX_PAYLOAD = 216
"""The longest v2 address block we take (a pair of Unix socket paths); larger headers are refused."""

_V1_SIGNATURE = b"PROXY "
_V2_FIXED = 16


class ProxyHeaderError(ValueError):
    """The bytes are not an acceptable PROXY header; the message says why (for the log)."""


@dataclass(frozen=True)
class ProxyHeader:
    """A complete header: ``length`` bytes long; ``source``/``destination`` are None when the
    header says to use the connection's own addresses (v1 UNKNOWN, v2 LOCAL, v2 UNSPEC or UNIX)."""

    length: int
    version: int
    source: IPv4Address | IPv6Address | None
    destination: IPv4Address | IPv6Address | None


def parse_header(data: bytes) -> ProxyHeader | None:
    """The PROXY header at the start of ``data``; None while ``data`` is only a prefix of one.

    Raises ProxyHeaderError as soon as ``data`` cannot be the start of an acceptable header, so
    at most ``V1_MAX`` or ``16 + V2_MAX_PAYLOAD`` bytes are ever buffered.
    """
    if data[: len(V2_SIGNATURE)] == V2_SIGNATURE[: len(data)]:
        return _parse_v2(data) if len(data) >= _V2_FIXED else None
    if data[: len(_V1_SIGNATURE)] == _V1_SIGNATURE[: len(data)]:
        return _parse_v1(data)
    raise ProxyHeaderError("no PROXY protocol signature")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or b"\n" in data:
            raise ProxyHeaderError("v1 header without CRLF within 107 bytes")
        return None
    parts = data[:end].split(b" ")
    if len(parts) >= 2 and parts[1] == b"UNKNOWN":
        return ProxyHeader(end + 2, 1, None, None)
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("v1 header is not PROXY TCP4|TCP6 SRC DST SPORT DPORT")
    family = ipaddress.IPv4Address if parts[1] == b"TCP4" else ipaddress.IPv6Address
    try:
        source, destination = (family(p.decode("ascii")) for p in parts[2:4])
    except ValueError:
        raise ProxyHeaderError(f"v1 header has an address that is not {parts[1].decode()}") from None
    sport, dport = (_v1_port(p) for p in parts[4:6])
    return ProxyHeader(end + 2, 1, _address(source, sport), _address(destination, dport))


def _v1_port(text: bytes) -> int:
    if not (text.isdigit() and len(text) <= 5 and int(text) <= 65535):
        raise ProxyHeaderError("v1 header has a port that is not a number from 0 to 65535")
    return int(text)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    version_command, family_protocol, payload = struct.unpack("!BBH", data[12:_V2_FIXED])
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"v2 header with version {version_command >> 4}")
    command = version_command & 0x0F
    if command not in (0, 1):
        raise ProxyHeaderError(f"v2 header with unknown command {command}")
    if payload > V2_MAX_PAYLOAD:
        raise ProxyHeaderError(f"v2 header of {_V2_FIXED + payload} bytes, more than {_V2_FIXED + V2_MAX_PAYLOAD}")
    length = _V2_FIXED + payload
    if len(data) < length:
        return None
    block = data[_V2_FIXED:length]
    if command == 0:
        # LOCAL: HAProxy's own connection (a health check); the addresses are the connection's.
        return ProxyHeader(length, 2, None, None)
    if family_protocol == 0x11:  # TCP over IPv4
        if payload < 12:
            raise ProxyHeaderError("v2 TCP4 header too short for its addresses")
        src4, dst4, sport, dport = struct.unpack("!4s4sHH", block[:12])
        return ProxyHeader(length, 2, _address(ipaddress.IPv4Address(src4), sport), _address(ipaddress.IPv4Address(dst4), dport))
    if family_protocol == 0x21:  # TCP over IPv6
        if payload < 36:
            raise ProxyHeaderError("v2 TCP6 header too short for its addresses")
        src6, dst6, sport, dport = struct.unpack("!16s16sHH", block[:36])
        return ProxyHeader(length, 2, _address(ipaddress.IPv6Address(src6), sport), _address(ipaddress.IPv6Address(dst6), dport))
    if family_protocol in (0x00, 0x31):
        # UNSPEC, or a client on one of HAProxy's Unix sockets: no IP address to report.
        return ProxyHeader(length, 2, None, None)
    raise ProxyHeaderError(f"v2 header for an unsupported family/protocol 0x{family_protocol:02x} (not TCP)")


def _address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> IPv4Address | IPv6Address:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        # One client, one key for per-IP limits, whichever family HAProxy's frontend listens on.
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        return IPv4Address("TCP", str(ip), port)
    return IPv6Address("TCP", ip.compressed, port)


class ProxyHeaderProtocol(ProtocolWrapper):
    """Reads the PROXY header, then connects the wrapped protocol with itself as its transport.

    Until then the wrapped protocol has not been told about the connection at all; if the
    connection ends before (bad header, timeout, peer gone) it never is.
    """

    factory: ProxyHeaderFactory

    def __init__(self, factory: ProxyHeaderFactory, wrappedProtocol: IProtocol) -> None:
        super().__init__(factory, wrappedProtocol)
        self._buffer = b""
        self._header: ProxyHeader | None = None
        self._refused = False
        self._deadline: IDelayedCall | None = None

    @property
    def waiting(self) -> bool:
        """Still waiting for the header (the wrapped protocol has not started)."""
        return self._header is None and not self._refused

    def makeConnection(self, transport: ITransport) -> None:
        # ProtocolWrapper.makeConnection without its last step (wrappedProtocol.makeConnection),
        # which _started does once the header is in.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)  # type: ignore[no-untyped-call]
        self.factory.registerProtocol(self)  # type: ignore[no-untyped-call]
        self._deadline = self.factory.clock.callLater(self.factory.timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self._header is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._refused:
            return
        self._buffer += data
        try:
            header = parse_header(self._buffer)
        except ProxyHeaderError as e:
            self.refuse(str(e))
            return
        if header is not None:
            rest, self._buffer = self._buffer[header.length :], b""
            self._start(header, rest)

    def _start(self, header: ProxyHeader, rest: bytes) -> None:
        self._cancel_deadline()
        self._header = header
        # The wrapper provides the transport's interfaces (makeConnection's directlyProvides).
        self.wrappedProtocol.makeConnection(cast(ITransport, self))
        if rest and not self.disconnecting:
            # What the client sent right behind the header (an early EHLO, a TLS ClientHello).
            self.wrappedProtocol.dataReceived(rest)

    def refuse(self, reason: str) -> None:
        """Close the connection before any SMTP: nothing is written to it."""
        self._cancel_deadline()
        self._refused = True
        self._buffer = b""
        peer = self._transport_peer()
        log.warn("PROXY header refused", proxy=getattr(peer, "host", str(peer)), reason=reason)
        assert self.transport is not None
        self.transport.loseConnection()

    def _timed_out(self) -> None:
        self._deadline = None
        if self.waiting:
            self.refuse(f"no complete PROXY header within {self.factory.timeout:g} seconds")

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # type: ignore[no-untyped-call]
        self._cancel_deadline()
        self.factory.unregisterProtocol(self)  # type: ignore[no-untyped-call]
        if self._header is not None:
            self.wrappedProtocol.connectionLost(reason)

    def _transport_peer(self) -> IAddress:
        assert self.transport is not None
        return self.transport.getPeer()

    def getPeer(self) -> IAddress:
        if self._header is not None and self._header.source is not None:
            return self._header.source
        return self._transport_peer()

    def getHost(self) -> IAddress:
        if self._header is not None and self._header.destination is not None:
            return self._header.destination
        assert self.transport is not None
        return self.transport.getHost()


class ProxyHeaderFactory(WrappingFactory[ProxyHeaderProtocol]):
    """Wraps a listener's factory (outermost: TCP, then the PROXY header, then TLS, then SMTP)."""

    protocol = ProxyHeaderProtocol

    def __init__(self, wrappedFactory: IProtocolFactory, clock: IReactorTime, timeout: float | None = None) -> None:
        super().__init__(wrappedFactory)  # type: ignore[no-untyped-call]
        self.clock = clock
        self.timeout = HEADER_TIMEOUT if timeout is None else timeout
        self.protocols: dict[ProxyHeaderProtocol, int]

    def logPrefix(self) -> str:
        inner = getattr(self.wrappedFactory, "logPrefix", None)
        return f"{inner() if callable(inner) else type(self.wrappedFactory).__name__} (PROXY)"

    def doStop(self) -> None:
        # The listener stopped (shutdown): connections still without a header never start a session.
        for protocol in list(self.protocols):
            if protocol.waiting:
                protocol.refuse("listener stopped")
        super().doStop()  # type: ignore[no-untyped-call]


def listener_service(endpoint: str, factory: IProtocolFactory, reactor: Any) -> ListenerService:
    """The service listening on a [[listener]] endpoint; ``haproxy:INNER`` listens on INNER and
    wraps ``factory`` (already TLS-wrapped for implicit TLS) in the PROXY header reader."""
    inner = endpoint
    if endpoint[: len(ENDPOINT_PREFIX)].lower() == ENDPOINT_PREFIX:
        inner = endpoint[len(ENDPOINT_PREFIX) :]
        factory = ProxyHeaderFactory(factory, reactor)
    return ListenerService(endpoint, serverFromString(reactor, inner), factory)  # type: ignore[no-untyped-call]
