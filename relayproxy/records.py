"""What one client session leaves behind: its log lines (one per message, per refusal, per upstream
failure) and its metrics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from relayproxy.credentials import RelayUser
from relayproxy.errors import UpstreamError
from relayproxy.explain import codes_of, hint, upstream_failure_hint
from relayproxy.logs import EventLog
from relayproxy.metrics import MessageOutcome, Metrics
from relayproxy.smtp.reply import Reply
from relayproxy.store import StoreUnavailable

log = EventLog("relayproxy.server")

_OUTCOMES: dict[str, MessageOutcome] = {
    "relayed": "relayed", "spooled": "spooled", "refused": "refused", "refused by upstream": "refused", "failed": "failed",
}


@dataclass
class Transaction:
    sender: str
    started: float
    recipients: int = 0
    refused: int = 0


class Records:
    def __init__(self, session_id: str, peer: str, clock: IReactorTime, metrics: Metrics, user: Callable[[], RelayUser | None]) -> None:
        self.session_id = session_id
        self.peer = peer
        self._clock = clock
        self._metrics = metrics
        self._user = user
        self.refused_sender: str | None = None
        """The sender of the MAIL refused last, for its refusal's hint."""

    @property
    def username(self) -> str:
        user = self._user()
        return user.name if user else "-"

    @property
    def upstream_name(self) -> str:
        user = self._user()
        return user.upstream.name if user else "-"

    def message(self, transaction: Transaction | None, size: int, reply: Reply, outcome: str, **extra: object) -> None:
        """The one line per transaction: who sent what where, and what became of it."""
        fields: dict[str, object] = {
            "session": self.session_id, "client": self.peer, "user": self.username, "upstream": self.upstream_name,
            "from": f"<{transaction.sender}>" if transaction else "-",
            "rcpts": transaction.recipients if transaction else 0, "refused": transaction.refused if transaction else 0,
            "size": size, "outcome": outcome, "reply": str(reply),
            "duration": round(self._clock.seconds() - transaction.started, 3) if transaction else 0,
            **extra,
        }
        if not reply.is_positive:
            code, enhanced = codes_of(reply)
            fields["hint"] = hint(code, enhanced, side="upstream" if outcome == "refused by upstream" else "client", command="end-of-data")
        log.info("message", **fields)
        self._metrics.message(self.username, self.upstream_name, _OUTCOMES[outcome], size)

    def refusal(self, reply: Reply, verb: str) -> None:
        if reply.code == 535 or verb == "AUTH" and reply.code == 454:
            return  # logged as "auth failed" / "auth throttled", the lines fail2ban reads
        sender, self.refused_sender = self.refused_sender, None
        user = self._user()
        log.info(
            "refused", session=self.session_id, client=self.peer, user=self.username, command=verb, reply=str(reply),
            hint=hint(
                reply.code, reply.enhanced, side="client", command=verb, sender=sender, user=self.username,
                allowed_senders=user.config.allowed_senders if user else (),
            ),
        )

    def upstream_failure(self, error: UpstreamError) -> None:
        user = self._user()
        upstream = user.upstream if user else None
        log.warn(
            "upstream failure", session=self.session_id, client=self.peer, user=self.username,
            upstream=upstream.name if upstream else "-", step=error.step, detail=error.detail,
            hint=upstream_failure_hint(error, upstream.name if upstream else "-", upstream.host if upstream else None),
        )

    def store_unavailable(self, error: StoreUnavailable, command: str) -> None:
        log.error(
            "limit store unavailable", store=error.store, detail=error.detail, command=command,
            session=self.session_id, client=self.peer, user=self.username,
        )
