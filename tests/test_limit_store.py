"""The limit store (memory; Redis framing), the AUTH throttle and the sending budgets on a Clock."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from dialogue import Dialogue, plain, status
from test_config import VALID, config_dir, edited, load, problems  # noqa: F401  (config_dir: a fixture)
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from relayproxy.config import LimitsConfig, UserConfig
from relayproxy.limits import DAY, HOUR, AuthThrottle, Budgets, utc
from relayproxy.redis import MAX_BULK, RedisError, RedisProtocol, RedisUnavailable, RedisURL, encode_command, parse_redis_url
from relayproxy.smtp.reply import Catalogue
from relayproxy.store import LimitStore, MemoryStore, StoreUnavailable, WindowCheck, frees_at

T0 = 1_790_000_000.0


def run(coroutine: object) -> object:
    """The result of a coroutine that completes without waiting (the memory store never waits)."""
    d = defer.Deferred.fromCoroutine(coroutine)  # type: ignore[call-overload]
    results: list[object] = []
    d.addBoth(results.append)
    assert results, "the coroutine waited"
    if isinstance(results[0], Exception) or hasattr(results[0], "raiseException"):
        results[0].raiseException()  # type: ignore[attr-defined]
    return results[0]


def clock_at(t: float = T0) -> Clock:
    clock = Clock()
    clock.advance(t)
    return clock


# -- sliding windows ----------------------------------------------------------------------------


def test_frees_at() -> None:
    entries = [(100.0, 1), (200.0, 1), (300.0, 1)]
    assert frees_at(entries, 4, 1, 3600, 400) is None
    assert frees_at(entries, 3, 1, 3600, 400) == 100 + 3600
    # Two over: the second oldest must leave.
    assert frees_at(entries, 2, 1, 3600, 400) == 200 + 3600
    # Weights (recipients): 5 + 2 in use, 8 allowed, 3 more wanted: the first 5 must leave.
    assert frees_at([(100.0, 5), (200.0, 2)], 8, 3, DAY, 400) == 100 + DAY
    assert frees_at([(100.0, 5), (200.0, 2)], 8, 1, DAY, 400) is None
    # More than the whole limit never fits: answer when everything so far has left the window.
    assert frees_at([(100.0, 1)], 3, 4, DAY, 400) == 400 + DAY


def test_memory_window_slides() -> None:
    store = MemoryStore()
    check = [WindowCheck("messages:app", HOUR, 2, 1)]
    run(store.window_add([("messages:app", HOUR, 1)], T0))
    run(store.window_add([("messages:app", HOUR, 1)], T0 + 10))
    assert run(store.window_frees_at(check, T0 + 20)) == [T0 + HOUR]
    # Exactly one hour after the first, it has left the window.
    assert run(store.window_frees_at(check, T0 + HOUR)) == [None]
    assert run(store.window_frees_at([WindowCheck("messages:other", HOUR, 2, 1)], T0 + 20)) == [None]


def test_memory_store_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from relayproxy import store as module

    monkeypatch.setattr(module, "MAX_TRACKED", 3)
    store = MemoryStore()
    run(store.record_failure([("ip:192.0.2.1", 100)], T0, 600, 60, 3600))
    for i in range(10):
        run(store.record_failure([(f"user:guess{i}", 100)], T0, 600, 60, 3600))
    assert len(store._auth["user"]) == 3
    # A flood of user names does not evict addresses.
    assert "ip:192.0.2.1" in store._auth["ip"]


# -- AUTH throttle ------------------------------------------------------------------------------


def test_throttle_blocks_and_doubles() -> None:
    clock = clock_at()
    limits = LimitsConfig(auth_failures_per_ip=3, auth_failures_per_user=100, auth_backoff=60, auth_backoff_max=200)
    throttle = AuthThrottle(clock, limits)
    for _ in range(3):
        assert run(throttle.blocked_for("192.0.2.1", None)) == 0
        run(throttle.failed("192.0.2.1", "alice"))
    assert run(throttle.blocked_for("192.0.2.1", None)) == 60
    assert run(throttle.blocked_for("192.0.2.2", "alice")) == 0
    clock.advance(60)
    for _ in range(3):
        run(throttle.failed("192.0.2.1", None))
    assert run(throttle.blocked_for("192.0.2.1", None)) == 120
    clock.advance(120)
    for _ in range(3):
        run(throttle.failed("192.0.2.1", None))
    assert run(throttle.blocked_for("192.0.2.1", None)) == 200  # capped at auth_backoff_max
    # Quiet for a whole window after the block: back to the first back-off.
    clock.advance(200 + limits.auth_failure_window + 1)
    for _ in range(3):
        run(throttle.failed("192.0.2.1", None))
    assert run(throttle.blocked_for("192.0.2.1", None)) == 60


def test_throttle_spares_known_pairs() -> None:
    clock = clock_at()
    throttle = AuthThrottle(clock, LimitsConfig(auth_failures_per_user=2))
    throttle.succeeded("192.0.2.1", "Alice")
    for ip in ("198.51.100.1", "198.51.100.2"):
        run(throttle.failed(ip, "alice"))
    assert run(throttle.blocked_for("198.51.100.3", "alice")) > 0
    assert run(throttle.blocked_for("192.0.2.1", "ALICE")) == 0


def test_two_throttles_on_one_store_share_counts() -> None:
    """What two instances on one Redis store see, with the memory store standing in for Redis."""
    clock, store = clock_at(), MemoryStore()
    limits = LimitsConfig(auth_failures_per_ip=4)
    a, b = AuthThrottle(clock, limits, store), AuthThrottle(clock, limits, store)
    for throttle in (a, b, a, b):
        run(throttle.failed("192.0.2.9", None))
    assert run(a.blocked_for("192.0.2.9", None)) == limits.auth_backoff
    assert run(b.blocked_for("192.0.2.9", None)) == limits.auth_backoff


# -- budgets ------------------------------------------------------------------------------------


def test_messages_per_hour() -> None:
    clock = clock_at()
    budgets = Budgets(clock)
    user = UserConfig("app", max_messages_per_hour=2)
    assert budgets.limited(user) and not budgets.limited(UserConfig("free"))
    for _ in range(2):
        assert run(budgets.mail_refused_until(user)) is None
        run(budgets.record(user, 1))
        clock.advance(60)
    assert run(budgets.mail_refused_until(user)) == T0 + HOUR
    clock.advance(HOUR - 120)
    assert run(budgets.mail_refused_until(user)) is None
    # Other users have budgets of their own.
    assert run(budgets.mail_refused_until(UserConfig("other", max_messages_per_hour=2))) is None


def test_recipients_per_day() -> None:
    clock = clock_at()
    budgets = Budgets(clock)
    user = UserConfig("app", max_recipients_per_day=3)
    run(budgets.record(user, 2))
    clock.advance(100)
    assert run(budgets.mail_refused_until(user)) is None
    assert run(budgets.rcpt_refused_until(user, 0)) is None
    # A second recipient in this message would make 4.
    assert run(budgets.rcpt_refused_until(user, 1)) == T0 + DAY
    run(budgets.record(user, 1))
    assert run(budgets.mail_refused_until(user)) == T0 + DAY
    clock.advance(DAY - 100)
    # The first message's two recipients have left the window; the second's one has not.
    assert run(budgets.mail_refused_until(user)) is None
    assert run(budgets.rcpt_refused_until(user, 1)) is None
    assert run(budgets.rcpt_refused_until(user, 2)) == T0 + 100 + DAY


def test_both_budgets_refuse_until_both_free() -> None:
    clock = clock_at()
    budgets = Budgets(clock)
    user = UserConfig("app", max_messages_per_hour=1, max_recipients_per_day=1)
    run(budgets.record(user, 1))
    assert run(budgets.mail_refused_until(user)) == T0 + DAY


def test_utc_rounds_up() -> None:
    assert utc(1_764_349_392.0) == "2025-11-28T17:03:12Z"
    assert utc(1_764_349_391.2) == "2025-11-28T17:03:12Z"


def test_sending_limit_reply() -> None:
    reply = Catalogue.sending_limit("app1", "2026-11-28T17:03:12Z")
    assert reply.to_bytes() == b"451 4.7.1 Sending limit reached for app1, try again after 2026-11-28T17:03:12Z\r\n"
    # Any user name still makes a valid reply line.
    assert Catalogue.sending_limit("dru\u00e9", "t").is_temporary


# -- the store failing ---------------------------------------------------------------------------


class BrokenStore(LimitStore):
    name = "redis://192.0.2.1:6379/0"

    async def blocked_until(self, keys: Sequence[str]) -> list[float]:
        raise StoreUnavailable(self.name, "cannot connect")

    async def record_failure(self, keys: Sequence[tuple[str, int]], now: float, window: float, backoff: float, backoff_max: float) -> list[float]:
        raise StoreUnavailable(self.name, "cannot connect")

    async def window_frees_at(self, checks: Sequence[WindowCheck], now: float) -> list[float | None]:
        raise StoreUnavailable(self.name, "cannot connect")

    async def window_add(self, adds: Sequence[tuple[str, float, int]], now: float) -> None:
        raise StoreUnavailable(self.name, "cannot connect")


def test_auth_fails_safe_when_the_store_is_unavailable() -> None:
    clock = Clock()
    session = Dialogue(clock=clock, throttle=AuthThrottle(clock, LimitsConfig(), BrokenStore()))
    session.output()
    session.ehlo()
    assert status(session.command("AUTH PLAIN " + plain("alice", "wonderland"))) == (454, "4.7.0")
    assert not session.closed


# -- Redis: URLs and framing ----------------------------------------------------------------------


def test_parse_redis_url() -> None:
    url = parse_redis_url("redis://:s%40cret@redis.internal:6380/2")
    assert (url.host, url.port, url.db, url.password) == ("redis.internal", 6380, 2, "s@cret")
    assert str(url) == "redis://redis.internal:6380/2"  # never the password
    assert str(parse_redis_url("redis://127.0.0.1")) == "redis://127.0.0.1:6379/0"
    for bad in ("rediss://h:6379/0", "redis:///0", "redis://h:99999/0", "redis://h/x", "http://h"):
        with pytest.raises(ValueError):
            parse_redis_url(bad)


def test_encode_command() -> None:
    assert encode_command(["EVAL", "return 1", 0, 1.5]) == b"*4\r\n$4\r\nEVAL\r\n$8\r\nreturn 1\r\n$1\r\n0\r\n$3\r\n1.5\r\n"


def connected() -> tuple[RedisProtocol, StringTransport]:
    protocol, transport = RedisProtocol(), StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_replies_in_order_and_split_anywhere() -> None:
    protocol, transport = connected()
    results: list[object] = []
    for args in (["PING"], ["EVAL", "x", 0], ["GET", "k"], ["X"]):
        protocol.send(args).addBoth(results.append)
    wire = b"+PONG\r\n*3\r\n$2\r\n10\r\n$0\r\n\r\n:-7\r\n$-1\r\n-ERR nope\r\n"
    for i in range(len(wire)):
        protocol.dataReceived(wire[i : i + 1])
    assert results[:3] == [b"PONG", [b"10", b"", -7], None]
    assert isinstance(results[3], RedisError) and str(results[3]) == "ERR nope"
    assert transport.value().startswith(b"*1\r\n$4\r\nPING\r\n")


@pytest.mark.parametrize("wire", [
    b"$%d\r\n" % (MAX_BULK + 1),
    b"*99999999\r\n",
    b"?what\r\n",
    b":12x\r\n",
    b"+" + b"a" * 70_000,
    b"$3\r\nabcXY",
    b"*1\r\n" * 20 + b":1\r\n",
])
def test_bad_or_oversized_replies_drop_the_connection(wire: bytes) -> None:
    protocol, transport = connected()
    failures: list[object] = []
    protocol.send(["GET", "k"]).addErrback(failures.append)
    protocol.dataReceived(wire)
    assert transport.disconnecting or getattr(transport, "disconnected", False)
    assert len(failures) == 1 and failures[0].check(RedisUnavailable)  # type: ignore[attr-defined]
    assert protocol.lost


def test_unsolicited_reply_drops_the_connection() -> None:
    protocol, transport = connected()
    protocol.dataReceived(b"+OK\r\n")
    assert protocol.lost


# -- configuration --------------------------------------------------------------------------------


def test_budget_and_store_keys_load(config_dir: Path) -> None:  # noqa: F811
    text = edited('[users.alice]\n', '[users.alice]\nmax_messages_per_hour = 50\nmax_recipients_per_day = 500\n')
    text = edited("[limits]\n", '[limits]\nstore = "redis://:pw@127.0.0.1:6379/3"\n', text)
    config = load(config_dir, text)
    assert (config.users["alice"].max_messages_per_hour, config.users["alice"].max_recipients_per_day) == (50, 500)
    assert config.user("bob").max_messages_per_hour is None
    assert config.limits.store == RedisURL("127.0.0.1", 6379, 3, "pw")
    assert load(config_dir, VALID).limits.store == "memory"


def test_budget_and_store_problems(config_dir: Path) -> None:  # noqa: F811
    text = edited('[users.alice]\n', '[users.alice]\nmax_messages_per_hour = 0\nmax_recipients_per_day = "lots"\n')
    text = edited("[limits]\n", '[limits]\nstore = "rediss://:hunter2@redis.example:6379/0"\n', text)
    found = problems(config_dir, text)
    assert any("users.alice.max_messages_per_hour: expected an integer from 1 to" in p for p in found), found
    assert any("users.alice.max_recipients_per_day: expected an integer" in p for p in found), found
    store = [p for p in found if ": limits.store: " in p]
    assert len(store) == 1 and "rediss://" in store[0] and "redis://127.0.0.1:6379/0" in store[0], found
    assert "hunter2" not in store[0]
