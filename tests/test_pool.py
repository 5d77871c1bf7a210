"""Upstream session reuse: an authenticated session that ended cleanly serves the next client."""

from __future__ import annotations

import smtplib

from conftest import ProxyFactory, SmarthostFactory, UpstreamFactory
from harness import CLIENT_PASSWORD, CLIENT_USER, PKI, Proxy, smarthost_upstream, wait_for
from peers import DROP, Client, ScriptedUpstream, auth_plain


def send(proxy: Proxy, pki: PKI, subject: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", proxy.port, timeout=20) as smtp:
        smtp.starttls(context=pki.client_context())
        smtp.login(CLIENT_USER, CLIENT_PASSWORD)
        smtp.mail("app1@example.org")
        smtp.rcpt("bob@example.net")
        return smtp.data(f"Subject: {subject}\r\n\r\nhi\r\n".encode())


def logged_in(proxy: Proxy) -> Client:
    raw = Client(proxy.plain_port)
    raw.command(b"EHLO client.test")
    assert raw.command(auth_plain()).startswith(b"235")
    return raw


def transaction(proxy: Proxy, subject: str = "x", mail_reply: bytes = b"250 2.0.0 OK\r\n") -> None:
    """One client session carrying one message through the plaintext listener, then QUIT."""
    raw = logged_in(proxy)
    assert raw.command(b"MAIL FROM:<app1@example.org>") == mail_reply
    raw.command(b"RCPT TO:<bob@example.net>")
    raw.command(b"DATA")
    assert raw.command(f"Subject: {subject}\r\n\r\nhi\r\n.".encode()) == b"250 2.0.0 Ok: queued as REC1\r\n"
    raw.command(b"QUIT")
    raw.close()


def send_one(raw: Client) -> None:
    assert raw.command(b"MAIL FROM:<app1@example.org>") == b"250 2.0.0 OK\r\n"
    raw.command(b"RCPT TO:<bob@example.net>")
    raw.command(b"DATA")
    assert raw.command(b"Subject: x\r\n\r\nhi\r\n.") == b"250 2.0.0 Ok: queued as REC1\r\n"


def pooled(upstream: ScriptedUpstream, extra: str = "") -> str:
    return upstream.toml(pool_size=2) + extra


def test_next_client_reuses_the_authenticated_session(make_proxy: ProxyFactory, make_smarthost: SmarthostFactory, pki: PKI) -> None:
    smarthost = make_smarthost()
    proxy = make_proxy(smarthost_upstream(smarthost, pki))
    assert send(proxy, pki, "one") == (250, b"2.0.0 Ok: queued as TEST1")
    assert send(proxy, pki, "two") == (250, b"2.0.0 Ok: queued as TEST1")
    assert [m.content.split(b"\r\n")[0] for m in smarthost.received] == [b"Subject: one", b"Subject: two"]
    assert smarthost.auth_attempts == ["PLAIN"]


def test_pool_size_0_keeps_nothing(make_proxy: ProxyFactory, make_smarthost: SmarthostFactory, pki: PKI) -> None:
    smarthost = make_smarthost()
    proxy = make_proxy(smarthost_upstream(smarthost, pki) + "pool_size = 0\n")
    send(proxy, pki, "one")
    send(proxy, pki, "two")
    assert smarthost.auth_attempts == ["PLAIN", "PLAIN"]


def test_reused_session_starts_with_rset(make_proxy: ProxyFactory, upstream: ScriptedUpstream) -> None:
    proxy = make_proxy(pooled(upstream))
    for subject in ("one", "two"):
        transaction(proxy, subject)
    assert len(upstream.sessions) == 1
    commands = [c.split(b" ")[0].split(b":")[0] for c in upstream.commands]
    assert commands == [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"MAIL", b"RCPT", b"DATA"]


def test_kept_session_sends_rset_and_mail_in_one_write(make_proxy: ProxyFactory, upstream: ScriptedUpstream) -> None:
    """The upstream offers PIPELINING: reusing a session costs no extra round trip."""
    proxy = make_proxy(pooled(upstream))
    for subject in ("one", "two"):
        transaction(proxy, subject)
    assert b"RSET\r\nMAIL FROM:<app1@example.org>\r\n" in upstream.all_reads


def test_kept_session_without_pipelining_waits_for_rset(make_proxy: ProxyFactory, make_upstream: UpstreamFactory) -> None:
    upstream = make_upstream({"EHLO": b"250-scripted.test\r\n250 8BITMIME\r\n"})
    proxy = make_proxy(pooled(upstream))
    for subject in ("one", "two"):
        transaction(proxy, subject)
    assert len(upstream.sessions) == 1
    assert b"RSET\r\n" in upstream.all_reads
    assert b"MAIL FROM:<app1@example.org>\r\n" in upstream.all_reads


def test_kept_session_refusing_rset_is_replaced(make_proxy: ProxyFactory, make_upstream: UpstreamFactory) -> None:
    upstream = make_upstream({"RSET": b"421 4.4.2 idle too long\r\n"})
    proxy = make_proxy(pooled(upstream))
    for subject in ("one", "two"):
        transaction(proxy, subject)
    assert len(upstream.sessions) == 2
    assert [b.split(b"\r\n")[0] for b in upstream.bodies] == [b"Subject: one", b"Subject: two"]


def test_a_client_holds_no_upstream_session_between_messages(make_proxy: ProxyFactory, upstream: ScriptedUpstream) -> None:
    """The session goes back to the pool at the upstream's verdict: a second client, while the first
    is still connected, gets it (and the first one's next message gets it back)."""
    proxy = make_proxy(pooled(upstream))
    first, second = logged_in(proxy), logged_in(proxy)
    for raw in (first, second, first):
        send_one(raw)
    assert len(upstream.sessions) == 1 and len(upstream.bodies) == 3
    first.close()
    second.close()


def test_a_clients_next_message_takes_its_own_session_back_without_rset(make_proxy: ProxyFactory, upstream: ScriptedUpstream) -> None:
    proxy = make_proxy(pooled(upstream))
    raw = logged_in(proxy)
    for _ in range(2):
        send_one(raw)
    raw.close()
    commands = [c.split(b" ")[0].split(b":")[0] for c in upstream.commands]
    assert commands == [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"MAIL", b"RCPT", b"DATA"]


def test_connected_clients_keep_their_sessions_beyond_pool_size(make_proxy: ProxyFactory, upstream: ScriptedUpstream) -> None:
    """pool_size (2 here) bounds the sessions kept for whoever comes next; each connected client's
    session waits for its next message, then the extra ones close once their clients are gone."""
    proxy = make_proxy(pooled(upstream))
    clients = [logged_in(proxy) for _ in range(3)]
    # Three transactions at once need three sessions.
    for raw in clients:
        assert raw.command(b"MAIL FROM:<app1@example.org>") == b"250 2.0.0 OK\r\n"
    for raw in clients:
        raw.command(b"RCPT TO:<bob@example.net>")
        raw.command(b"DATA")
        assert raw.command(b"Subject: x\r\n\r\nhi\r\n.") == b"250 2.0.0 Ok: queued as REC1\r\n"
    for raw in clients:
        send_one(raw)
    assert len(upstream.sessions) == 3 and upstream.closed == 0
    assert b"RSET" not in upstream.data
    for raw in clients:
        raw.command(b"QUIT")
        raw.close()
    wait_for(lambda: upstream.closed == 1)
    assert bytes(upstream.sessions[0]).endswith(b"QUIT\r\n")


def test_dead_kept_session_is_replaced(make_proxy: ProxyFactory, make_upstream: UpstreamFactory) -> None:
    upstream = make_upstream({"RSET": DROP})
    proxy = make_proxy(pooled(upstream))
    for _ in range(2):
        transaction(proxy)
    assert len(upstream.sessions) == 2


def test_session_that_errored_is_never_reused(make_proxy: ProxyFactory, upstream: ScriptedUpstream) -> None:
    proxy = make_proxy(pooled(upstream))
    raw = logged_in(proxy)
    raw.command(b"MAIL FROM:<app1@example.org>")
    raw.command(b"RCPT TO:<bob@example.net>")
    raw.command(b"DATA")
    raw.send(b"Subject: cut\r\n\r\nhalf a bo")
    raw.close()
    wait_for(lambda: upstream.closed == 1)
    raw = logged_in(proxy)
    assert raw.command(b"MAIL FROM:<app1@example.org>").startswith(b"250")
    raw.close()
    wait_for(lambda: len(upstream.sessions) == 2)
    assert b"\r\n.\r\n" not in bytes(upstream.sessions[0])


def test_idle_sessions_are_closed(make_proxy: ProxyFactory, upstream: ScriptedUpstream) -> None:
    proxy = make_proxy(pooled(upstream, "pool_idle_timeout = 0.2\n"))
    raw = logged_in(proxy)
    raw.command(b"MAIL FROM:<app1@example.org>")
    raw.command(b"RSET")
    raw.command(b"QUIT")
    raw.close()
    wait_for(lambda: upstream.closed == 1)
    assert bytes(upstream.sessions[0]).endswith(b"RSET\r\nQUIT\r\n")


def test_kept_session_over_its_message_limit_is_replaced(make_proxy: ProxyFactory, make_upstream: UpstreamFactory) -> None:
    # Providers cap messages per connection and answer the next MAIL with 421.
    upstream = make_upstream(
        {"MAIL": [b"250 2.1.0 OK\r\n", b"421 4.7.0 Too many messages on this connection\r\n", b"250 2.1.0 OK\r\n"]}
    )
    proxy = make_proxy(pooled(upstream))
    for _ in range(2):
        transaction(proxy, mail_reply=b"250 2.1.0 OK\r\n")
    assert len(upstream.sessions) == 2


def test_max_messages_per_session_ends_a_session_after_that_many(make_proxy: ProxyFactory, upstream: ScriptedUpstream) -> None:
    """For a smarthost that stops delivering at once after so many messages on one connection (Exim's
    smtp_accept_queue_per_connection): the session ends with QUIT and the next message gets a new one."""
    proxy = make_proxy(pooled(upstream, "max_messages_per_session = 2\n"))
    raw = logged_in(proxy)
    for _ in range(5):
        send_one(raw)
    wait_for(lambda: upstream.closed == 2)
    assert [bytes(session).count(b"DATA\r\n") for session in upstream.sessions] == [2, 2, 1]
    assert all(bytes(session).endswith(b"QUIT\r\n") for session in upstream.sessions[:2])
    raw.close()


def test_session_with_a_stray_partial_reply_is_not_reused(make_proxy: ProxyFactory, make_upstream: UpstreamFactory) -> None:
    # A continuation line nobody asked for would merge into the next reply: the session is dropped.
    upstream = make_upstream({"DATA-END": b"250 2.0.0 Ok: queued as REC1\r\n250-stray continuation\r\n"})
    proxy = make_proxy(pooled(upstream))
    for _ in range(2):
        transaction(proxy)
    assert len(upstream.sessions) == 2
    assert b"RSET" not in bytes(upstream.sessions[0])
