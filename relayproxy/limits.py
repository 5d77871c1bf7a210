"""Abuse controls shared by all sessions: AUTH failure throttling and concurrent connection counts."""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime

from relayproxy.config import LimitsConfig

_MAX_TRACKED = 100_000
"""Keys (addresses, user names) we remember at most: a guesser sending random names cannot grow memory."""


@dataclass
class _Record:
    failures: deque[float] = field(default_factory=deque)
    blocked_until: float = 0.0
    backoff: float = 0.0


class _Window:
    """Failures per key in a sliding window; past ``threshold``, a block that doubles each time."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def configure(self, threshold: int, window: float, backoff: float, backoff_max: float) -> None:
        self._threshold = threshold
        self._window = window
        self._backoff = backoff
        self._backoff_max = backoff_max

    def blocked_for(self, key: str) -> float:
        record = self._records.get(key)
        if record is None:
            return 0.0
        return max(0.0, record.blocked_until - self._clock.seconds())

    def failed(self, key: str) -> None:
        now = self._clock.seconds()
        record = self._records.pop(key, None) or _Record()
        self._records[key] = record
        while len(self._records) > _MAX_TRACKED:
            self._records.popitem(last=False)
        while record.failures and record.failures[0] <= now - self._window:
            record.failures.popleft()
        if not record.failures and record.blocked_until + self._window < now:
            # A key that stayed quiet for a whole window starts over at the first back-off.
            record.backoff = 0.0
        record.failures.append(now)
        if len(record.failures) >= self._threshold:
            record.backoff = min(self._backoff_max, record.backoff * 2 if record.backoff else self._backoff)
            record.blocked_until = now + record.backoff
            record.failures.clear()


class AuthThrottle:
    """Counts AUTH failures per client address and per user name (RFC 4954 14: limit guessing)."""

    def __init__(self, clock: IReactorTime, limits: LimitsConfig) -> None:
        self._by_ip = _Window(clock)
        self._by_user = _Window(clock)
        self._known: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.update(limits)

    def update(self, limits: LimitsConfig) -> None:
        """New limits apply from the next failure on; counts so far are kept."""
        args = (limits.auth_failure_window, limits.auth_backoff, limits.auth_backoff_max)
        self._by_ip.configure(limits.auth_failures_per_ip, *args)
        self._by_user.configure(limits.auth_failures_per_user, *args)

    def blocked_for(self, ip: str, username: str | None) -> float:
        """Seconds this attempt must still wait; 0 when it may go ahead."""
        wait = self._by_ip.blocked_for(ip)
        # A guesser elsewhere must not lock a user out of the address it always logs in from.
        if username is not None and (username.lower(), ip) not in self._known:
            wait = max(wait, self._by_user.blocked_for(username.lower()))
        return wait

    def succeeded(self, ip: str, username: str) -> None:
        key = (username.lower(), ip)
        self._known.pop(key, None)
        self._known[key] = None
        while len(self._known) > _MAX_TRACKED:
            self._known.popitem(last=False)

    def failed(self, ip: str, username: str | None) -> None:
        self._by_ip.failed(ip)
        if username is not None:
            self._by_user.failed(username.lower())


class ConnectionCounter:
    """Concurrent sessions, in total and per client address."""

    def __init__(self, limits: LimitsConfig) -> None:
        self._total = 0
        self._per_ip: dict[str, int] = {}
        self.update(limits)

    def update(self, limits: LimitsConfig) -> None:
        """New maxima apply to the next connection; open sessions are never cut."""
        self._max = limits.max_connections
        self._max_per_ip = limits.max_connections_per_ip

    def open(self, ip: str) -> bool:
        """Count a new session; False (and nothing counted) when it is over a limit."""
        if self._total >= self._max or self._per_ip.get(ip, 0) >= self._max_per_ip:
            return False
        self._total += 1
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        return True

    def close(self, ip: str) -> None:
        self._total -= 1
        left = self._per_ip[ip] - 1
        if left:
            self._per_ip[ip] = left
        else:
            del self._per_ip[ip]

    @property
    def total(self) -> int:
        return self._total
