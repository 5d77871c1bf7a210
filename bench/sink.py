#!/usr/bin/env python3
"""A minimal fast SMTP sink, for machines without Postfix's smtp-sink.

Answers EHLO with PIPELINING/8BITMIME/SIZE, AUTH with 235 (anything accepted), MAIL/RCPT/RSET/NOOP
with 250, DATA with 354, reads the body up to CRLF.CRLF and discards it, then 250. Pipelined commands
are answered in order. Usage: python bench/sink.py --port 2526
"""

from __future__ import annotations

import argparse
import asyncio
import socket

EHLO = b"250-sink.example.net\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 1073741824\r\n250 AUTH PLAIN LOGIN\r\n"
END = b"\r\n.\r\n"


class Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.in_data = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(b"220 sink.example.net ESMTP bench sink\r\n")

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        buf = self.buf
        buf += data
        out = []
        while buf:
            if self.in_data:
                end = buf.find(END)
                if end < 0:
                    # Keep only what could be the start of the terminator.
                    del buf[: max(0, len(buf) - 4)]
                    break
                del buf[: end + 5]
                self.in_data = False
                out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > 4096:
                    out.append(b"500 5.5.2 line too long\r\n")
                    buf.clear()
                break
            line = bytes(buf[:end])
            del buf[: end + 2]
            verb = line[:4].upper()
            if verb in (b"EHLO", b"LHLO"):
                out.append(EHLO)
            elif verb == b"HELO":
                out.append(b"250 sink.example.net\r\n")
            elif verb == b"AUTH":
                out.append(b"235 2.7.0 Authentication successful\r\n")
            elif verb == b"DATA":
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                self.in_data = True
                # Put back the CRLF that ended the DATA line, so an empty body is found as CRLF.CRLF too.
                buf[0:0] = b"\r\n"
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            else:
                out.append(b"250 2.0.0 Ok\r\n")
        if out:
            self.transport.write(b"".join(out))


async def main(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Sink, host, port, backlog=4096, reuse_address=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="A minimal fast SMTP sink.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    try:
        asyncio.run(main(args.host, args.port))
    except KeyboardInterrupt:
        pass
