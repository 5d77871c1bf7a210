"""What the relay reports for metrics: the calls the protocols make, whoever collects them.

The protocols call a ``Metrics`` object at a few points; ``NullMetrics`` ignores them (tests, tools)
and the Prometheus collector in ``relayproxy.prometheus`` turns them into counters and histograms.
"""

from __future__ import annotations

from typing import Literal, Protocol

AuthOutcome = Literal["ok", "failed", "throttled", "error"]
MessageOutcome = Literal["relayed", "refused", "failed"]
UpstreamPhase = Literal["connect", "tls", "auth", "end_of_data"]


class Metrics(Protocol):
    def session_opened(self) -> None: ...

    def session_closed(self) -> None: ...

    def connection_refused(self, reason: str) -> None: ...

    def auth(self, outcome: AuthOutcome) -> None: ...

    def message(self, user: str, upstream: str, outcome: MessageOutcome, size: int) -> None: ...

    def upstream_latency(self, upstream: str, phase: UpstreamPhase, seconds: float) -> None: ...


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
