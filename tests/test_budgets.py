"""Sending budgets end to end, and the Redis limit store shared by two proxies.

The Redis tests run a real ``redis-server`` (Debian: apt-get install redis-server; .ci/run installs
it). Without it they fail, on purpose: a skipped test would hide that scale-out is untested.
"""

from __future__ import annotations

import calendar
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ProxyFactory
from harness import CLIENT_USER, Proxy, free_port, wait_for
from peers import Client, ScriptedUpstream

from relayproxy.smtp.reply import Catalogue

AUTH_OK = Catalogue.AUTH_OK.to_bytes()
THROTTLED = Catalogue.AUTH_TEMPORARY.to_bytes()
STORE_DOWN = Catalogue.LIMIT_STORE_UNAVAILABLE.to_bytes()
LIMIT = re.compile(rb"^451 4\.7\.1 Sending limit reached for app1, try again after (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)\r\n$")


def connect(port: int, source: str = "127.0.0.1") -> Client:
    """A client from a chosen loopback source address (per-IP limits), greeted and after EHLO."""
    c = Client(port, source=source)
    assert c.greeting.startswith(b"220 ")
    c.ehlo(b"client.test")
    return c


def send_message(c: Client, recipients: tuple[bytes, ...] = (b"bob@example.net",)) -> None:
    assert c.command(b"MAIL FROM:<app1@example.org>").startswith(b"250 ")
    for rcpt in recipients:
        assert c.command(b"RCPT TO:<" + rcpt + b">").startswith(b"250 ")
    assert c.command(b"DATA").startswith(b"354")
    assert c.command(b"Subject: budget\r\n\r\nhello\r\n.").startswith(b"250 ")


def limit_time(reply: bytes) -> float:
    m = LIMIT.match(reply)
    assert m is not None, reply
    return calendar.timegm(time.strptime(m.group(1).decode(), "%Y-%m-%dT%H:%M:%SZ"))


def budget_config(store: str | None = None, user: str = "max_messages_per_hour = 2", limits: str = "") -> str:
    out = f"[users.{CLIENT_USER}]\n{user}\n"
    if store is not None or limits:
        out += "[limits]\n" + (f'store = "{store}"\n' if store else "") + limits + "\n"
    return out


# -- in one process -------------------------------------------------------------------------------


def test_messages_per_hour(make_proxy: ProxyFactory, upstream: ScriptedUpstream) -> None:
    proxy = make_proxy(upstream.toml(), extra=budget_config())
    c = connect(proxy.plain_port)
    assert c.auth() == AUTH_OK
    start = time.time()
    send_message(c)
    send_message(c)
    refusal = c.command(b"MAIL FROM:<app1@example.org>")
    # The budget frees up an hour after the first message was accepted.
    assert start + 3600 - 1 <= limit_time(refusal) <= time.time() + 3600 + 1
    # A temporary refusal: the session goes on.
    assert c.command(b"NOOP").startswith(b"250 ")
    c.close()
    wait_for(lambda: upstream.closed >= 1)
    assert [line for line in upstream.commands if line.startswith(b"MAIL")] == [b"MAIL FROM:<app1@example.org>"] * 2, (
        "the refused MAIL reached the upstream"
    )


def test_recipients_per_day(make_proxy: ProxyFactory, upstream: ScriptedUpstream) -> None:
    proxy = make_proxy(upstream.toml(), extra=budget_config(user="max_recipients_per_day = 3"))
    c = connect(proxy.plain_port)
    assert c.auth() == AUTH_OK
    start = time.time()
    send_message(c, (b"a@example.net", b"b@example.net"))
    assert c.command(b"MAIL FROM:<app1@example.org>").startswith(b"250 ")
    assert c.command(b"RCPT TO:<c@example.net>").startswith(b"250 ")
    # A fourth recipient today: refused, the message goes on with those accepted.
    refusal = c.command(b"RCPT TO:<d@example.net>")
    assert start + 86400 - 1 <= limit_time(refusal) <= time.time() + 86400 + 1
    assert c.command(b"DATA").startswith(b"354")
    assert c.command(b"Subject: budget\r\n\r\nhello\r\n.").startswith(b"250 ")
    assert limit_time(c.command(b"MAIL FROM:<app1@example.org>")) >= start + 86400 - 1
    c.close()


