"""Pacing one upstream to the provider's limits: sessions at once, and messages per minute.

Providers enforce both (Exchange Online: 30 messages a minute per mailbox; Microsoft Graph: 4
concurrent requests per mailbox), and a burst of apps trips them with errors every app then sees.
Here the apps wait instead: one queue per limit, first come first served, on the reactor's clock.
A pass-through client is impatient: after ``pacing_timeout`` it gets 451 4.7.0 (naming the limit)
and retries as it would after the provider's own 4xx. A spool delivery is patient and waits its turn.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall

from relayproxy.errors import UpstreamError
from relayproxy.logs import EventLog
from relayproxy.smtp.reply import Catalogue, Reply

log = EventLog("relayproxy.upstream")

WINDOW = 60.0
"""max_messages_per_minute counts the transactions begun in any 60 seconds."""
_NOTED = 1.0
"""A wait this long or longer is logged."""


class Paced(UpstreamError):
    """An impatient client waited pacing_timeout for a slot."""


@dataclass
class _Waiter:
    wake: defer.Deferred[None]
    since: float
    timer: IDelayedCall | None = field(default=None)


class _Line:
    """Waiters for one limit, in order; an impatient one leaves after the timeout."""

    def __init__(self, clock: Any, refusal: Callable[[], UpstreamError]) -> None:
        self._clock = clock
        self._refusal = refusal
        self._waiting: deque[_Waiter] = deque()

    def __len__(self) -> int:
        return sum(1 for waiter in self._waiting if not waiter.wake.called)

    def join(self, timeout: float | None) -> defer.Deferred[None]:
        waiter = _Waiter(defer.Deferred(), self._clock.seconds())
        if timeout is not None:
            waiter.timer = self._clock.callLater(timeout, self._give_up, waiter)
        self._waiting.append(waiter)
        return waiter.wake

    def _give_up(self, waiter: _Waiter) -> None:
        self._waiting.remove(waiter)
        if not waiter.wake.called:
            waiter.wake.errback(self._refusal())

    def next(self) -> _Waiter | None:
        """The first in line leaves it (to be called back by the caller), or None. One whose wait
        was cancelled (a spool delivery stopped for a shutdown) has left already."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            if not waiter.wake.called:
                return waiter
        return None


class Pacer:
    """One upstream's limits; ``None`` limits never wait."""

    def __init__(self, clock: Any, name: str, max_sessions: int | None, max_per_minute: int | None, timeout: float) -> None:
        self._clock = clock
        self.name = name
        self.max_sessions = max_sessions
        self.max_per_minute = max_per_minute
        self.timeout = timeout
        self.sessions = 0
        self._session_line = _Line(clock, lambda: self._refused(Catalogue.upstream_busy(name), "max_sessions"))
        self._message_line = _Line(clock, lambda: self._refused(Catalogue.upstream_rate(name), "max_messages_per_minute"))
        self._started: deque[float] = deque()
        self._rate_timer: IDelayedCall | None = None

    def _refused(self, reply: Reply, limit: str) -> UpstreamError:
        log.warn("paced", upstream=self.name, limit=limit, waited=round(self.timeout, 3), outcome="refused")
        return Paced(reply, f"upstream {self.name}: waited {self.timeout:g} s for {limit}", step="pacing")

    # -- sessions -------------------------------------------------------------------------------

    def take_session(self, woken: bool = False) -> bool:
        """A session slot now, if one is free and nobody is before us in line (``woken``: we were first)."""
        if self.max_sessions is not None and (self.sessions >= self.max_sessions or (len(self._session_line) and not woken)):
            return False
        self.sessions += 1
        return True

    async def wait_session(self, patient: bool) -> None:
        """Until a slot may be free (a session ended or went back to a pool); raises Paced."""
        since = self._clock.seconds()
        await self._session_line.join(None if patient else self.timeout)
        self._noted("max_sessions", since)

    def session_ended(self) -> None:
        self.sessions -= 1
        self.session_free()

    def session_free(self) -> None:
        """A slot or a kept session is there for the first in line."""
        waiter = self._session_line.next()
        if waiter is not None:
            waiter.wake.callback(None)

    # -- messages -------------------------------------------------------------------------------

    async def message(self, patient: bool) -> None:
        """A transaction may begin now; waits for room in the minute; raises Paced. Only for a
        pacer with max_per_minute (callers skip the call, and its coroutine, without one)."""
        assert self.max_per_minute is not None
        if not len(self._message_line) and self._room():
            self._started.append(self._clock.seconds())
            return
        since = self._clock.seconds()
        wake = self._message_line.join(None if patient else self.timeout)
        self._schedule()
        await wake
        self._noted("max_messages_per_minute", since)

    def _room(self) -> bool:
        assert self.max_per_minute is not None
        now = self._clock.seconds()
        while self._started and self._started[0] <= now - WINDOW:
            self._started.popleft()
        return len(self._started) < self.max_per_minute

    def _schedule(self) -> None:
        if self._rate_timer is None or not self._rate_timer.active():
            delay = max(0.0, self._started[0] + WINDOW - self._clock.seconds()) if self._started else 0.0
            self._rate_timer = self._clock.callLater(delay, self._let_in)

    def _let_in(self) -> None:
        while len(self._message_line) and self._room():
            waiter = self._message_line.next()
            assert waiter is not None
            self._started.append(self._clock.seconds())
            waiter.wake.callback(None)
        if len(self._message_line):
            self._schedule()

    def _noted(self, limit: str, since: float) -> None:
        waited = self._clock.seconds() - since
        if waited >= _NOTED:
            log.info("paced", upstream=self.name, limit=limit, waited=round(waited, 3), outcome="went on")
