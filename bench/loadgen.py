#!/usr/bin/env python3
"""An SMTP load generator: asyncio streams, AUTH PLAIN on every connection, N sessions, M messages each.

Modes:
  send  connect, EHLO, AUTH PLAIN, then M x (MAIL, RCPT, DATA, body, ".") and QUIT; repeat until the
        duration is over or the message budget is spent. Latency per message: MAIL sent -> final 250.
  auth  connect, EHLO, AUTH PLAIN, QUIT; repeat (a session can AUTH only once). Latency: connect -> AUTH reply.
  hold  connect, EHLO, AUTH PLAIN, then stay connected until released (see ``run(..., on_held=...)``).

AUTH is accepted with 235 (a real server) or 250 (Postfix's smtp-sink). Commands are not pipelined.
With ``processes > 1`` the sessions are split over that many worker processes (fork), so that the
generator is not the bottleneck; the figures are merged in the parent.

Usable as a library (``run(LoadConfig(...))``, which bench/run.py does) or on its own:
  python bench/loadgen.py --port 2525 --sessions 20 --per-conn 10 --size 10240 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

CHUNK = 256 * 1024


@dataclass
class LoadConfig:
    port: int
    host: str = "127.0.0.1"
    mode: str = "send"  # send | auth | hold
    sessions: int = 20
    per_conn: int = 1
    size: int = 10 * 1024
    duration: float | None = 5.0  # seconds; None: run until ``messages`` are sent
    messages: int | None = None  # total message budget (send mode), split over processes
    processes: int = 1
    user: str = "bench"
    password: str = "bench-password"
    hold_timeout: float = 30.0  # hold mode: the longest to wait for every session to authenticate
    connect_concurrency: int = 25  # hold mode: connections being set up at once, per process
    timeout: float = 600.0  # per reply
    grace: float = 5.0  # time-based runs: work still in flight this long after the duration is abandoned


@dataclass
class Result:
    mode: str
    elapsed: float = 0.0
    ok: int = 0  # messages accepted (send), AUTHs accepted (auth), sessions authenticated (hold)
    connections: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # seconds
    auth_latencies: list[float] = field(default_factory=list)
    held_connected: int = 0  # hold mode: sessions that got the greeting
    held_authenticated: int = 0
    cut_off: int = 0  # sessions abandoned mid-work at duration + grace (not errors)
    cpu_s: float | None = None  # utime + stime of the worker processes over their life (run() only)

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    def percentile(self, p: float, which: str = "latencies") -> float | None:
        values = sorted(getattr(self, which))
        if not values:
            return None
        k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
        return values[k]

    def summary(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "elapsed_s": round(self.elapsed, 3),
            "ok": self.ok,
            "rate_per_s": round(self.rate, 1),
            "connections": self.connections,
            "errors": self.errors,
            "error_samples": self.error_samples[:5],
            "p50_ms": _ms(self.percentile(50)),
            "p99_ms": _ms(self.percentile(99)),
            "auth_p50_ms": _ms(self.percentile(50, "auth_latencies")),
            "auth_p99_ms": _ms(self.percentile(99, "auth_latencies")),
            "held_connected": self.held_connected,
            "held_authenticated": self.held_authenticated,
            "cut_off": self.cut_off,
            "cpu_s": None if self.cpu_s is None else round(self.cpu_s, 3),
        }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


def make_message(size: int) -> bytes:
    """A plausible message of about ``size`` bytes: headers, then 76-character lines, CRLF-terminated.

    No line starts with a dot and none is longer than 78 octets, so no dot-stuffing is needed and
    no line limit is hit. Does not include the final ".\r\n".
    """
    head = (
        b"From: bench@example.org\r\nTo: sink@example.net\r\nSubject: relayproxy benchmark\r\n"
        b"Message-ID: <bench@example.org>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
    )
    line = (b"abcdefghijklmnopqrstuvwxyz0123456789" * 3)[:76] + b"\r\n"
    body_len = max(0, size - len(head))
    full, rest = divmod(body_len, len(line))
    tail = b"" if rest < 3 else b"x" * (rest - 2) + b"\r\n"
    return head + line * full + tail


class ReplyError(Exception):
    pass


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
        self.reader, self.writer, self.timeout = reader, writer, timeout

    async def reply(self) -> tuple[int, bytes]:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readuntil(b"\n"), self.timeout)
            lines.append(line)
            if line[3:4] != b"-":
                break
        try:
            return int(lines[-1][:3]), b"".join(lines)
        except ValueError:
            raise ReplyError(f"not a reply: {b''.join(lines)[:120]!r}") from None

    async def command(self, line: bytes, *expected: int) -> bytes:
        self.writer.write(line)
        code, text = await self.reply()
        if code not in expected:
            raise ReplyError(f"{line.split(b' ')[0].strip().decode()} -> {text.strip()[:160]!r}")
        return text

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:
            pass


async def _open(cfg: LoadConfig) -> _Conn:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(cfg.host, cfg.port, limit=1 << 20), cfg.timeout
    )
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = _Conn(reader, writer, cfg.timeout)
    code, text = await conn.reply()
    if code != 220:
        conn.close()
        raise ReplyError(f"greeting {text.strip()[:160]!r}")
    return conn


async def _login(conn: _Conn, auth_line: bytes) -> None:
    await conn.command(b"EHLO loadgen.example.org\r\n", 250)
    await conn.command(auth_line, 235, 250)


async def _quit(conn: _Conn) -> None:
    try:
        conn.writer.write(b"QUIT\r\n")
        await asyncio.wait_for(conn.reply(), 5)
    except Exception:
        pass
    conn.close()


class _Budget:
    """Messages left to send in this process (None: unlimited, time decides)."""

    def __init__(self, total: int | None) -> None:
        self.left = total

    def take(self) -> bool:
        if self.left is None:
            return True
        if self.left <= 0:
            return False
        self.left -= 1
        return True

    def empty(self) -> bool:
        return self.left is not None and self.left <= 0


async def _send_session(cfg: LoadConfig, res: Result, deadline: float, budget: _Budget, message: bytes, auth_line: bytes) -> None:
    big = len(message) > CHUNK
    payload = message + b".\r\n"
    while time.monotonic() < deadline and not budget.empty():
        conn = None
        try:
            t0 = time.monotonic()
            conn = await _open(cfg)
            res.connections += 1
            await _login(conn, auth_line)
            res.auth_latencies.append(time.monotonic() - t0)
            for _ in range(cfg.per_conn):
                if time.monotonic() >= deadline or not budget.take():
                    break
                t = time.monotonic()
                await conn.command(b"MAIL FROM:<bench@example.org>\r\n", 250)
                await conn.command(b"RCPT TO:<sink@example.net>\r\n", 250)
                await conn.command(b"DATA\r\n", 354)
                if big:
                    view = memoryview(payload)
                    for i in range(0, len(view), CHUNK):
                        conn.writer.write(view[i : i + CHUNK])
                        await conn.writer.drain()
                else:
                    conn.writer.write(payload)
                code, text = await conn.reply()
                if code != 250:
                    raise ReplyError(f"end of data -> {text.strip()[:160]!r}")
                res.latencies.append(time.monotonic() - t)
                res.ok += 1
            await _quit(conn)
        except asyncio.CancelledError:
            if conn is not None:
                conn.close()
            raise
        except Exception as e:  # noqa: BLE001 - every failure is counted and sampled
            res.errors += 1
            if len(res.error_samples) < 20:
                res.error_samples.append(f"{type(e).__name__}: {e}")
            if conn is not None:
                conn.close()
            if cfg.duration is None:
                budget.take()  # a run of N messages without a duration ends even if every attempt fails
            await asyncio.sleep(0.05)


async def _auth_session(cfg: LoadConfig, res: Result, deadline: float, auth_line: bytes) -> None:
    while time.monotonic() < deadline:
        conn = None
        try:
            t0 = time.monotonic()
            conn = await _open(cfg)
            res.connections += 1
            await _login(conn, auth_line)
            res.latencies.append(time.monotonic() - t0)
            res.ok += 1
            await _quit(conn)
        except asyncio.CancelledError:
            if conn is not None:
                conn.close()
            raise
        except Exception as e:  # noqa: BLE001
            res.errors += 1
            if len(res.error_samples) < 20:
                res.error_samples.append(f"{type(e).__name__}: {e}")
            if conn is not None:
                conn.close()
            await asyncio.sleep(0.05)


async def _hold_session(
    cfg: LoadConfig, res: Result, auth_line: bytes, gate: asyncio.Semaphore, release: asyncio.Event, shared: Any
) -> None:
    conn: _Conn | None = None
    t0 = time.monotonic()

    async def setup() -> None:
        nonlocal conn
        async with gate:
            # A connection the server never greets (say, dropped from a full listen queue) must not
            # hold up the run for the whole reply timeout.
            reader, writer = await asyncio.wait_for(asyncio.open_connection(cfg.host, cfg.port), 30)
            conn = _Conn(reader, writer, cfg.timeout)
            code, text = await asyncio.wait_for(conn.reply(), 30)
            if code != 220:
                raise ReplyError(f"greeting {text.strip()[:160]!r}")
        res.connections += 1
        res.held_connected += 1
        with shared["connected"].get_lock():
            shared["connected"].value += 1
        await _login(conn, auth_line)

    try:
        login = asyncio.ensure_future(setup())
        waiter = asyncio.ensure_future(release.wait())
        await asyncio.wait([login, waiter], return_when=asyncio.FIRST_COMPLETED)
        if login.done():
            waiter.cancel()
            login.result()
            res.auth_latencies.append(time.monotonic() - t0)
            res.ok += 1
            res.held_authenticated += 1
            with shared["ready"].get_lock():
                shared["ready"].value += 1
            await release.wait()
            assert conn is not None
            await _quit(conn)
        else:
            # Released before this session was set up (still connecting or waiting for its AUTH reply).
            login.cancel()
            await asyncio.gather(login, return_exceptions=True)
            if conn is not None:
                conn.close()
    except Exception as e:  # noqa: BLE001
        res.errors += 1
        if len(res.error_samples) < 20:
            res.error_samples.append(f"{type(e).__name__}: {e}")
        if conn is not None:
            conn.close()


async def _worker_async(cfg: LoadConfig, index: int, start_at: float, shared: Any) -> Result:
    res = Result(cfg.mode)
    sessions = cfg.sessions // cfg.processes + (1 if index < cfg.sessions % cfg.processes else 0)
    auth_line = b"AUTH PLAIN " + base64.b64encode(f"\0{cfg.user}\0{cfg.password}".encode()) + b"\r\n"
    message = make_message(cfg.size) if cfg.mode == "send" else b""
    budget = None
    if cfg.messages is not None:
        budget = cfg.messages // cfg.processes + (1 if index < cfg.messages % cfg.processes else 0)
    await asyncio.sleep(max(0.0, start_at - time.time()))
    t0 = time.monotonic()
    deadline = t0 + cfg.duration if cfg.duration is not None else float("inf")
    if cfg.mode in ("send", "auth"):
        if cfg.mode == "send":
            shared_budget = _Budget(budget)
            coros = [_send_session(cfg, res, deadline, shared_budget, message, auth_line) for _ in range(sessions)]
        else:
            coros = [_auth_session(cfg, res, deadline, auth_line) for _ in range(sessions)]
        tasks = [asyncio.ensure_future(c) for c in coros]
        limit = None if cfg.duration is None else deadline + cfg.grace - time.monotonic()
        _, pending = await asyncio.wait(tasks, timeout=limit)
        # Work still in flight long after the duration (a slow AUTH, say) is abandoned, not counted.
        res.cut_off = len(pending)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    elif cfg.mode == "hold":
        release = asyncio.Event()
        loop = asyncio.get_running_loop()

        def wait_release() -> None:
            shared["release"].wait()
            loop.call_soon_threadsafe(release.set)

        loop.run_in_executor(None, wait_release)
        gate = asyncio.Semaphore(cfg.connect_concurrency)
        await asyncio.gather(*(_hold_session(cfg, res, auth_line, gate, release, shared) for _ in range(sessions)))
    else:
        raise ValueError(f"unknown mode {cfg.mode}")
    # Includes finishing the messages in flight at the deadline, whose count is included too.
    res.elapsed = time.monotonic() - t0
    return res


def _raise_nofile() -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def _worker(cfg: LoadConfig, index: int, start_at: float, shared: Any, out: Any) -> None:
    _raise_nofile()
    try:
        res = asyncio.run(_worker_async(cfg, index, start_at, shared))
        # A forked child's CPU times start at zero: this is the worker's own utime + stime.
        times = os.times()
        res.cpu_s = times.user + times.system
        out.put(asdict(res))
    except BaseException as e:  # noqa: BLE001
        out.put({"mode": cfg.mode, "errors": 1, "error_samples": [f"worker crashed: {type(e).__name__}: {e}"]})


def run_inline(cfg: LoadConfig) -> Result:
    """Send or auth mode in this process, without worker processes (for short checks)."""
    assert cfg.mode in ("send", "auth")
    return asyncio.run(_worker_async(cfg, 0, time.time(), None))


def run(cfg: LoadConfig, on_held: Callable[[int, int], None] | None = None) -> Result:
    """Run the load; in hold mode call ``on_held(connected, authenticated)`` once every session is
    authenticated (or hold_timeout passed), then release the sessions."""
    _raise_nofile()
    cfg.processes = max(1, min(cfg.processes, cfg.sessions))
    ctx = multiprocessing.get_context("fork")
    shared = {"ready": ctx.Value("i", 0), "connected": ctx.Value("i", 0), "release": ctx.Event()}
    out = ctx.Queue()
    start_at = time.time() + 0.15
    procs = [ctx.Process(target=_worker, args=(cfg, i, start_at, shared, out), daemon=True) for i in range(cfg.processes)]
    for p in procs:
        p.start()
    if cfg.mode == "hold":
        deadline = start_at + cfg.hold_timeout
        while time.time() < deadline and shared["ready"].value < cfg.sessions:
            if all(not p.is_alive() for p in procs):
                break
            time.sleep(0.05)
        time.sleep(0.2)  # let the proxy settle after the last AUTH
        if on_held is not None:
            on_held(shared["connected"].value, shared["ready"].value)
        shared["release"].set()
    results = []
    for _ in procs:
        results.append(out.get())
    for p in procs:
        p.join(timeout=30)
    merged = Result(cfg.mode)
    for r in results:
        merged.ok += r.get("ok", 0)
        merged.connections += r.get("connections", 0)
        merged.errors += r.get("errors", 0)
        merged.error_samples += r.get("error_samples", [])
        merged.latencies += r.get("latencies", [])
        merged.auth_latencies += r.get("auth_latencies", [])
        merged.held_connected += r.get("held_connected", 0)
        merged.held_authenticated += r.get("held_authenticated", 0)
        merged.cut_off += r.get("cut_off", 0)
        if r.get("cpu_s") is not None:
            merged.cpu_s = (merged.cpu_s or 0.0) + r["cpu_s"]
        merged.elapsed = max(merged.elapsed, r.get("elapsed", 0.0))
    return merged


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", choices=["send", "auth", "hold"], default="send")
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--per-conn", type=int, default=1)
    ap.add_argument("--size", type=int, default=10 * 1024, help="message size in bytes")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds (0: use --messages)")
    ap.add_argument("--messages", type=int, default=None, help="total messages to send")
    ap.add_argument("--processes", type=int, default=0, help="worker processes (0: 2 for >= 10 sessions, else 1)")
    ap.add_argument("--user", default="bench")
    ap.add_argument("--password", default="bench-password")
    ap.add_argument("--hold-timeout", type=float, default=30.0)
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    processes = args.processes or (2 if args.sessions >= 10 else 1)
    cfg = LoadConfig(
        port=args.port, host=args.host, mode=args.mode, sessions=args.sessions, per_conn=args.per_conn,
        size=args.size, duration=args.duration or None, messages=args.messages, processes=processes,
        user=args.user, password=args.password, hold_timeout=args.hold_timeout,
    )
    if cfg.duration is None and cfg.messages is None and cfg.mode == "send":
        ap.error("give --duration or --messages")

    def held(connected: int, authenticated: int) -> None:
        print(f"held: {connected} connected, {authenticated} authenticated; press Enter to release", file=sys.stderr)
        if sys.stdin.isatty():
            sys.stdin.readline()

    res = run(cfg, on_held=held)
    summary = res.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for k, v in summary.items():
            print(f"{k:>20}: {v}")
    if res.latencies and len(res.latencies) > 1:
        print(f"{'mean_ms':>20}: {statistics.mean(res.latencies) * 1000:.3f}", file=sys.stderr)
    return 0 if res.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
