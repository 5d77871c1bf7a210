"""What the relay reports for metrics: the calls the protocols make, whoever collects them.

The protocols call a ``Metrics`` object at a few points; ``NullMetrics`` ignores them (tests, tools)
and the Prometheus collector in ``relayproxy.prometheus`` turns them into counters and histograms.
"""

from __future__ import annotations

from typing import Literal, Protocol

AuthOutcome = Literal["ok", "failed", "throttled", "error"]
MessageOutcome = Literal["relayed", "spooled", "refused", "failed"]
UpstreamPhase = Literal["connect", "tls", "auth", "end_of_data"]
SpoolOutcome = Literal["delivered", "deferred", "bounced", "expired", "corrupt"]
"""Per recipient, what a spool delivery attempt did (corrupt: per file moved aside)."""


class Metrics(Protocol):
    def session_opened(self) -> None: ...

    def session_closed(self) -> None: ...

    def connection_refused(self, reason: str) -> None: ...

    def auth(self, outcome: AuthOutcome) -> None: ...

    def message(self, user: str, upstream: str, outcome: MessageOutcome, size: int) -> None: ...

    def upstream_latency(self, upstream: str, phase: UpstreamPhase, seconds: float) -> None: ...

    def spool_delivery(self, upstream: str, outcome: SpoolOutcome, count: int = 1) -> None: ...

    def spool_state(self, messages: int, oldest_age: float) -> None:
        """What the last read of the spool found: messages waiting, and the age of the oldest in seconds."""


class NullMetrics:
    def session_opened(self) -> None:
        pass

    def session_closed(self) -> None:
        pass

    def connection_refused(self, reason: str) -> None:
        pass

    def auth(self, outcome: AuthOutcome) -> None:
        pass

    def message(self, user: str, upstream: str, outcome: MessageOutcome, size: int) -> None:
        pass

    def upstream_latency(self, upstream: str, phase: UpstreamPhase, seconds: float) -> None:
        pass

    def spool_delivery(self, upstream: str, outcome: SpoolOutcome, count: int = 1) -> None:
        pass

    def spool_state(self, messages: int, oldest_age: float) -> None:
        pass
