"""`relayproxy check`: prove every upstream works with the central credentials, send no mail;
with --offline, only that the configuration and the users file can be used."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from relayproxy.config import Config, UpstreamConfig
from relayproxy.usersfile import read_users_file
from relayproxy.errors import UpstreamError
from relayproxy.explain import upstream_failure_hint
from relayproxy.oauth import TokenError, TokenSource
from relayproxy.upstream.connector import Connector


async def check_upstreams(config: Config, reactor: Any, say: Callable[[str], None]) -> int:
    """One line per upstream; the number of upstreams that failed."""
    failed = 0
    for name, upstream in config.upstreams.items():
        if upstream.kind == "graph":
            failed += not await _check_graph(upstream, reactor, say)
            continue
        where = f"{upstream.host}:{upstream.port} ({upstream.tls})"
        try:
            connection = await Connector(reactor, upstream, config.server.hostname).open()
        except UpstreamError as e:
            failed += 1
            say(f"FAIL upstream {name} {where}: {e.detail}")
            say(f"     hint: {upstream_failure_hint(e, name, upstream.host)}")
            continue
        authenticated = "authenticated as " + upstream.username if upstream.username else "no credentials sent"
        say(f"ok   upstream {name} {where}: {connection.tls_description()}; {authenticated}")
        connection.close()
    return failed


async def _check_graph(upstream: UpstreamConfig, reactor: Any, say: Callable[[str], None]) -> bool:
    """A Graph upstream works when its app gets a token; sending needs Mail.Send, which only a
    message shows (a 403 names it)."""
    where = f"graph {upstream.graph_url} as {upstream.username}"
    try:
        await TokenSource(reactor, upstream).token()
    except TokenError as e:
        say(f"FAIL upstream {upstream.name} {where}: {e.detail}")
        say("     hint: check token_url, client_id and the client secret of the app registration (and that it is not expired)")
        return False
    assert upstream.oauth is not None
    say(f"ok   upstream {upstream.name} {where}: access token from {upstream.oauth.token_url}")
    return True


def check_users(config: Config, say: Callable[[str], None]) -> None:
    """Warnings only: the config loader already refused what cannot work."""
    users = read_users_file(config.auth.users_file)
    for name in sorted(set(config.users) - set(users)):
        say(f"warn user {name}: has a [users.{name}] section but no entry in {config.auth.users_file}, so cannot log in")
    routed = {name: config.user(name).upstream for name in users}
    unused = sorted(set(config.upstreams) - set(routed.values()))
    for name in unused:
        say(f"warn upstream {name}: no user is routed to it")
    say(f"ok   users file {config.auth.users_file}: {len(users)} user(s)")


def summary(config: Config) -> str:
    """What an offline check found usable; load_config has checked everything a file can say."""
    return (
        f"ok   configuration {config.path}: {len(config.listeners)} listener(s), {len(config.upstreams)} upstream(s) "
        f"({', '.join(config.upstreams)}), {len(config.users)} [users] section(s); no connection made (--offline)"
    )
