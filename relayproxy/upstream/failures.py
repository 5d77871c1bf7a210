"""The one place where what went wrong with an upstream becomes the client's reply and the log's detail."""

from __future__ import annotations

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.error import ConnectError

from relayproxy.errors import UpstreamError
from relayproxy.smtp.reply import Catalogue
from relayproxy.upstream.protocol import Desync, Lost, Timeout


def setup_failed(name: str, where: str, error: Exception) -> UpstreamError:
    """Connecting, greeting, TLS or EHLO failed: another host of the upstream may do better."""
    if isinstance(error, Lost) and error.reason.check(SSL.Error, VerificationError):  # type: ignore[no-untyped-call]
        return UpstreamError(
            Catalogue.upstream_tls_failed(name), f"TLS with {where} failed: {error.reason.getErrorMessage() or 'handshake failed'}",
            failover=True, step="STARTTLS",
        )
    if isinstance(error, Lost):
        return UpstreamError(Catalogue.upstream_unreachable(name), f"{where}: connection lost during setup: {error}", failover=True)
    if isinstance(error, OSError | ConnectError):
        return UpstreamError(Catalogue.upstream_unreachable(name), f"connect to {where}: {error}", failover=True)
    return UpstreamError(Catalogue.upstream_unreachable(name), f"{where}: setup failed: {type(error).__name__} {error}", failover=True)


def exchange_failed(name: str, step: str, error: Exception) -> UpstreamError:
    """A transaction's exchange failed; the session is never used again."""
    if isinstance(error, Lost):
        return UpstreamError(Catalogue.UPSTREAM_LOST, f"upstream {name}: connection lost at {step}: {error}", step=step)
    if isinstance(error, Timeout):
        return UpstreamError(Catalogue.UPSTREAM_TIMEOUT, f"upstream {name}: timed out at {step}", step=step)
    detail = "bytes nobody asked for" if isinstance(error, Desync) else f"{type(error).__name__} {error}"
    return UpstreamError(Catalogue.UPSTREAM_BAD_REPLY, f"upstream {name}: invalid reply at {step}: {detail}", step=step)
