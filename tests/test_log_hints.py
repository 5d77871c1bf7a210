"""The operator's view: log lines carry the right hint= for the situation (issue: explain replies)."""

from __future__ import annotations

from typing import Any

from conftest import ProxyFactory, SmarthostFactory
from harness import PKI, fields_of, login, smarthost_upstream, wait_for


def test_upstream_535_blames_the_proxys_credentials(
    make_proxy: ProxyFactory, make_smarthost: SmarthostFactory, pki: PKI, events: list[dict[str, Any]]
) -> None:
    smarthost = make_smarthost(password="rotated")
    proxy = make_proxy(smarthost_upstream(smarthost, pki))
    with login(proxy.port, pki) as smtp:
        assert smtp.mail("app1@example.org")[0] == 454
    [failure] = fields_of(events, "upstream failure")
    assert failure["step"] == "AUTH" and failure["upstream"] == "default"
    assert failure["hint"].startswith("upstream default refused the proxy's own relay credentials, not the client's")


def test_client_that_never_ends_its_body_is_told_so(
    make_proxy: ProxyFactory, make_smarthost: SmarthostFactory, pki: PKI, events: list[dict[str, Any]]
) -> None:
    smarthost = make_smarthost()
    proxy = make_proxy(smarthost_upstream(smarthost, pki), extra="[limits]\ndata_timeout = 0.3\n")
    smtp = login(proxy.port, pki)
    smtp.mail("app1@example.org")
    smtp.rcpt("bob@example.net")
    assert smtp.docmd("DATA")[0] == 354
    smtp.send(b"Subject: unfinished\r\n\r\nno final dot")
    assert smtp.getreply() == (421, b"4.4.2 relay.test Timeout, closing connection")
    smtp.close()
    wait_for(lambda: bool(fields_of(events, "timeout")))
    [timeout] = fields_of(events, "timeout")
    assert timeout["situation"] == "data-timeout"
    assert "never sent the final '.' line" in timeout["hint"]
    assert smarthost.received == []


def test_sender_refusal_names_the_sender_and_the_allowed_ones(
    make_proxy: ProxyFactory, make_smarthost: SmarthostFactory, pki: PKI, events: list[dict[str, Any]]
) -> None:
    smarthost = make_smarthost()
    proxy = make_proxy(
        smarthost_upstream(smarthost, pki), extra='[users.app1]\nallowed_senders = ["@example.org", "ops@example.net"]\n'
    )
    with login(proxy.port, pki) as smtp:
        assert smtp.mail("ceo@example.com") == (553, b"5.7.1 Sender address not owned by user app1")
    [refused] = fields_of(events, "refused")
    assert refused["command"] == "MAIL"
    assert "<ceo@example.com>" in refused["hint"] and "@example.org, ops@example.net" in refused["hint"]
    assert "app1" in refused["hint"]
