#!/usr/bin/env python3
"""A distant SMTP sink: every reply leaves one round trip (RTT) after its command arrived.

It models a provider RTT away on a loopback connection: what the client sends reaches the sink at
once and each reply is held back by the whole RTT, measured from the moment the command's line
arrived. Replies to pipelined commands (RFC 2920) each leave RTT after their own command arrived,
in order, those due at the same moment in one write. The greeting leaves ``greeting_rtts`` x RTT
after the connection was accepted (default 2: the TCP handshake's round trip and then the
greeting's, so connect + greeting costs what it costs over a real link).

EHLO offers PIPELINING, SIZE, 8BITMIME and AUTH PLAIN LOGIN; AUTH is answered 235 (anything is
accepted), MAIL/RCPT/RSET/NOOP 250, DATA 354; the body is read up to CRLF.CRLF and discarded, and its
250 leaves RTT after the final dot arrived. QUIT is answered 221 (after RTT) and the connection closed.

Usage: python bench/distant_sink.py --port 2526 [--rtt-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import selectors
import socket
import time
from collections import deque

EHLO = (b"250-distant-sink.example.net\r\n250-PIPELINING\r\n250-SIZE 1073741824\r\n250-8BITMIME\r\n"
        b"250 AUTH PLAIN LOGIN\r\n")
END = b"\r\n.\r\n"
SPIN = 0.0015  # seconds before a reply is due that its timer fires; the rest is waited on the clock
CLOSE = b""  # a queued "reply" that closes the connection once the replies before it are written


class DistantSink(asyncio.Protocol):
    def __init__(self, rtt: float, greeting_rtts: float) -> None:
        self.rtt, self.greeting_rtts = rtt, greeting_rtts
        self.loop = asyncio.get_running_loop()
        self.buf = bytearray()
        self.in_data = False
        self.transport: asyncio.Transport | None = None
        self.due: deque[tuple[float, bytes]] = deque()  # (when, reply), in arrival order
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.later(self.loop.time() + self.greeting_rtts * self.rtt, b"220 distant-sink.example.net ESMTP bench\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.due.clear()
        self.transport = None

    def later(self, when: float, reply: bytes) -> None:
        """Queue a reply for ``when``. Times only grow (arrival + a constant), so the queue stays in order."""
        self.due.append((when, reply))
        if self.timer is None:
            self.timer = self.loop.call_at(when - SPIN, self.flush)

    def flush(self) -> None:
        """Write every reply that is due, in order and in one write, then wait for the next one."""
        self.timer = None
        if self.transport is None:
            return
        # The timer fired up to SPIN early; wait out the rest on the clock, so that a reply leaves on
        # time rather than when the kernel next wakes this process (0.1-1 ms late on a busy VM, which
        # over 50 round trips would add up to more than the proxy's whole overhead).
        while self.due and 0 < self.due[0][0] - time.monotonic() <= SPIN:
            pass
        now = self.loop.time()
        out: list[bytes] = []
        while self.due and self.due[0][0] <= now:
            reply = self.due.popleft()[1]
            if reply == CLOSE:
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            out.append(reply)
        if out:
            self.transport.write(b"".join(out))
        if self.due:
            self.timer = self.loop.call_at(self.due[0][0] - SPIN, self.flush)

    def data_received(self, data: bytes) -> None:
        due = self.loop.time() + self.rtt  # every line in this chunk arrived now
        buf = self.buf
        buf += data
        while buf:
            if self.in_data:
                end = buf.find(END)
                if end < 0:
                    del buf[: max(0, len(buf) - 4)]  # keep only what could start the terminator
                    break
                del buf[: end + 5]
                self.in_data = False
                self.later(due, b"250 2.0.0 Ok: queued\r\n")
                continue
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > 4096:
                    self.later(due, b"500 5.5.2 line too long\r\n")
                    buf.clear()
                break
            verb = bytes(buf[:4]).upper()
            del buf[: end + 2]
            if verb in (b"EHLO", b"LHLO"):
                self.later(due, EHLO)
            elif verb == b"HELO":
                self.later(due, b"250 distant-sink.example.net\r\n")
            elif verb == b"AUTH":
                self.later(due, b"235 2.7.0 Authentication successful\r\n")
            elif verb == b"DATA":
                self.later(due, b"354 End data with <CR><LF>.<CR><LF>\r\n")
                self.in_data = True
                buf[0:0] = b"\r\n"  # the DATA line's CRLF, so that an empty body is found as CRLF.CRLF too
            elif verb == b"QUIT":
                self.later(due, b"221 2.0.0 Bye\r\n")
                self.later(due, CLOSE)
                buf.clear()
                return
            else:
                self.later(due, b"250 2.0.0 Ok\r\n")


async def serve(host: str, port: int, rtt: float, greeting_rtts: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: DistantSink(rtt, greeting_rtts), host, port, backlog=1024, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description="An SMTP sink whose every reply leaves one RTT after its command arrived.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rtt-ms", type=float, default=20.0, help="the round trip each reply is held back by (default 20)")
    ap.add_argument("--greeting-rtts", type=float, default=2.0,
                    help="the greeting leaves this many RTTs after the connection was accepted (default 2: handshake + greeting)")
    args = ap.parse_args()
    # select(2) takes its timeout in microseconds; epoll and poll round it up to the next millisecond,
    # which would hold each reply back by up to 1 ms more than the RTT.
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    try:
        loop.run_until_complete(serve(args.host, args.port, args.rtt_ms / 1000, args.greeting_rtts))
    except KeyboardInterrupt:
        pass
    finally:
        loop.close()


if __name__ == "__main__":
    main()
