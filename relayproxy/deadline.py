"""A timeout that moves with every command and almost never fires.

Cancelling a delayed call and making a new one for each command or reply costs more than the rest
of a short command's handling. One pending call is kept instead: moving the deadline later only
records it, and when the call fires early it looks at the deadline and waits again.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Deadline:
    def __init__(self, clock: IReactorTime, expired: Callable[[], None]) -> None:
        self._clock = clock
        self._expired = expired
        self._at: float | None = None
        self._call: IDelayedCall | None = None

    @property
    def running(self) -> bool:
        return self._at is not None

    def start(self, seconds: float) -> None:
        """``expired`` is called ``seconds`` from now, unless started again or stopped before."""
        self._at = at = self._clock.seconds() + seconds
        call = self._call
        if call is None or not call.active():
            self._call = self._clock.callLater(seconds, self._check)
        elif call.getTime() > at:
            call.reset(seconds)

    def stop(self) -> None:
        """Not expired until started again; the pending call is kept for that."""
        self._at = None

    def cancel(self) -> None:
        """Stopped for good: no call stays pending (the connection is gone)."""
        self._at = None
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _check(self) -> None:
        self._call = None
        if self._at is None:
            return
        remaining = self._at - self._clock.seconds()
        if remaining > 0:
            self._call = self._clock.callLater(remaining, self._check)
        else:
            self._at = None
            self._expired()
