"""A timeout that moves with every command: one delayed call per connection, reset as it moves.

Twisted's own DelayedCall.reset moves the pending call; `make bench` showed no gain from the
hand-made deadline that kept a stale call pending instead (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Deadline:
    def __init__(self, clock: IReactorTime, expired: Callable[[], None]) -> None:
        self._clock = clock
        self._expired = expired
        self._call: IDelayedCall | None = None

    @property
    def running(self) -> bool:
        return self._call is not None and self._call.active()

    def start(self, seconds: float) -> None:
        """``expired`` is called ``seconds`` from now, unless started again or stopped before."""
        if self._call is not None and self._call.active():
            self._call.reset(seconds)
        else:
            self._call = self._clock.callLater(seconds, self._expired)

    def stop(self) -> None:
        """Not expired until started again; no call stays pending."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
