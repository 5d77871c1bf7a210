"""End to end: smtplib -> relayproxy -> aiosmtpd smarthost with STARTTLS and AUTH, real certificates.

The happy paths: what a client sends arrives at the smarthost byte for byte, on every listener,
for several messages in one session, and with pipelining and swaks as clients.
"""

from __future__ import annotations

import re
import shutil
import smtplib
import subprocess

import pytest
from conftest import ProxyFactory
from harness import (
    CLIENT_PASSWORD,
    CLIENT_USER,
    PKI,
    Proxy,
    Smarthost,
    free_port,
    wait_for,
    wait_listening,
)
from peers import Client, ScriptedUpstream, auth_plain

MESSAGE = (
    b"From: app1@example.org\r\nTo: bob@example.net\r\nSubject: hello\r\n\r\n"
    b"first line\r\n.starts with a dot\r\n..two dots\r\n.\r\n\r\nend\r\n"
)


def client(proxy: Proxy, pki: PKI) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", proxy.port, timeout=20)
    smtp.starttls(context=pki.client_context())
    smtp.login(CLIENT_USER, CLIENT_PASSWORD)
    return smtp


def message(subject: str, body: bytes = b"hello\r\n") -> bytes:
    return (
        b"From: app1@example.org\r\nTo: bob@example.net\r\nSubject: " + subject.encode() + b"\r\n\r\n" + body
    )


def stuffed(body: bytes) -> bytes:
    """The client's dot-stuffing (RFC 5321 4.5.2) for bodies sent with peers.Client."""
    return re.sub(rb"(?m)^\.", b"..", body)


# -- 1. byte for byte -------------------------------------------------------------------------


def test_message_arrives_byte_for_byte(proxy: Proxy, pki: PKI, smarthost: Smarthost) -> None:
    with client(proxy, pki) as smtp:
        refused = smtp.sendmail("app1@example.org", ["bob@example.net"], MESSAGE)
    assert refused == {}
    [got] = smarthost.received
    assert got.mail_from == "app1@example.org"
    assert got.rcpt_tos == ["bob@example.net"]
    assert got.content == MESSAGE


