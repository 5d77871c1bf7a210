"""Authenticated upstream connections kept between transactions, per upstream account.

Connecting, TLS and AUTH cost more than the message itself for small mail, and several round trips
to a distant provider; a connection that ended its transaction cleanly serves the next message
routed to the same account.
"""

from __future__ import annotations

from typing import Any

from relayproxy.config import UpstreamConfig
from relayproxy.deadline import Deadline
from relayproxy.upstream.connector import Connection


class Pool:
    def __init__(self, clock: Any, config: UpstreamConfig) -> None:
        self._clock = clock
        self._config = config
        self._idle: list[Connection] = []

    def take(self, client: object) -> Connection | None:
        """A kept connection for ``client`` if one looks alive.

        The one this client's own last message used comes first, as the client left it. Any other
        goes with an RSET owed, preferring one whose client has gone over one still reserved for a
        connected client.
        """
        for own in self._idle:
            if own.client is client:
                if self._take(own):
                    return own
                break
        while self._idle:
            connection = next((c for c in reversed(self._idle) if c.client is None), self._idle[-1])
            if self._take(connection):
                # Unless the RSET is on its way already (a client left mid-envelope).
                connection.owes_reset = connection.reset_reply is None
                connection.client = client
                return connection
        return None

    def _take(self, connection: Connection) -> bool:
        """Out of the pool; whether it is still usable (if not, it is closed)."""
        self._idle.remove(connection)
        if connection.pool_timeout is not None:
            connection.pool_timeout.stop()
        if connection.usable:
            return True
        connection.abort()
        return False

    def put(self, connection: Connection) -> None:
        """Keep a clean connection for the next transaction; anything doubtful is closed, and so is one
        that has carried max_messages_per_session.

        While its client is connected, a kept connection is reserved for that client's next
        message (another client may still take it) and does not count against pool_size, which
        bounds the connections kept for whoever comes next.
        """
        limit = self._config.max_messages_per_session
        if not connection.usable or connection.in_transaction or (limit is not None and connection.messages >= limit):
            connection.close()
            return
        if connection.pool_timeout is None:
            connection.pool_timeout = Deadline(self._clock, lambda: self._expire(connection))
        connection.pool_timeout.start(self._config.pool_idle_timeout)
        self._idle.append(connection)
        self._trim()

    def departed(self, client: object) -> None:
        """``client`` disconnected: a connection kept for it is now kept for anyone."""
        for connection in self._idle:
            if connection.client is client:
                connection.client = None
        self._trim()

    def _trim(self) -> None:
        unreserved = [connection for connection in self._idle if connection.client is None]
        # The longest idle go first.
        for connection in unreserved[: max(0, len(unreserved) - self._config.pool_size)]:
            self._drop(connection)

    def _expire(self, connection: Connection) -> None:
        if connection in self._idle:
            self._drop(connection)

    def _drop(self, connection: Connection) -> None:
        self._idle.remove(connection)
        if connection.pool_timeout is not None:
            connection.pool_timeout.stop()
        connection.close()

    def close_idle(self) -> None:
        for connection in list(self._idle):
            self._drop(connection)
