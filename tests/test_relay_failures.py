"""End to end, when things go wrong: refusals relayed exactly, authentication, a broken upstream,
clients that drop or misbehave, STARTTLS injection, line limits and bare line ends.

Every assertion is about what a user sees: the reply bytes (code, enhanced code, text) and what
the upstream received.
"""

from __future__ import annotations

import base64
import smtplib

import pytest
from conftest import ProxyFactory, SmarthostFactory, UpstreamFactory
from harness import (
    CLIENT_PASSWORD,
    CLIENT_USER,
    PKI,
    UPSTREAM_PASSWORD,
    UPSTREAM_USER,
    Proxy,
    Smarthost,
    free_port,
    smarthost_upstream,
    wait_for,
)
from peers import DROP, Action, Client, ScriptedUpstream, auth_plain

MESSAGE = b"From: app1@example.org\r\nTo: bob@example.net\r\nSubject: hello\r\n\r\nhello\r\n"


def client(proxy: Proxy, pki: PKI, login: bool = True) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", proxy.port, timeout=20)
    smtp.starttls(context=pki.client_context())
    smtp.ehlo()
    if login:
        smtp.login(CLIENT_USER, CLIENT_PASSWORD)
    return smtp


def plain_b64(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def upstream_section(host: str, port: int, pki: PKI) -> str:
    return f"""
[upstream.default]
host = "{host}"
port = {port}
tls = "starttls"
ca_file = "{pki.ca_path}"
username = "{UPSTREAM_USER}"
password_env = "RELAYPROXY_TEST_UPSTREAM_PASSWORD"
"""


def tls_session(proxy: Proxy, pki: PKI) -> Client:
    """Greeted, EHLO'd and authenticated on the implicit TLS listener."""
    raw = Client(proxy.tls_port, tls=pki.client_context())
    assert raw.greeting == b"220 relay.test ESMTP relayproxy\r\n"
    assert raw.command(b"EHLO client.example").startswith(b"250-relay.test\r\n")
    assert raw.command(auth_plain()) == b"235 2.7.0 Authentication successful\r\n"
    return raw


def plain_session(proxy: Proxy) -> Client:
    """Greeted, EHLO'd and authenticated on the loopback plaintext listener (scripted upstream)."""
    raw = Client(proxy.plain_port)
    assert raw.greeting == b"220 relay.test ESMTP relayproxy\r\n"
    assert raw.command(b"EHLO client.example").startswith(b"250-relay.test\r\n")
    assert raw.command(auth_plain()) == b"235 2.7.0 Authentication successful\r\n"
    return raw


def start_transaction(raw: Client) -> None:
    assert raw.command(b"MAIL FROM:<app1@example.org>") == b"250 2.0.0 OK\r\n"
    assert raw.command(b"RCPT TO:<bob@example.net>") == b"250 2.0.0 OK\r\n"
    assert raw.command(b"DATA") == b"354 go ahead\r\n"


def after_data(upstream: ScriptedUpstream) -> bytes:
    """What the upstream received after the DATA command of its first session."""
    head, sep, tail = bytes(upstream.sessions[0]).partition(b"\r\nDATA\r\n")
    assert sep, f"no DATA reached the upstream: {head!r}"
    return tail


# -- 2. upstream refusals are relayed exactly ---------------------------------------------------


def test_refused_recipient_among_three(proxy: Proxy, pki: PKI, smarthost: Smarthost) -> None:
    smarthost.rcpt_replies["nobody@example.net"] = "550 5.1.1 <nobody@example.net>: Recipient address rejected: User unknown"
    with client(proxy, pki) as smtp:
        assert smtp.mail("app1@example.org") == (250, b"2.1.0 OK")
        assert smtp.rcpt("bob@example.net") == (250, b"2.1.5 OK")
        assert smtp.rcpt("nobody@example.net") == (
            550,
            b"5.1.1 <nobody@example.net>: Recipient address rejected: User unknown",
        )
        assert smtp.rcpt("carol@example.net") == (250, b"2.1.5 OK")
        assert smtp.data(MESSAGE) == (250, b"2.0.0 Ok: queued as TEST1")
    [got] = smarthost.received
    assert got.rcpt_tos == ["bob@example.net", "carol@example.net"]
    assert got.content == MESSAGE


def test_temporary_recipient_refusal(proxy: Proxy, pki: PKI, smarthost: Smarthost) -> None:
    smarthost.rcpt_replies["busy@example.net"] = "452 4.5.3 Too many recipients, try the rest later"
    with client(proxy, pki) as smtp:
        refused = smtp.sendmail("app1@example.org", ["bob@example.net", "busy@example.net"], MESSAGE)
    assert refused == {"busy@example.net": (452, b"4.5.3 Too many recipients, try the rest later")}
    [got] = smarthost.received
    assert got.rcpt_tos == ["bob@example.net"]


def test_multiline_refusal_relayed(proxy: Proxy, pki: PKI, smarthost: Smarthost) -> None:
    smarthost.rcpt_replies["nobody@example.net"] = "550-5.1.1 The email account does not exist.\r\n550 5.1.1 See https://support.example/nx"
    raw = tls_session(proxy, pki)
    try:
        assert raw.command(b"MAIL FROM:<app1@example.org>") == b"250 2.1.0 OK\r\n"
        assert raw.command(b"RCPT TO:<nobody@example.net>") == (
            b"550-5.1.1 The email account does not exist.\r\n550 5.1.1 See https://support.example/nx\r\n"
        )
    finally:
        raw.close()


def test_sender_refusal_relayed(proxy: Proxy, pki: PKI, smarthost: Smarthost) -> None:
    smarthost.mail_reply = "550 5.7.1 Sender rejected by upstream policy"
    with client(proxy, pki) as smtp:
        assert smtp.mail("app1@example.org") == (550, b"5.7.1 Sender rejected by upstream policy")
        assert smtp.rcpt("bob@example.net") == (503, b"5.5.1 Need MAIL command first")
    assert smarthost.received == []


def test_refusal_at_end_of_data_relayed(proxy: Proxy, pki: PKI, smarthost: Smarthost) -> None:
    smarthost.data_reply = "554 5.7.1 Rejected by policy"
    with client(proxy, pki) as smtp:
        assert smtp.mail("app1@example.org") == (250, b"2.1.0 OK")
        assert smtp.rcpt("bob@example.net") == (250, b"2.1.5 OK")
        assert smtp.data(MESSAGE) == (554, b"5.7.1 Rejected by policy")
        # The session and its upstream go on: the next message is accepted.
        smarthost.data_reply = None
        assert smtp.sendmail("app1@example.org", ["bob@example.net"], MESSAGE) == {}
    assert [r.content for r in smarthost.received] == [MESSAGE]


# -- 8. no valid recipients ---------------------------------------------------------------------


def test_data_after_all_recipients_refused(proxy: Proxy, pki: PKI, smarthost: Smarthost) -> None:
    smarthost.rcpt_replies["a@example.net"] = "550 5.1.1 No such user"
    smarthost.rcpt_replies["b@example.net"] = "450 4.2.1 Mailbox busy"
    with client(proxy, pki) as smtp:
        assert smtp.mail("app1@example.org") == (250, b"2.1.0 OK")
        assert smtp.rcpt("a@example.net") == (550, b"5.1.1 No such user")
        assert smtp.rcpt("b@example.net") == (450, b"4.2.1 Mailbox busy")
        assert smtp.docmd("DATA") == (554, b"5.5.1 No valid recipients")
        assert smtp.rset() == (250, b"2.0.0 Reset state")
        assert smtp.sendmail("app1@example.org", ["bob@example.net"], MESSAGE) == {}
    [got] = smarthost.received
    assert got.rcpt_tos == ["bob@example.net"]


# -- 3. client authentication -------------------------------------------------------------------


@pytest.mark.parametrize("user", [CLIENT_USER, "nosuchuser"], ids=["wrong-password", "unknown-user"])
def test_bad_credentials_then_good_ones(proxy: Proxy, pki: PKI, smarthost: Smarthost, user: str) -> None:
    with client(proxy, pki, login=False) as smtp:
        assert smtp.docmd("AUTH", "PLAIN " + plain_b64(user, "wrong-password")) == (
            535,
            b"5.7.8 Authentication credentials invalid",
        )
        # The same reply through LOGIN: nothing tells a guesser which part was wrong.
        assert smtp.docmd("AUTH", "LOGIN") == (334, b"VXNlcm5hbWU6")
        assert smtp.docmd(b64(user)) == (334, b"UGFzc3dvcmQ6")
        assert smtp.docmd(b64("wrong-password")) == (535, b"5.7.8 Authentication credentials invalid")
        # Not authenticated, and the connection survives for a good attempt.
        assert smtp.docmd("MAIL", "FROM:<app1@example.org>") == (530, b"5.7.0 Authentication required")
        assert smtp.docmd("AUTH", "PLAIN " + plain_b64(CLIENT_USER, CLIENT_PASSWORD)) == (
            235,
            b"2.7.0 Authentication successful",
        )
        assert smtp.sendmail("app1@example.org", ["bob@example.net"], MESSAGE) == {}
    assert len(smarthost.received) == 1


def test_auth_before_starttls_refused(proxy: Proxy, pki: PKI, smarthost: Smarthost) -> None:
    with smtplib.SMTP("127.0.0.1", proxy.port, timeout=20) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls")
        assert not smtp.has_extn("auth")
        assert smtp.docmd("AUTH", "PLAIN " + plain_b64(CLIENT_USER, CLIENT_PASSWORD)) == (
            538,
            b"5.7.11 Encryption required for requested authentication mechanism",
        )
        assert smtp.docmd("MAIL", "FROM:<app1@example.org>") == (530, b"5.7.0 Authentication required")
        smtp.starttls(context=pki.client_context())
        smtp.ehlo()
        assert smtp.has_extn("auth")
        smtp.login(CLIENT_USER, CLIENT_PASSWORD)
        assert smtp.sendmail("app1@example.org", ["bob@example.net"], MESSAGE) == {}
    assert len(smarthost.received) == 1


def test_mail_before_auth(proxy: Proxy, pki: PKI, smarthost: Smarthost) -> None:
    with client(proxy, pki, login=False) as smtp:
        assert smtp.mail("app1@example.org") == (530, b"5.7.0 Authentication required")
        assert smtp.rcpt("bob@example.net") == (530, b"5.7.0 Authentication required")
        assert smtp.docmd("DATA") == (530, b"5.7.0 Authentication required")
    assert smarthost.received == []
    assert smarthost.auth_attempts == []


def test_sender_not_allowed(make_proxy: ProxyFactory, pki: PKI, smarthost: Smarthost) -> None:
    proxy = make_proxy(
        smarthost_upstream(smarthost, pki),
        extra='[users.app1]\nallowed_senders = ["@example.org"]\n',
    )
    with client(proxy, pki) as smtp:
        assert smtp.mail("app1@example.com") == (553, b"5.7.1 Sender address not owned by user app1")
        assert smtp.mail("") == (553, b"5.7.1 Sender address not owned by user app1")
        assert smtp.mail("Someone@Example.ORG") == (250, b"2.1.0 OK")
        assert smtp.rcpt("bob@example.net") == (250, b"2.1.5 OK")
        assert smtp.data(MESSAGE) == (250, b"2.0.0 Ok: queued as TEST1")
    [got] = smarthost.received
    assert got.mail_from == "Someone@Example.ORG"


# -- 4. the upstream fails ----------------------------------------------------------------------


SECRETS = [
    UPSTREAM_PASSWORD.encode(),
    base64.b64encode(UPSTREAM_PASSWORD.encode()),
    base64.b64encode(f"\0{UPSTREAM_USER}\0{UPSTREAM_PASSWORD}".encode()),
    base64.b64encode(f"{UPSTREAM_USER}\0{UPSTREAM_USER}\0{UPSTREAM_PASSWORD}".encode()),
]


def assert_upstream_failure(proxy: Proxy, pki: PKI, expected: bytes) -> None:
    raw = tls_session(proxy, pki)
    try:
        replies = [raw.command(b"MAIL FROM:<app1@example.org>")]
        assert replies[0] == expected
        replies.append(raw.command(b"RCPT TO:<bob@example.net>"))
        assert replies[-1] == b"503 5.5.1 Need MAIL command first\r\n"
        replies.append(raw.command(b"DATA"))
        assert replies[-1].startswith(b"503 5.5.1 ")
        # A retry tries again and fails the same way: nothing is cached as a success.
        replies.append(raw.command(b"MAIL FROM:<app1@example.org>"))
        assert replies[-1] == expected
        assert raw.command(b"QUIT") == b"221 2.0.0 relay.test Bye\r\n"
    finally:
        raw.close()
    for secret in SECRETS:
        for reply in replies:
            assert secret not in reply


def test_upstream_down(make_proxy: ProxyFactory, pki: PKI) -> None:
    proxy = make_proxy(upstream_section("127.0.0.1", free_port(), pki))
    assert_upstream_failure(proxy, pki, b"451 4.4.1 Upstream default unreachable, try again later\r\n")


@pytest.mark.parametrize(
    "certificate_name, config_host",
    [("localhost", "127.0.0.1"), ("mail.other.test", "localhost")],
    ids=["ip-not-in-cert", "other-name"],
)
def test_upstream_certificate_for_another_host(
    make_proxy: ProxyFactory, make_smarthost: SmarthostFactory, pki: PKI, certificate_name: str, config_host: str
) -> None:
    # The TCP connection and the EHLO work (else this would be 451 4.4.1): only the name check fails.
    smarthost = make_smarthost(hostname=certificate_name)
    proxy = make_proxy(upstream_section(config_host, smarthost.port, pki))
    assert_upstream_failure(proxy, pki, b"454 4.7.0 TLS with upstream default failed, try again later\r\n")
    assert smarthost.auth_attempts == []
    assert smarthost.received == []


def test_upstream_refuses_central_credentials(make_proxy: ProxyFactory, make_smarthost: SmarthostFactory, pki: PKI) -> None:
    smarthost = make_smarthost(password="other")
    proxy = make_proxy(smarthost_upstream(smarthost, pki))
    assert_upstream_failure(
        proxy, pki, b"454 4.7.0 Upstream default refused the relay's credentials, try again later\r\n"
    )
    assert smarthost.auth_attempts == ["PLAIN", "PLAIN"]
    assert smarthost.received == []


def test_upstream_failure_with_smtplib(make_proxy: ProxyFactory, pki: PKI) -> None:
    proxy = make_proxy(upstream_section("127.0.0.1", free_port(), pki))
    with client(proxy, pki) as smtp:
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            smtp.sendmail("app1@example.org", ["bob@example.net"], MESSAGE)
    assert refused.value.smtp_code == 451
    assert refused.value.smtp_error == b"4.4.1 Upstream default unreachable, try again later"


# -- 5. the client drops mid-DATA ---------------------------------------------------------------


@pytest.mark.parametrize(
    "tail",
    [b"half a bo", b"whole line\r\n", b"last line\r\n.", b"last line\r\n.\r"],
    ids=["mid-line", "after-crlf", "after-dot", "after-dot-cr"],
)
def test_client_drops_mid_data(upstream_proxy: Proxy, upstream: ScriptedUpstream, tail: bytes) -> None:
    raw = plain_session(upstream_proxy)
    start_transaction(raw)
    raw.send(b"Subject: partial\r\n\r\nfirst line\r\n")
    wait_for(lambda: b"first line" in upstream.data)
    raw.send(tail)
    raw.close()
    wait_for(lambda: upstream.closed == 1)
    forwarded = after_data(upstream)
    assert forwarded.startswith(b"Subject: partial\r\n\r\nfirst line")
    # Never an end of data, nor anything after the partial body (no QUIT, no RSET).
    assert b"\r\n.\r\n" not in forwarded
    assert b"QUIT" not in forwarded and b"RSET" not in forwarded
    assert len(forwarded) <= len(b"Subject: partial\r\n\r\nfirst line\r\n" + tail)
    assert upstream.bodies == []


def test_client_drops_mid_data_smarthost_gets_nothing(proxy: Proxy, pki: PKI, smarthost: Smarthost) -> None:
    raw = tls_session(proxy, pki)
    assert raw.command(b"MAIL FROM:<app1@example.org>") == b"250 2.1.0 OK\r\n"
    assert raw.command(b"RCPT TO:<bob@example.net>") == b"250 2.1.5 OK\r\n"
    assert raw.command(b"DATA").startswith(b"354 ")
    raw.send(b"Subject: partial\r\n\r\n" + b"line\r\n" * 1000)
    raw.close()
    # The next session sees a clean upstream and its message is the only one delivered.
    raw = tls_session(proxy, pki)
    try:
        assert raw.command(b"MAIL FROM:<app1@example.org>") == b"250 2.1.0 OK\r\n"
        assert raw.command(b"RCPT TO:<carol@example.net>") == b"250 2.1.5 OK\r\n"
        assert raw.command(b"DATA").startswith(b"354 ")
        assert raw.command(MESSAGE + b".\r\n") == b"250 2.0.0 Ok: queued as TEST1\r\n"
    finally:
        raw.close()
    [got] = smarthost.received
    assert got.rcpt_tos == ["carol@example.net"]


# -- 6. STARTTLS injection ----------------------------------------------------------------------


def test_starttls_drops_pipelined_plaintext(proxy: Proxy, pki: PKI, smarthost: Smarthost) -> None:
    raw = Client(proxy.port)
    try:
        assert raw.greeting == b"220 relay.test ESMTP relayproxy\r\n"
        ehlo = raw.command(b"EHLO x")
        assert b"STARTTLS" in ehlo and b"AUTH" not in ehlo
        raw.send(b"STARTTLS\r\nMAIL FROM:<a@b.example>\r\n")
        assert raw.reply() == b"220 2.0.0 Ready to start TLS\r\n"
        raw.starttls(pki.client_context())
        ehlo = raw.command(b"EHLO x")
        # The first reply after the handshake is for our EHLO, not for the injected MAIL.
        assert ehlo.startswith(b"250-relay.test\r\n")
        assert b"250 AUTH PLAIN LOGIN\r\n" in ehlo
        assert b"STARTTLS" not in ehlo
        assert raw.command(b"RCPT TO:<x@y.example>") == b"530 5.7.0 Authentication required\r\n"
        assert raw.command(b"NOOP") == b"250 2.0.0 OK\r\n"
        assert raw.command(b"STARTTLS") == b"503 5.5.1 TLS already active\r\n"
    finally:
        raw.close()
    assert smarthost.auth_attempts == []


def test_starttls_drops_pipelined_plaintext_then_real_mail(proxy: Proxy, pki: PKI, smarthost: Smarthost) -> None:
    raw = Client(proxy.port)
    try:
        assert raw.greeting.startswith(b"220 ")
        raw.command(b"EHLO x")
        raw.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<injected@evil.example>\r\nRCPT TO:<victim@example.net>\r\n")
        assert raw.reply() == b"220 2.0.0 Ready to start TLS\r\n"
        raw.starttls(pki.client_context())
        assert raw.command(b"EHLO x").startswith(b"250-relay.test\r\n")
        assert raw.command(auth_plain()) == b"235 2.7.0 Authentication successful\r\n"
        # Had the injected MAIL survived, this would be 503 Sender already specified.
        assert raw.command(b"MAIL FROM:<app1@example.org>") == b"250 2.1.0 OK\r\n"
        assert raw.command(b"RCPT TO:<bob@example.net>") == b"250 2.1.5 OK\r\n"
        assert raw.command(b"DATA").startswith(b"354 ")
        assert raw.command(MESSAGE + b".\r\n") == b"250 2.0.0 Ok: queued as TEST1\r\n"
    finally:
        raw.close()
    [got] = smarthost.received
    assert (got.mail_from, got.rcpt_tos) == ("app1@example.org", ["bob@example.net"])


# -- 10. line limits ----------------------------------------------------------------------------


def test_command_line_limit(upstream_proxy: Proxy, upstream: ScriptedUpstream) -> None:
    raw = plain_session(upstream_proxy)
    try:
        # 512 octets with the CRLF is the limit (RFC 5321 4.5.3.1.4).
        assert raw.command(b"NOOP " + b"x" * 505 + b"\r\n") == b"250 2.0.0 OK\r\n"
        assert raw.command(b"NOOP " + b"x" * 506 + b"\r\n") == b"500 5.5.2 Line too long\r\n"
        line = b"MAIL FROM:<" + b"a" * 580 + b"@example.org>\r\n"
        assert len(line) > 512
        assert raw.command(line) == b"500 5.5.2 Line too long\r\n"
        assert raw.command(b"NOOP " + b"y" * 593 + b"\r\n") == b"500 5.5.2 Line too long\r\n"
        # A long line in pieces, and one far beyond any buffer: one reply each.
        raw.send(b"NOOP " + b"z" * 400)
        raw.send(b"z" * 400 + b"\r")
        raw.send(b"\nNOOP\r\n")
        assert raw.reply() == b"500 5.5.2 Line too long\r\n"
        assert raw.reply() == b"250 2.0.0 OK\r\n"
        assert raw.command(b"NOOP " + b"w" * 200_000 + b"\r\n") == b"500 5.5.2 Line too long\r\n"
        # The session still works.
        assert raw.command(b"NOOP") == b"250 2.0.0 OK\r\n"
        assert raw.command(b"MAIL FROM:<app1@example.org>") == b"250 2.0.0 OK\r\n"
    finally:
        raw.close()
    assert [c for c in upstream.commands if c.startswith(b"MAIL")] == [b"MAIL FROM:<app1@example.org>"]


@pytest.mark.parametrize("split", [False, True], ids=["one-packet", "split"])
def test_body_line_too_long(upstream_proxy: Proxy, upstream: ScriptedUpstream, split: bool) -> None:
    raw = plain_session(upstream_proxy)
    try:
        start_transaction(raw)
        long_line = b"x" * 999 + b"\r\n"  # 1001 octets with the CRLF
        if split:
            raw.send(b"Subject: long\r\n\r\n" + long_line[:500])
            wait_for(lambda: b"xxxx" in upstream.data)
            raw.send(long_line[500:])
        else:
            raw.send(b"Subject: long\r\n\r\n" + long_line)
        raw.send(b"MAIL FROM:<x@y.example>\r\nRCPT TO:<z@y.example>\r\nDATA\r\nmore\r\n.\r\nNOOP\r\n")
        assert raw.reply() == b"554 5.6.0 Message refused: a line is longer than 1000 octets\r\n"
        assert raw.reply() == b"250 2.0.0 OK\r\n"
        wait_for(lambda: upstream.closed == 1)
        forwarded = after_data(upstream)
        assert b"\r\n.\r\n" not in forwarded
        assert b"MAIL FROM:<x@y.example>" not in upstream.data
        assert upstream.bodies == []
        assert [c for c in upstream.commands if c.startswith(b"MAIL")] == [b"MAIL FROM:<app1@example.org>"]
        # The client may try again with a good message, on a fresh upstream session.
        start_transaction(raw)
        assert raw.command(b"Subject: ok\r\n\r\n" + b"x" * 998 + b"\r\n.\r\n") == b"250 2.0.0 Ok: queued as REC1\r\n"
    finally:
        raw.close()
    assert upstream.bodies == [b"Subject: ok\r\n\r\n" + b"x" * 998 + b"\r\n"]


# -- 11. bare line ends in commands -------------------------------------------------------------


@pytest.mark.parametrize("line_end", [b"\n", b"\r"], ids=["bare-lf", "bare-cr"])
def test_bare_line_end_in_command(upstream_proxy: Proxy, upstream: ScriptedUpstream, line_end: bytes) -> None:
    raw = plain_session(upstream_proxy)
    try:
        raw.send(b"MAIL FROM:<a@b.example>" + line_end + b"RCPT TO:<x@y.example>\r\n")
        assert raw.reply() == b"501 5.5.2 Syntax error: bare CR or LF in command\r\n"
        assert raw.command(b"NOOP") == b"250 2.0.0 OK\r\n"
    finally:
        raw.close()
    assert [c for c in upstream.commands if not c.startswith(b"EHLO")] == []


def test_bare_line_end_in_command_mid_transaction(upstream_proxy: Proxy, upstream: ScriptedUpstream) -> None:
    raw = plain_session(upstream_proxy)
    try:
        assert raw.command(b"MAIL FROM:<app1@example.org>") == b"250 2.0.0 OK\r\n"
        raw.send(b"RCPT TO:<bob@example.net>\nRCPT TO:<evil@example.com>\r\n")
        assert raw.reply() == b"501 5.5.2 Syntax error: bare CR or LF in command\r\n"
        assert raw.command(b"DATA") == b"503 5.5.1 Need RCPT before DATA\r\n"
    finally:
        raw.close()
    assert [c for c in upstream.commands if c.startswith(b"RCPT")] == []


# -- the upstream fails mid-transaction ---------------------------------------------------------


def scripted(make_proxy: ProxyFactory, make_upstream: UpstreamFactory, script: dict[str, Action]) -> tuple[Proxy, ScriptedUpstream]:
    upstream = make_upstream(script)
    return make_proxy(upstream.toml()), upstream


def test_upstream_drops_at_rcpt(make_proxy: ProxyFactory, make_upstream: UpstreamFactory) -> None:
    proxy, upstream = scripted(make_proxy, make_upstream, {"RCPT": DROP})
    raw = plain_session(proxy)
    try:
        assert raw.command(b"MAIL FROM:<app1@example.org>") == b"250 2.0.0 OK\r\n"
        assert raw.command(b"RCPT TO:<bob@example.net>") == b"451 4.4.2 Upstream connection lost, try again later\r\n"
        assert raw.command(b"RCPT TO:<carol@example.net>") == b"451 4.4.2 Upstream connection lost, try again later\r\n"
        assert raw.command(b"DATA") == b"451 4.4.2 Upstream connection lost, try again later\r\n"
        assert raw.command(b"RSET") == b"250 2.0.0 Reset state\r\n"
        # A new transaction opens a new upstream session.
        assert raw.command(b"MAIL FROM:<app1@example.org>") == b"250 2.0.0 OK\r\n"
    finally:
        raw.close()
    wait_for(lambda: len(upstream.sessions) == 2)


def test_upstream_drops_at_end_of_data(make_proxy: ProxyFactory, make_upstream: UpstreamFactory) -> None:
    proxy, upstream = scripted(make_proxy, make_upstream, {"DATA-END": DROP})
    raw = plain_session(proxy)
    try:
        start_transaction(raw)
        assert raw.command(MESSAGE + b".\r\n") == b"451 4.4.2 Upstream connection lost, try again later\r\n"
        assert raw.command(b"NOOP") == b"250 2.0.0 OK\r\n"
    finally:
        raw.close()


def test_8bitmime_refused_when_upstream_lacks_it(make_proxy: ProxyFactory, make_upstream: UpstreamFactory) -> None:
    proxy, upstream = scripted(make_proxy, make_upstream, {"EHLO": b"250-scripted.test\r\n250 PIPELINING\r\n"})
    raw = plain_session(proxy)
    try:
        assert raw.command(b"MAIL FROM:<app1@example.org> BODY=8BITMIME") == (
            b"554 5.6.3 The upstream does not accept 8-bit content (BODY=8BITMIME)\r\n"
        )
        assert raw.command(b"MAIL FROM:<app1@example.org> BODY=7BIT") == b"250 2.0.0 OK\r\n"
    finally:
        raw.close()
    # SIZE is not offered by this upstream either, so nothing but the address goes on.
    assert [c for c in upstream.commands if c.startswith(b"MAIL")] == [b"MAIL FROM:<app1@example.org>"]


def test_mail_parameters_forwarded(upstream_proxy: Proxy, upstream: ScriptedUpstream) -> None:
    raw = plain_session(upstream_proxy)
    try:
        # AUTH= names the client's identity: the upstream must only ever see the relay's.
        assert raw.command(b"MAIL FROM:<app1@example.org> SIZE=1234 BODY=8BITMIME AUTH=<evil@example.com>") == (
            b"250 2.0.0 OK\r\n"
        )
        assert raw.command(b"RSET") == b"250 2.0.0 Reset state\r\n"
        assert raw.command(b"MAIL FROM:<app1@example.org> SIZE=99999999999") == (
            b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
        )
        assert raw.command(b"MAIL FROM:<app1@example.org> XFORWARD=1") == (
            b"555 5.5.4 Parameters not recognized or not implemented\r\n"
        )
    finally:
        raw.close()
    wait_for(lambda: upstream.closed == 1)
    assert [c for c in upstream.commands if c.startswith(b"MAIL")] == [
        b"MAIL FROM:<app1@example.org> SIZE=1234 BODY=8BITMIME"
    ]