def test_users_without_budget_are_unlimited(make_proxy: ProxyFactory, upstream: ScriptedUpstream) -> None:
    proxy = make_proxy(upstream.toml(), extra=budget_config(user='upstream = "default"'))
    c = connect(proxy.plain_port)
    assert c.auth() == AUTH_OK
    for _ in range(4):
        send_message(c)
    c.close()


# -- Redis ----------------------------------------------------------------------------------------


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cli(self, *args: str) -> str:
        """redis-cli (Debian's redis-tools, which redis-server depends on) against this server."""
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        return subprocess.run([cli, "-p", str(self.port), *args], capture_output=True, text=True, check=True, timeout=10).stdout

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def redis_binary() -> str:
    found = shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if Path(p).exists()), None
    )
    if found is None:
        pytest.fail(
            "redis-server is not installed, so the shared limit store cannot be tested: "
            "install it (Debian/Ubuntu: apt-get install redis-server) or run .ci/run, which does",
            pytrace=False,
        )
    return found


def ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    binary = redis_binary()
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    server = RedisServer(port, process)
    try:
        wait_for(lambda: ping(port) or process.poll() is not None)
        assert process.poll() is None, f"redis-server exited with status {process.returncode}"
        yield server
    finally:
        server.stop()


def two_proxies(make_proxy: ProxyFactory, upstream: ScriptedUpstream, extra: str) -> tuple[Proxy, Proxy]:
    return make_proxy(upstream.toml(), extra=extra), make_proxy(upstream.toml(), extra=extra)


def test_two_instances_share_one_budget(make_proxy: ProxyFactory, upstream: ScriptedUpstream, redis: RedisServer) -> None:
    a, b = two_proxies(make_proxy, upstream, budget_config(redis.url))
    start = time.time()
    for proxy in (a, a):
        c = connect(proxy.plain_port)
        assert c.auth() == AUTH_OK
        send_message(c)
        c.close()
    c = connect(b.plain_port)
    assert c.auth() == AUTH_OK
    refusal = c.command(b"MAIL FROM:<app1@example.org>")
    assert start + 3600 - 1 <= limit_time(refusal) <= time.time() + 3600 + 1
    c.close()
    # The counts live in Redis under relayproxy:, and expire.
    keys = redis.cli("--scan", "--pattern", "*").split()
    assert keys == ["relayproxy:window:messages:app1"], keys
    assert 3500_000 < int(redis.cli("PTTL", keys[0])) <= 3600_000


def test_two_instances_share_one_guessing_limit(make_proxy: ProxyFactory, upstream: ScriptedUpstream, redis: RedisServer) -> None:
    limits = "auth_failures_per_ip = 4\nauth_failures_per_user = 100"
    a, b = two_proxies(make_proxy, upstream, budget_config(redis.url, limits=limits))
    guesser = "127.0.0.7"
    for proxy in (a, b):
        c = connect(proxy.plain_port, source=guesser)
        for _ in range(2):
            assert c.auth(password="wrong").startswith(b"535 5.7.8")
        c.close()
    # Each instance saw two failures; together they reached four: blocked on both, before any
    # password check, even with the right password.
    for proxy in (b, a):
        c = connect(proxy.plain_port, source=guesser)
        assert c.auth() == THROTTLED
        c.close()
    # Only that address.
    c = connect(a.plain_port, source="127.0.0.8")
    assert c.auth() == AUTH_OK
    c.close()


def test_unreachable_store_refuses_auth(make_proxy: ProxyFactory, upstream: ScriptedUpstream, log_lines: list[str]) -> None:
    port = free_port()  # nothing listens there
    proxy = make_proxy(upstream.toml(), extra=budget_config(f"redis://127.0.0.1:{port}/0"))
    c = connect(proxy.plain_port)
    assert c.auth() == THROTTLED
    assert c.command(b"NOOP").startswith(b"250 ")
    c.close()
    wait_for(lambda: any("limit store unavailable" in line for line in log_lines))
    line = next(line for line in log_lines if "limit store unavailable" in line)
    assert f"redis://127.0.0.1:{port}/0" in line


