"""Writing to a Twisted TCP transport in the same reactor turn.

``transport.write`` only queues: the bytes go out when the reactor next polls and finds the socket
writable. For an SMTP dialogue of short replies that doubles the reactor events per command (one to
read, one to write) and adds two epoll updates each time. When nothing is queued we send at once;
whatever the kernel does not take, and every case we do not recognise (TLS, wrappers such as the
PROXY protocol's, a closing connection), goes through ``transport.write`` as usual, so ordering,
back-pressure and error handling stay Twisted's.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.tcp import Connection


def write_now(transport: Any, data: bytes) -> None:
    if isinstance(transport, Connection) and _idle(transport):
        try:
            sent: int = transport.socket.send(data)
        except OSError:
            # EAGAIN, or an error the queued write will meet again and report as Twisted does.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def _idle(transport: Connection) -> bool:
    """Connected, plaintext, not closing, and with nothing queued that must go first."""
    return bool(
        transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not getattr(transport, "TLS", True)
        and not getattr(transport, "_tempDataBuffer", True)
        and getattr(transport, "offset", -1) == len(getattr(transport, "dataBuffer", b""))
    )
