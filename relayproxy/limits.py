"""Abuse controls shared by all sessions: AUTH failure throttling, sending budgets, connection counts.

The AUTH throttle and the budgets keep their counts in a LimitStore (relayproxy.store): in this
process by default, or in Redis so that several instances behind a load balancer enforce one limit.
Their checks are coroutines and raise StoreUnavailable when the store cannot answer.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime

from relayproxy.config import LimitsConfig, UserConfig
from relayproxy.store import MAX_TRACKED, LimitStore, MemoryStore, WindowCheck

HOUR = 3600.0
DAY = 86400.0


def client_key(address: str, ipv6_prefix: int) -> str:
    """What per-address limits count: an IPv4 address, or an IPv6 client's network of ``ipv6_prefix``.

    One IPv6 customer commonly holds a /64 and can pick any address in it: counted one by one, a
    single customer would have 2**64 "addresses" to spread its connections and guesses over.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))
    return address


class AuthThrottle:
    """Counts AUTH failures per client address and per user name (RFC 4954 14: limit guessing)."""

    def __init__(self, clock: IReactorTime, limits: LimitsConfig, store: LimitStore | None = None) -> None:
        self._clock = clock
        self.store = store or MemoryStore()
        # Pairs that logged in here: local to each instance, which is enough to spare a user from
        # a lock-out caused by a guesser elsewhere.
        self._known: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.update(limits)

    def update(self, limits: LimitsConfig) -> None:
        """New limits apply from the next failure on; counts so far are kept."""
        self._limits = limits

    async def blocked_for(self, ip: str, username: str | None) -> float:
        """Seconds this attempt must still wait; 0 when it may go ahead."""
        ip = client_key(ip, self._limits.ipv6_prefix)
        keys = [f"ip:{ip}"]
        # A guesser elsewhere must not lock a user out of the address it always logs in from.
        if username is not None and (username.lower(), ip) not in self._known:
            keys.append(f"user:{username.lower()}")
        until = await self.store.blocked_until(keys)
        return max(0.0, max(until) - self._clock.seconds())

    def succeeded(self, ip: str, username: str) -> None:
        key = (username.lower(), client_key(ip, self._limits.ipv6_prefix))
        self._known.pop(key, None)
        self._known[key] = None
        while len(self._known) > MAX_TRACKED:
            self._known.popitem(last=False)

    async def failed(self, ip: str, username: str | None) -> None:
        limits = self._limits
        keys = [(f"ip:{client_key(ip, limits.ipv6_prefix)}", limits.auth_failures_per_ip)]
        if username is not None:
            keys.append((f"user:{username.lower()}", limits.auth_failures_per_user))
        await self.store.record_failure(
            keys, self._clock.seconds(), limits.auth_failure_window, limits.auth_backoff, limits.auth_backoff_max
        )


class Budgets:
    """Per-user sending budgets: messages per hour and recipients per day, in sliding windows.

    A message counts (with its accepted recipients) once the upstream accepted it. Sessions of one
    user running side by side are each checked against what was counted before them, so together
    they can pass a budget by what they had in flight at the same time.
    """

    def __init__(self, clock: IReactorTime, store: LimitStore | None = None) -> None:
        self._clock = clock
        self.store = store or MemoryStore()

    @staticmethod
    def limited(user: UserConfig) -> bool:
        return user.max_messages_per_hour is not None or user.max_recipients_per_day is not None

    async def mail_refused_until(self, user: UserConfig) -> float | None:
        """None when ``user`` may start a message now, else the time from which it may."""
        checks = []
        if user.max_messages_per_hour is not None:
            checks.append(WindowCheck(f"messages:{user.name}", HOUR, user.max_messages_per_hour, 1))
        if user.max_recipients_per_day is not None:
            checks.append(WindowCheck(f"recipients:{user.name}", DAY, user.max_recipients_per_day, 1))
        return await self._check(checks)

    async def rcpt_refused_until(self, user: UserConfig, accepted: int) -> float | None:
        """None when one more recipient (after ``accepted`` in this message) fits in the day's budget."""
        if user.max_recipients_per_day is None:
            return None
        return await self._check([WindowCheck(f"recipients:{user.name}", DAY, user.max_recipients_per_day, accepted + 1)])

    async def record(self, user: UserConfig, recipients: int) -> None:
        """Count a message the upstream accepted."""
        adds = []
        if user.max_messages_per_hour is not None:
            adds.append((f"messages:{user.name}", HOUR, 1))
        if user.max_recipients_per_day is not None and recipients > 0:
            adds.append((f"recipients:{user.name}", DAY, recipients))
        if adds:
            await self.store.window_add(adds, self._clock.seconds())

    async def _check(self, checks: list[WindowCheck]) -> float | None:
        if not checks:
            return None
        times = [t for t in await self.store.window_frees_at(checks, self._clock.seconds()) if t is not None]
        return max(times) if times else None


class Slot:
    """One session's place among the counted ones."""

    def __init__(self, counter: ConnectionCounter, key: str) -> None:
        self._counter = counter
        self.key = key
        self.authenticated = False
        self._open = True

    def set_authenticated(self, authenticated: bool) -> None:
        if self._open and authenticated != self.authenticated:
            self.authenticated = authenticated
            self._counter._unauthenticated += -1 if authenticated else 1

    def close(self) -> None:
        if self._open:
            self._open = False
            self._counter._closed(self)


class ConnectionCounter:
    """Concurrent sessions: in total, per client address (an IPv6 client's network) and before AUTH."""

    def __init__(self, limits: LimitsConfig) -> None:
        self._total = 0
        self._unauthenticated = 0
        self._per_ip: dict[str, int] = {}
        self.update(limits)

    def update(self, limits: LimitsConfig) -> None:
        """New maxima apply to the next connection; open sessions are never cut."""
        self._limits = limits

    def open(self, ip: str) -> Slot | str:
        """Count a new (not yet authenticated) session, or name the limit it is over."""
        limits = self._limits
        key = client_key(ip, limits.ipv6_prefix)
        if self._total >= limits.max_connections:
            return "max_connections"
        if self._per_ip.get(key, 0) >= limits.max_connections_per_ip:
            return "max_connections_per_ip"
        if self._unauthenticated >= limits.max_unauthenticated:
            return "max_unauthenticated"
        self._total += 1
        self._unauthenticated += 1
        self._per_ip[key] = self._per_ip.get(key, 0) + 1
        return Slot(self, key)

    def _closed(self, slot: Slot) -> None:
        self._total -= 1
        if not slot.authenticated:
            self._unauthenticated -= 1
        left = self._per_ip[slot.key] - 1
        if left:
            self._per_ip[slot.key] = left
        else:
            del self._per_ip[slot.key]

    @property
    def total(self) -> int:
        return self._total

    @property
    def unauthenticated(self) -> int:
        return self._unauthenticated


def utc(seconds: float) -> str:
    """A time for replies and logs, rounded up to the second: "2026-11-28T17:03:12Z"."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(math.ceil(seconds)))