def test_silent_store_times_out(make_proxy: ProxyFactory, upstream: ScriptedUpstream) -> None:
    """A store that accepts connections but never answers (a hung Redis) costs a timeout, not a hang."""
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        port = silent.getsockname()[1]
        proxy = make_proxy(upstream.toml(), extra=budget_config(f"redis://127.0.0.1:{port}/0"))
        c = connect(proxy.plain_port)
        start = time.monotonic()
        assert c.auth() == THROTTLED
        assert time.monotonic() - start < 6
        c.close()
    finally:
        silent.close()


def test_store_lost_after_auth(make_proxy: ProxyFactory, upstream: ScriptedUpstream, redis: RedisServer, log_lines: list[str]) -> None:
    proxy = make_proxy(upstream.toml(), extra=budget_config(redis.url))
    c = connect(proxy.plain_port)
    assert c.auth() == AUTH_OK
    send_message(c)
    redis.stop()
    # Under a budget that cannot be checked: a temporary refusal, and the session goes on.
    assert c.command(b"MAIL FROM:<app1@example.org>") == STORE_DOWN
    assert c.command(b"NOOP").startswith(b"250 ")
    c.close()
    assert any("limit store unavailable" in line and redis.url in line for line in log_lines)


def test_redis_store_matches_memory_store(redis: RedisServer) -> None:
    """The Lua scripts and the in-process code agree, step by step, on the same times."""
    from harness import ensure_reactor, reactor
    from twisted.internet import defer
    from twisted.internet.threads import blockingCallFromThread

    from relayproxy.redis import parse_redis_url
    from relayproxy.store import LimitStore, MemoryStore, RedisStore, WindowCheck

    ensure_reactor()
    t0 = 1_790_000_000.25

    async def script(store: LimitStore) -> list[object]:
        seen: list[object] = []
        window, backoff, backoff_max = 600.0, 60.0, 150.0
        steps = [0, 1, 2, 70, 71, 72, 300, 301, 302, 303, 2000, 2001, 2002]
        for step in steps:
            seen.append(await store.record_failure([("ip:192.0.2.1", 3), ("user:alice", 5)], t0 + step, window, backoff, backoff_max))
            seen.append(await store.blocked_until(["ip:192.0.2.1", "user:alice", "ip:192.0.2.2"]))
        for step, weight in [(0, 2), (10, 1), (20, 3), (3700, 1)]:
            checks = [WindowCheck("recipients:app", 86400, 6, 1), WindowCheck("recipients:app", 86400, 6, 4),
                      WindowCheck("messages:app", 3600, 2, 1), WindowCheck("recipients:app", 86400, 6, 7)]
            seen.append(await store.window_frees_at(checks, t0 + step))
            await store.window_add([("messages:app", 3600, 1), ("recipients:app", 86400, weight)], t0 + step)
        seen.append(await store.window_frees_at([WindowCheck("messages:app", 3600, 1, 1)], t0 + 3700))
        return seen

    def run(store: LimitStore) -> list[object]:
        return blockingCallFromThread(reactor, lambda: defer.Deferred.fromCoroutine(script(store)))  # type: ignore[no-any-return]

    shared = RedisStore(reactor, parse_redis_url(redis.url))
    try:
        from_redis = run(shared)
    finally:
        reactor.callFromThread(shared.close)
    from_memory = run(MemoryStore())
    # Lua prints numbers with 14 significant digits: compare to the hundredth of a second.
    assert _rounded(from_redis) == _rounded(from_memory)
    blocks = [v[0] for v in from_memory[0:26:2] if isinstance(v, list)]
    assert [b for b in blocks if b] == [60.0, 120.0, 150.0, 60.0], blocks


def _rounded(values: object) -> object:
    if isinstance(values, list):
        return [_rounded(v) for v in values]
    if isinstance(values, float):
        return round(values, 2)
    return values
