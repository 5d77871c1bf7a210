""""auth ok" is logged when a user logs in from an address for the first time in an hour, not at
every login of an app that connects all day (its messages are logged one by one anyway)."""

from __future__ import annotations

import smtplib
from typing import Any

from conftest import ProxyFactory
from harness import CLIENT_PASSWORD, CLIENT_USER, PKI, Proxy, fields_of
from peers import ScriptedUpstream
from twisted.internet.task import Clock

from relayproxy.logs import FirstSeen


def log_in_and_quit(proxy: Proxy, pki: PKI, source: str = "127.0.0.1") -> None:
    with smtplib.SMTP("127.0.0.1", proxy.port, timeout=20, source_address=(source, 0)) as smtp:
        smtp.starttls(context=pki.client_context())
        assert smtp.login(CLIENT_USER, CLIENT_PASSWORD)[0] == 235


def test_a_login_is_logged_once_per_address(
    make_proxy: ProxyFactory, upstream: ScriptedUpstream, pki: PKI, events: list[dict[str, Any]]
) -> None:
    proxy = make_proxy(upstream.toml())
    for _ in range(3):
        log_in_and_quit(proxy, pki)
    log_in_and_quit(proxy, pki, source="127.0.0.2")
    # Each line is written before the 235 it goes with, so all are in by now.
    logins = [(f["user"], f["client"]) for f in fields_of(events, "auth ok")]
    assert logins == [(CLIENT_USER, "127.0.0.1"), (CLIENT_USER, "127.0.0.2")]


def test_first_seen_forgets_after_its_period() -> None:
    clock = Clock()
    seen = FirstSeen(clock, 3600)
    assert seen.first(("app1", "192.0.2.1"))
    assert not seen.first(("app1", "192.0.2.1"))
    assert seen.first(("app2", "192.0.2.1"))
    clock.advance(3599)
    assert not seen.first(("app1", "192.0.2.1"))
    clock.advance(3600)
    assert seen.first(("app1", "192.0.2.1"))


def test_first_seen_memory_is_bounded() -> None:
    seen = FirstSeen(Clock(), 3600, max_keys=100)
    for n in range(1000):
        assert seen.first(n)
    assert len(seen._seen) <= 100
