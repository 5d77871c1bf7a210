#!/usr/bin/env python3
"""The distant-upstream scenario's client: one session, sequential messages, pipelining or not.

  pipelining      RFC 2920: MAIL, every RCPT and DATA in one write, then all their replies; then the
                  body and the final dot in one write, then the final reply. Needs PIPELINING in EHLO.
  not pipelining  each command waits for its reply: MAIL, RCPT x N, DATA, body + dot.

With ``connect_per_message`` every message has its own connection (connect, greeting, EHLO, AUTH
PLAIN, the message, QUIT); otherwise one session is opened, authenticated once and kept open.
Latency per message: MAIL sent to the final 250 on an open session; connect started to the final
250 when connecting per message (QUIT and its reply are outside it). One untimed message first
warms up the path (the proxy's upstream pool and AUTH cache), as for a client that sends all day.

Usable as a library (``run(DistantConfig(...))``, which bench/run.py does) or on its own:
  python bench/distant_client.py --port 2525 --recipients 10 --pipelining --messages 40
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import socket
import sys
import time
from dataclasses import dataclass

from loadgen import Result, make_message


@dataclass
class DistantConfig:
    port: int
    host: str = "127.0.0.1"
    pipelining: bool = True
    recipients: int = 1
    connect_per_message: bool = False
    messages: int = 40  # timed messages, at most
    max_seconds: float = 10.0  # stop after this long once ``min_messages`` are done
    min_messages: int = 10
    size: int = 10 * 1024
    user: str = "bench"
    password: str = "bench-password"
    timeout: float = 60.0  # per reply


class ReplyError(Exception):
    pass


class Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
        self.reader, self.writer, self.timeout = reader, writer, timeout

    async def reply(self) -> tuple[int, bytes]:
        lines: list[bytes] = []
        while True:
            line = await asyncio.wait_for(self.reader.readuntil(b"\n"), self.timeout)
            lines.append(line)
            if line[3:4] != b"-":
                break
        text = b"".join(lines)
        try:
            return int(lines[-1][:3]), text
        except ValueError:
            raise ReplyError(f"not a reply: {text[:120]!r}") from None

    async def expect(self, what: str, *codes: int) -> bytes:
        code, text = await self.reply()
        if code not in codes:
            raise ReplyError(f"{what} -> {text.strip()[:160]!r}")
        return text

    async def command(self, line: bytes, *codes: int) -> bytes:
        self.writer.write(line)
        return await self.expect(line.split(b" ")[0].strip().decode(), *codes)

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass


async def open_session(cfg: DistantConfig) -> tuple[Session, bool]:
    """Connect, EHLO and AUTH PLAIN; returns the session and whether it offered PIPELINING."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(cfg.host, cfg.port), cfg.timeout)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    session = Session(reader, writer, cfg.timeout)
    try:
        await session.expect("greeting", 220)
        ehlo = await session.command(b"EHLO distant-client.example.org\r\n", 250)
        auth = base64.b64encode(f"\0{cfg.user}\0{cfg.password}".encode())
        await session.command(b"AUTH PLAIN " + auth + b"\r\n", 235, 250)
    except BaseException:
        session.close()
        raise
    offered = any(line[4:].strip().upper() == b"PIPELINING" for line in ehlo.splitlines())
    return session, offered


async def quit_session(session: Session) -> None:
    try:
        session.writer.write(b"QUIT\r\n")
        await asyncio.wait_for(session.reply(), 5)
    except Exception:  # noqa: BLE001 - the message is already accepted
        pass
    session.close()


