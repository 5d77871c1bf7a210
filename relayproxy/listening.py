"""Listening sockets bound as a step of their own, before anything serves.

Twisted's ``StreamServerEndpointService`` logs a listen that failed (a port in use, a port below
1024 without privilege, an address not on this host) with a traceback and runs on: a proxy
without its port 465 would look healthy. ``ListenerService.bind`` raises ``CannotListen``
instead, so that the relay service binds every listener of a configuration, or none, at start-up
and on a reload.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.python.failure import Failure


class CannotListen(Exception):
    """The endpoint ``endpoint`` (as configured) could not be bound; ``reason`` is the system's error."""

    def __init__(self, endpoint: str, reason: str) -> None:
        super().__init__(f"cannot listen on {endpoint}: {reason}")
        self.endpoint = endpoint
        self.reason = reason


class ListenerService(Service):
    """Listens on one server endpoint from ``bind`` (or the service's start) until it stops."""

    def __init__(self, description: str, endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> None:
        self.description = description
        """The endpoint string of the configuration, which errors name."""
        self.factory = factory
        self._endpoint = endpoint
        self._port: IListeningPort | None = None

    @property
    def bound(self) -> bool:
        return self._port is not None

    def bind(self) -> None:
        """Listen now; raise CannotListen if the system refuses. Binding a bound service does nothing."""
        if self._port is not None:
            return
        outcome: list[IListeningPort | Failure] = []
        self._endpoint.listen(self.factory).addBoth(outcome.append)
        # Every endpoint type load_config accepts (tcp, tcp6, unix, systemd) listens at once.
        assert outcome, f"{self.description}: the endpoint did not listen at once"
        result = outcome[0]
        if isinstance(result, Failure):
            if isinstance(result.value, CannotListenError):
                raise CannotListen(self.description, str(result.value.socketError)) from None
            result.raiseException()
        self._port = result

    def unbind(self) -> defer.Deferred[None]:
        """Stop listening; connections already accepted carry on."""
        port, self._port = self._port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening).addCallback(lambda _: None)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        self.bind()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.bind()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return self.unbind()


def bind_all(listeners: Iterable[ListenerService]) -> None:
    """Bind each of ``listeners``, or none: if one cannot, those this call bound are unbound again."""
    bound: list[ListenerService] = []
    try:
        for listener in listeners:
            if not listener.bound:
                listener.bind()
                bound.append(listener)
    except CannotListen:
        for listener in bound:
            listener.unbind()
        raise
