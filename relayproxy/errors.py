"""The one tree of relayproxy's errors."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relayproxy.smtp.reply import Reply


class RelayProxyError(Exception):
    """Base of every error relayproxy raises on purpose."""


class ConfigError(RelayProxyError):
    """The configuration cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class ProtocolError(RelayProxyError):
    """The client broke the protocol; ``reply`` is what it gets."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class UpstreamError(RelayProxyError):
    """The upstream session failed; ``reply`` is what the client gets instead.

    ``detail`` is for the log only: it names what failed and never holds a secret. ``failover``
    says another host of the same upstream may succeed where this one failed.
    """

    def __init__(
        self, reply: Reply, detail: str, failover: bool = False, *, step: str = "connect", upstream_reply: Reply | None = None
    ) -> None:
        super().__init__(detail)
        self.reply = reply
        self.detail = detail
        self.failover = failover
        self.step = step
        """What we were doing: connect, greeting, EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA, end-of-data."""
        self.upstream_reply = upstream_reply
        """The upstream's own reply when it refused something, for the operator's hint."""