async def send_message(session: Session, cfg: DistantConfig, payload: bytes, pipelining: bool) -> None:
    """One message; returns once its final 250 arrived."""
    mail = b"MAIL FROM:<bench@example.org> BODY=8BITMIME SIZE=%d\r\n" % len(payload)
    rcpts = [b"RCPT TO:<rcpt%d@example.net>\r\n" % i for i in range(cfg.recipients)]
    if pipelining:
        session.writer.write(b"".join([mail, *rcpts, b"DATA\r\n"]))
        await session.expect("MAIL", 250)
        for _ in rcpts:
            await session.expect("RCPT", 250, 251)
        await session.expect("DATA", 354)
    else:
        await session.command(mail, 250)
        for rcpt in rcpts:
            await session.command(rcpt, 250, 251)
        await session.command(b"DATA\r\n", 354)
    session.writer.write(payload)
    await session.expect("end of data", 250)


async def run_async(cfg: DistantConfig) -> Result:
    res = Result("distant")
    payload = make_message(cfg.size) + b".\r\n"
    session: Session | None = None
    started = time.monotonic()
    try:
        if not cfg.connect_per_message:
            session, offered = await open_session(cfg)
            res.connections += 1
            if cfg.pipelining and not offered:
                raise ReplyError("the server does not offer PIPELINING")
            await send_message(session, cfg, payload, cfg.pipelining)  # warm-up, not timed
            t0 = time.monotonic()
            while res.ok < cfg.messages and (res.ok < cfg.min_messages or time.monotonic() - t0 < cfg.max_seconds):
                t = time.monotonic()
                await send_message(session, cfg, payload, cfg.pipelining)
                res.latencies.append(time.monotonic() - t)
                res.ok += 1
            await quit_session(session)
            session = None
        else:
            t0 = None
            while t0 is None or (res.ok < cfg.messages and (res.ok < cfg.min_messages or time.monotonic() - t0 < cfg.max_seconds)):
                t = time.monotonic()
                session, offered = await open_session(cfg)
                res.connections += 1
                if cfg.pipelining and not offered:
                    raise ReplyError("the server does not offer PIPELINING")
                await send_message(session, cfg, payload, cfg.pipelining)
                if t0 is None:
                    t0 = time.monotonic()  # the first message was the warm-up
                else:
                    res.latencies.append(time.monotonic() - t)
                    res.ok += 1
                await quit_session(session)
                session = None
    except Exception as e:  # noqa: BLE001 - counted and sampled; the row shows what was measured before it
        res.errors += 1
        res.error_samples.append(f"{type(e).__name__}: {e}")
        if session is not None:
            session.close()
    res.elapsed = time.monotonic() - started
    return res


def run(cfg: DistantConfig) -> Result:
    return asyncio.run(run_async(cfg))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Sequential messages on one session, pipelining or not, for the distant scenario.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--recipients", type=int, default=1)
    ap.add_argument("--pipelining", action="store_true", help="MAIL, RCPTs and DATA in one write (RFC 2920)")
    ap.add_argument("--connect-per-message", action="store_true", help="connect, EHLO and AUTH for every message")
    ap.add_argument("--messages", type=int, default=40)
    ap.add_argument("--max-seconds", type=float, default=10.0)
    ap.add_argument("--min-messages", type=int, default=10)
    ap.add_argument("--size", type=int, default=10 * 1024)
    ap.add_argument("--user", default="bench")
    ap.add_argument("--password", default="bench-password")
    args = ap.parse_args(argv)
    res = run(DistantConfig(port=args.port, host=args.host, pipelining=args.pipelining, recipients=args.recipients,
                            connect_per_message=args.connect_per_message, messages=args.messages,
                            max_seconds=args.max_seconds, min_messages=args.min_messages, size=args.size,
                            user=args.user, password=args.password))
    p50, p99 = res.percentile(50), res.percentile(99)
    print(f"{res.ok} messages, {res.errors} errors; p50 {p50 * 1000 if p50 is not None else float('nan'):.2f} ms, "
          f"p99 {p99 * 1000 if p99 is not None else float('nan'):.2f} ms")
    for sample in res.error_samples:
        print(f"  {sample}", file=sys.stderr)
    return 0 if res.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