def test_8_mib_body_arrives_byte_for_byte(proxy: Proxy, pki: PKI, smarthost: Smarthost) -> None:
    # 76-character lines like base64 MIME parts; some start with dots, the last one does not end
    # at a chunk boundary of any kind.
    lines = [(b"." if i % 97 == 0 else b"") + (b"%07d" % i) * 9 + b"x" * 13 for i in range(8 * 1024 * 1024 // 78 + 1)]
    body = b"\r\n".join(lines) + b"\r\n"
    msg = message("big", body)
    assert len(msg) > 8 * 1024 * 1024
    with client(proxy, pki) as smtp:
        assert smtp.sendmail("app1@example.org", ["bob@example.net"], msg) == {}
        # The session goes on after a body big enough to make the upstream push back.
        smtp.sock.settimeout(5)
        assert smtp.noop() == (250, b"2.0.0 OK")
        assert smtp.sendmail("app1@example.org", ["carol@example.net"], message("next")) == {}
    assert len(smarthost.received) == 2
    got = smarthost.received[0]
    assert smarthost.received[1].content == message("next")
    assert len(got.content) == len(msg)
    assert got.content == msg


def test_8bitmime_body_arrives_unchanged(proxy: Proxy, pki: PKI, smarthost: Smarthost) -> None:
    body = "Grüße aus Köln, 東京, Ελλάδα — ½ €\r\n.Zeile mit Punkt: ÿ\r\n".encode()
    msg = (
        b"From: app1@example.org\r\nTo: bob@example.net\r\nSubject: 8bit\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" + body
    )
    with client(proxy, pki) as smtp:
        assert smtp.has_extn("8bitmime")
        assert smtp.sendmail("app1@example.org", ["bob@example.net"], msg, mail_options=["BODY=8BITMIME"]) == {}
    [got] = smarthost.received
    assert got.content == msg
    assert "BODY=8BITMIME" in got.mail_options


def test_implicit_tls_listener(proxy: Proxy, pki: PKI, smarthost: Smarthost) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", proxy.tls_port, context=pki.client_context(), timeout=20) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("auth")
        assert not smtp.has_extn("starttls")
        smtp.login(CLIENT_USER, CLIENT_PASSWORD)
        assert smtp.sendmail("app1@example.org", ["bob@example.net"], MESSAGE) == {}
    [got] = smarthost.received
    assert got.content == MESSAGE
    assert got.rcpt_tos == ["bob@example.net"]


def test_two_messages_share_one_upstream_session(proxy: Proxy, pki: PKI, smarthost: Smarthost) -> None:
    with client(proxy, pki) as smtp:
        assert smtp.sendmail("app1@example.org", ["bob@example.net"], message("one")) == {}
        assert smtp.sendmail("app1@example.org", ["carol@example.net"], message("two")) == {}
    assert [(r.rcpt_tos, r.content) for r in smarthost.received] == [
        (["bob@example.net"], message("one")),
        (["carol@example.net"], message("two")),
    ]
    # One upstream login for both: the second message reused the upstream session.
    assert smarthost.auth_attempts == ["PLAIN"]


def test_rset_then_new_transaction(proxy: Proxy, pki: PKI, smarthost: Smarthost) -> None:
    with client(proxy, pki) as smtp:
        smtp.ehlo()
        assert smtp.mail("first@example.org") == (250, b"2.1.0 OK")
        assert smtp.rcpt("dropped@example.net")[0] == 250
        assert smtp.rset() == (250, b"2.0.0 Reset state")
        assert smtp.sendmail("app1@example.org", ["bob@example.net"], message("after rset")) == {}
    [got] = smarthost.received
    assert got.mail_from == "app1@example.org"
    assert got.rcpt_tos == ["bob@example.net"]
    assert got.content == message("after rset")


# -- 7. pipelining ----------------------------------------------------------------------------


def test_pipelined_transaction_replies_in_order(proxy: Proxy, pki: PKI, smarthost: Smarthost) -> None:
    smarthost.rcpt_replies["nobody@example.net"] = "550 5.1.1 <nobody@example.net>: Recipient address rejected"
    raw = Client(proxy.tls_port, tls=pki.client_context())
    try:
        assert raw.greeting.startswith(b"220 ")
        ehlo = raw.command(b"EHLO pipeliner.example")
        assert b"250-PIPELINING\r\n" in ehlo
        assert raw.command(auth_plain()) == b"235 2.7.0 Authentication successful\r\n"
        raw.send(
            b"MAIL FROM:<app1@example.org>\r\n"
            b"RCPT TO:<bob@example.net>\r\n"
            b"RCPT TO:<nobody@example.net>\r\n"
            b"RCPT TO:<carol@example.net>\r\n"
            b"DATA\r\n"
        )
        assert raw.reply() == b"250 2.1.0 OK\r\n"
        assert raw.reply() == b"250 2.1.5 OK\r\n"
        assert raw.reply() == b"550 5.1.1 <nobody@example.net>: Recipient address rejected\r\n"
        assert raw.reply() == b"250 2.1.5 OK\r\n"
        assert raw.reply().startswith(b"354 ")
        # The body, its end and the next commands in one packet too.
        raw.send(stuffed(MESSAGE) + b".\r\nNOOP\r\nQUIT\r\n")
        assert raw.reply() == b"250 2.0.0 Ok: queued as TEST1\r\n"
        assert raw.reply() == b"250 2.0.0 OK\r\n"
        assert raw.reply() == b"221 2.0.0 relay.test Bye\r\n"
    finally:
        raw.close()
    [got] = smarthost.received
    assert got.rcpt_tos == ["bob@example.net", "carol@example.net"]
    assert got.content == MESSAGE


# -- 9. swaks ---------------------------------------------------------------------------------


def swaks(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("swaks")
    if path is None:
        pytest.fail("swaks is not installed: install it (apt-get install swaks; .ci/run does) to run this test")
    return subprocess.run(
        [path, "--server", *args, "--auth-user", CLIENT_USER, "--auth-password", CLIENT_PASSWORD,
         "--from", "app1@example.org", "--to", "bob@example.net", "--timeout", "20"],
        capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize(
    "options",
    [
        ["--tls", "--auth", "PLAIN", "--pipeline"],
        ["--tls", "--auth", "LOGIN", "--pipeline"],
        ["--tls", "--auth", "LOGIN"],
        ["--tls-on-connect", "--auth", "PLAIN", "--pipeline"],
    ],
    ids=["starttls-plain-pipeline", "starttls-login-pipeline", "starttls-login", "implicit-plain-pipeline"],
)
def test_swaks(proxy: Proxy, smarthost: Smarthost, options: list[str]) -> None:
    port = proxy.tls_port if "--tls-on-connect" in options else proxy.port
    done = swaks(f"127.0.0.1:{port}", *options)
    assert done.returncode == 0, done.stdout + done.stderr
    [got] = smarthost.received
    assert got.mail_from == "app1@example.org"
    assert got.rcpt_tos == ["bob@example.net"]
    assert b"\r\nSubject: test " in got.content


# -- 12. line ends inside the body --------------------------------------------------------------


def plain_session(proxy: Proxy) -> Client:
    """Greeted, EHLO'd and authenticated on the loopback plaintext listener."""
    raw = Client(proxy.plain_port)
    assert raw.greeting.startswith(b"220 ")
    assert raw.command(b"EHLO client.example").startswith(b"250-relay.test\r\n")
    assert raw.command(auth_plain()) == b"235 2.7.0 Authentication successful\r\n"
    return raw


def send_body(raw: Client, body: bytes) -> bytes:
    assert raw.command(b"MAIL FROM:<app1@example.org>") == b"250 2.0.0 OK\r\n"
    assert raw.command(b"RCPT TO:<bob@example.net>") == b"250 2.0.0 OK\r\n"
    assert raw.command(b"DATA") == b"354 go ahead\r\n"
    raw.send(body + b".\r\n")
    return raw.reply()


@pytest.mark.parametrize(
    "body, forwarded",
    [
        (b"a\rb\nc\r\n", b"a\r\nb\r\nc\r\n"),
        (b"bare\r\rcr\n\nlf\r\n", b"bare\r\n\r\ncr\r\n\r\nlf\r\n"),
        (b"a\n.\nb\r\n", b"a\r\n..\r\nb\r\n"),
        (b"a\r.\rb\r\n", b"a\r\n..\r\nb\r\n"),
        # Smuggling attempts: an end of data that is not CRLF "." CRLF is a line with a dot.
        (b"a\n.\r\nMAIL FROM:<evil@example.com>\r\n", b"a\r\n..\r\nMAIL FROM:<evil@example.com>\r\n"),
        # After a real CRLF the dot is the client's stuffing (RFC 5321 4.5.2) and goes; the bare LF
        # after it becomes an empty line, never an end of data.
        (b"a\r\n.\nMAIL FROM:<evil@example.com>\r\n", b"a\r\n\r\nMAIL FROM:<evil@example.com>\r\n"),
        (b"a\r.\r\nRCPT TO:<evil@example.com>\r\n", b"a\r\n..\r\nRCPT TO:<evil@example.com>\r\n"),
        (b"a\r\n..\r\nb\r\n", b"a\r\n..\r\nb\r\n"),
    ],
    ids=["bare-cr-lf", "doubled", "lf-dot-lf", "cr-dot-cr", "lf-dot-crlf", "crlf-dot-lf", "cr-dot-crlf", "stuffed"],
)
def test_body_line_ends_normalised_and_dots_stuffed(
    upstream_proxy: Proxy, upstream: ScriptedUpstream, body: bytes, forwarded: bytes
) -> None:
    raw = plain_session(upstream_proxy)
    try:
        assert send_body(raw, body) == b"250 2.0.0 Ok: queued as REC1\r\n"
        assert raw.command(b"QUIT").startswith(b"221 ")
    finally:
        raw.close()
    assert upstream.bodies == [forwarded]
    assert [c for c in upstream.commands if c.upper().startswith(b"MAIL")] == [b"MAIL FROM:<app1@example.org>"]
    assert [c for c in upstream.commands if c.upper().startswith(b"RCPT")] == [b"RCPT TO:<bob@example.net>"]
    assert upstream.data.count(b"\r\n.\r\n") == 1


# -- STARTTLS forgets what came before ----------------------------------------------------------


def test_starttls_forgets_authentication(make_proxy: ProxyFactory, upstream: ScriptedUpstream, pki: PKI) -> None:
    port = free_port()
    make_proxy(
        upstream.toml(),
        extra=f'[[listener]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\ntls = "starttls"\nallow_plaintext_auth = true\n',
    )
    wait_listening(port)
    raw = Client(port)
    try:
        assert raw.greeting.startswith(b"220 ")
        assert b"250 AUTH PLAIN LOGIN\r\n" in raw.command(b"EHLO x")
        assert raw.command(auth_plain()) == b"235 2.7.0 Authentication successful\r\n"
        # The MAIL is plaintext that arrived with STARTTLS: it must be dropped, not run after TLS
        # with the login that came before TLS.
        raw.send(b"STARTTLS\r\nMAIL FROM:<app1@example.org>\r\n")
        assert raw.reply() == b"220 2.0.0 Ready to start TLS\r\n"
        raw.starttls(pki.client_context())
        ehlo = raw.command(b"EHLO x")
        assert ehlo.startswith(b"250-relay.test\r\n")
        assert b"AUTH PLAIN LOGIN" in ehlo
        assert b"STARTTLS" not in ehlo
        assert raw.command(b"MAIL FROM:<app1@example.org>") == b"530 5.7.0 Authentication required\r\n"
        assert raw.command(auth_plain()) == b"235 2.7.0 Authentication successful\r\n"
        assert raw.command(b"MAIL FROM:<app1@example.org>") == b"250 2.0.0 OK\r\n"
    finally:
        raw.close()
    wait_for(lambda: upstream.closed == len(upstream.sessions) == 1)
    assert [c for c in upstream.commands if c.startswith(b"MAIL")] == [b"MAIL FROM:<app1@example.org>"]
