"""SMTPServerProtocol in memory: StringTransport, a task.Clock and a scripted upstream.

Replies carry no enhanced code until the client said EHLO (RFC 2034), so tests that assert one send
EHLO first.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from dialogue import USERS, Dialogue, FakeConnector, b64, ok, plain, split_replies, status

from relayproxy.config import LimitsConfig, ServerConfig, UserConfig
from relayproxy.smtp.commands import MAX_COMMAND_LINE
from relayproxy.smtp.reply import Catalogue, Reply


@pytest.fixture
def d() -> Dialogue:
    dialogue = Dialogue()
    assert status(dialogue.replies()[0])[0] == 220
    return dialogue


@pytest.fixture
def e(d: Dialogue) -> Dialogue:
    """After EHLO."""
    assert d.ehlo().code == 250
    return d


@pytest.fixture
def relay() -> Dialogue:
    """Logged in as alice, with a scripted upstream."""
    dialogue = Dialogue(connector=FakeConnector())
    dialogue.output()
    dialogue.ehlo()
    dialogue.login()
    return dialogue


def auth_failure_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [ev for ev in events if ev.get("relayproxy_event") == "auth failed"]


# -- greeting, EHLO, HELO -----------------------------------------------------------------------


def test_greeting() -> None:
    d = Dialogue()
    assert d.output() == b"220 relay.test ESMTP relayproxy\r\n"
    assert not d.closed


def test_ehlo_features_plaintext_listener(d: Dialogue) -> None:
    reply = d.ehlo()
    assert reply.code == 250
    assert reply.lines[0] == "relay.test"
    features = reply.lines[1:]
    assert "PIPELINING" in features
    assert "8BITMIME" in features
    assert "ENHANCEDSTATUSCODES" in features
    assert f"SIZE {ServerConfig('x').max_message_size}" in features
    assert "AUTH PLAIN LOGIN" in features
    assert "STARTTLS" not in features


def test_ehlo_without_argument(d: Dialogue) -> None:
    assert d.command("EHLO").code == 501
    assert d.command("HELO").code == 501


def test_ehlo_after_login_has_no_auth(relay: Dialogue) -> None:
    reply = relay.ehlo()
    assert not any(line.startswith("AUTH") for line in reply.lines)


def test_helo(d: Dialogue) -> None:
    d.send(b"HELO client.test\r\n")
    assert d.output() == b"250 relay.test\r\n"
    d.send(b"NOOP\r\n")
    assert d.output() == b"250 2.0.0 OK\r\n"


def test_enhanced_codes_before_ehlo(d: Dialogue) -> None:
    d.send(b"XYZZY\r\n")
    assert d.output() == b"500 5.5.1 Command unrecognized\r\n"


# -- STARTTLS listener without TLS ----------------------------------------------------------------


@pytest.fixture
def starttls() -> Dialogue:
    dialogue = Dialogue(tls="starttls", allow_plaintext_auth=False)
    dialogue.output()
    return dialogue


def test_starttls_listener_ehlo(starttls: Dialogue) -> None:
    features = starttls.ehlo().lines[1:]
    assert "STARTTLS" in features
    assert not any(f.startswith("AUTH") for f in features)


def test_auth_before_tls_is_538(starttls: Dialogue) -> None:
    starttls.ehlo()
    for line in ("AUTH PLAIN " + plain("alice", USERS["alice"]), "AUTH LOGIN", "AUTH PLAIN"):
        assert status(starttls.command(line)) == (538, "5.7.11")
    assert starttls.protocol.relay.user is None


def test_starttls_without_certificate(starttls: Dialogue) -> None:
    starttls.ehlo()
    assert status(starttls.command("STARTTLS")) == (502, "5.5.1")


def test_starttls_on_plaintext_listener(e: Dialogue) -> None:
    assert status(e.command("STARTTLS")) == (502, "5.5.1")
    assert status(e.command("STARTTLS now")) == (501, "5.5.2")


def test_allow_plaintext_auth_on_starttls_listener() -> None:
    d = Dialogue(tls="starttls", allow_plaintext_auth=True)
    d.output()
    assert "AUTH PLAIN LOGIN" in d.ehlo().lines
    d.login()


# -- simple commands ----------------------------------------------------------------------------


def test_unknown_command(e: Dialogue) -> None:
    assert status(e.command("XYZZY")) == (500, "5.5.1")
    assert status(e.command("")) == (500, "5.5.1")


def test_noop_rset_vrfy_help_expn(e: Dialogue) -> None:
    assert status(e.command("NOOP")) == (250, "2.0.0")
    assert status(e.command("NOOP with argument")) == (250, "2.0.0")
    assert status(e.command("RSET")) == (250, "2.0.0")
    assert status(e.command("RSET x")) == (501, "5.5.2")
    assert status(e.command("VRFY alice")) == (252, "2.5.0")
    assert status(e.command("HELP")) == (214, "2.0.0")
    assert status(e.command("EXPN list")) == (502, "5.5.1")


def test_quit(e: Dialogue) -> None:
    assert status(e.command("QUIT")) == (221, "2.0.0")
    assert e.closed
    e.send(b"NOOP\r\n")
    assert e.output() == b""


def test_quit_drops_pipelined_rest(e: Dialogue) -> None:
    e.send(b"QUIT\r\nNOOP\r\nNOOP\r\n")
    replies = e.replies()
    assert [r.code for r in replies] == [221]
    assert e.closed


def test_bare_lf_in_command(e: Dialogue) -> None:
    e.send(b"NOOP\nRSET\r\n")
    replies = e.replies()
    assert [status(r) for r in replies] == [(501, "5.5.2")]
    assert status(e.command("NOOP")) == (250, "2.0.0")


def test_non_ascii_command(e: Dialogue) -> None:
    assert status(e.command("NOOP \u00e9".encode())) == (501, "5.5.2")


# -- authentication required --------------------------------------------------------------------


def test_mail_before_auth(e: Dialogue) -> None:
    assert status(e.command("MAIL FROM:<alice@example.com>")) == (530, "5.7.0")


def test_rcpt_before_mail_without_auth(e: Dialogue) -> None:
    assert status(e.command("RCPT TO:<bob@example.com>")) == (530, "5.7.0")


def test_data_before_auth(e: Dialogue) -> None:
    assert status(e.command("DATA")) == (530, "5.7.0")


def test_rcpt_before_mail_after_auth(relay: Dialogue) -> None:
    assert status(relay.command("RCPT TO:<bob@example.com>")) == (503, "5.5.1")
    assert status(relay.command("DATA")) == (503, "5.5.1")


# -- AUTH ---------------------------------------------------------------------------------------


def test_auth_before_ehlo(d: Dialogue) -> None:
    assert d.command("AUTH PLAIN " + plain("alice", USERS["alice"])).code == 503


def test_auth_without_mechanism(e: Dialogue) -> None:
    assert status(e.command("AUTH")) == (501, "5.5.2")
    assert status(e.command("AUTH ")) == (501, "5.5.2")


def test_auth_unknown_mechanism(e: Dialogue) -> None:
    assert status(e.command("AUTH CRAM-MD5")) == (504, "5.5.4")
    assert status(e.command("AUTH XOAUTH2 abc")) == (504, "5.5.4")


def test_auth_plain_initial_response(e: Dialogue) -> None:
    assert status(e.command("AUTH PLAIN " + plain("alice", USERS["alice"]))) == (235, "2.7.0")
    assert e.protocol.relay.user is not None and e.protocol.relay.user.name == "alice"


def test_auth_plain_lowercase_mechanism(e: Dialogue) -> None:
    assert e.command("auth plain " + plain("alice", USERS["alice"])).code == 235


def test_auth_plain_without_initial_response(e: Dialogue) -> None:
    e.send(b"AUTH PLAIN\r\n")
    assert e.output() == b"334 \r\n"
    assert status(e.command(plain("bob", USERS["bob"]))) == (235, "2.7.0")
    assert e.protocol.relay.user is not None and e.protocol.relay.user.name == "bob"


def test_auth_plain_own_authzid(e: Dialogue) -> None:
    assert e.command("AUTH PLAIN " + plain("alice", USERS["alice"], authzid="alice")).code == 235


def test_auth_plain_other_authzid(e: Dialogue) -> None:
    assert status(e.command("AUTH PLAIN " + plain("alice", USERS["alice"], authzid="bob"))) == (535, "5.7.8")
    assert e.protocol.relay.user is None


def test_auth_login(e: Dialogue) -> None:
    e.send(b"AUTH LOGIN\r\n")
    assert e.output() == b"334 VXNlcm5hbWU6\r\n"
    e.send(b64("alice").encode() + b"\r\n")
    assert e.output() == b"334 UGFzc3dvcmQ6\r\n"
    assert status(e.command(b64(USERS["alice"]))) == (235, "2.7.0")


def test_auth_login_with_initial_response(e: Dialogue) -> None:
    e.send(f"AUTH LOGIN {b64('alice')}\r\n".encode())
    assert e.output() == b"334 UGFzc3dvcmQ6\r\n"
    assert e.command(b64(USERS["alice"])).code == 235


def test_auth_login_pipelined_whole(e: Dialogue) -> None:
    e.send(f"AUTH LOGIN\r\n{b64('alice')}\r\n{b64(USERS['alice'])}\r\nNOOP\r\n".encode())
    assert [r.code for r in e.replies()] == [334, 334, 235, 250]


@pytest.mark.parametrize("prompt", ["PLAIN", "LOGIN user", "LOGIN password"])
def test_auth_cancel(e: Dialogue, prompt: str) -> None:
    if prompt == "PLAIN":
        e.send(b"AUTH PLAIN\r\n")
    else:
        e.send(b"AUTH LOGIN\r\n")
        if prompt == "LOGIN password":
            e.send(b64("alice").encode() + b"\r\n")
    assert all(r.code == 334 for r in e.replies())
    assert status(e.command("*")) == (501, "5.5.2")
    assert e.protocol.relay.user is None
    # The session goes on and AUTH can be tried again.
    assert e.command("AUTH PLAIN " + plain("alice", USERS["alice"])).code == 235


def test_auth_bad_base64(e: Dialogue) -> None:
    assert status(e.command("AUTH PLAIN not-base64!")) == (501, "5.5.2")
    e.send(b"AUTH PLAIN\r\n")
    e.output()
    assert status(e.command("%%%")) == (501, "5.5.2")
    assert status(e.command("NOOP")) == (250, "2.0.0")


def test_auth_non_ascii_response(e: Dialogue) -> None:
    e.send(b"AUTH PLAIN\r\n")
    e.output()
    assert status(e.command("\u00e9\u00e9\u00e9\u00e9".encode())) == (501, "5.5.2")


def test_auth_malformed_plain(e: Dialogue) -> None:
    assert status(e.command("AUTH PLAIN " + b64("alice\x00wonderland"))) == (501, "5.5.2")


@pytest.mark.parametrize(
    "line",
    [
        "AUTH PLAIN " + plain("alice", "wrong"),
        "AUTH PLAIN " + plain("mallory", "wonderland"),
        "AUTH PLAIN " + plain("alice", USERS["bob"]),
    ],
)
def test_auth_wrong_credentials(e: Dialogue, line: str) -> None:
    assert status(e.command(line)) == (535, "5.7.8")
    assert e.protocol.relay.user is None
    assert status(e.command("MAIL FROM:<alice@example.com>")) == (530, "5.7.0")


def test_auth_login_wrong_password(e: Dialogue) -> None:
    e.send(f"AUTH LOGIN {b64('alice')}\r\n".encode())
    e.output()
    assert status(e.command(b64("nope"))) == (535, "5.7.8")


def test_auth_failure_counted_and_logged_once(e: Dialogue, events: list[dict[str, Any]]) -> None:
    """One failed login is one failure and one log line (fail2ban counts the lines)."""
    assert e.command("AUTH PLAIN " + plain("alice", "wrong")).code == 535
    assert e.protocol.relay.machine._auth_failures == 1
    failures = auth_failure_events(events)
    fields = [ev["relayproxy_fields"] for ev in failures]
    assert len(fields) == 1, fields
    assert fields[0]["reason"] == "bad credentials"  # type: ignore[index]


def test_authzid_failure_logged_once(e: Dialogue, events: list[dict[str, Any]]) -> None:
    assert e.command("AUTH PLAIN " + plain("alice", USERS["alice"], authzid="bob")).code == 535
    assert len(auth_failure_events(events)) == 1
    assert e.protocol.relay.machine._auth_failures == 1


def test_password_not_logged(e: Dialogue, events: list[dict[str, Any]]) -> None:
    e.command("AUTH PLAIN " + plain("alice", "Sekr1t-guess"))
    e.command("AUTH PLAIN " + plain("alice", USERS["alice"]))
    for ev in events:
        assert "Sekr1t-guess" not in repr(ev) and USERS["alice"] not in repr(ev)


def test_second_auth(e: Dialogue) -> None:
    e.login()
    assert status(e.command("AUTH PLAIN " + plain("bob", USERS["bob"]))) == (503, "5.5.1")
    assert e.protocol.relay.user is not None and e.protocol.relay.user.name == "alice"


def test_auth_line_too_long_at_prompt(e: Dialogue) -> None:
    e.send(b"AUTH PLAIN\r\n")
    e.output()
    assert status(e.command(b"A" * 600)) == (500, "5.5.6")
    assert status(e.command("NOOP")) == (250, "2.0.0")


# -- line length and memory ---------------------------------------------------------------------


def test_600_octet_line(e: Dialogue) -> None:
    assert status(e.command(b"NOOP " + b"x" * 595)) == (500, "5.5.2")
    assert status(e.command("NOOP")) == (250, "2.0.0")


def test_longest_allowed_line(e: Dialogue) -> None:
    line = b"NOOP " + b"x" * (MAX_COMMAND_LINE - 2 - 5)
    assert len(line) + 2 == MAX_COMMAND_LINE
    assert e.command(line).code == 250
    assert status(e.command(line + b"x")) == (500, "5.5.2")


@pytest.mark.parametrize("length", [MAX_COMMAND_LINE - 2, MAX_COMMAND_LINE - 1, MAX_COMMAND_LINE, 600])
def test_line_limit_bytewise(e: Dialogue, length: int) -> None:
    line = b"NOOP " + b"x" * (length - 5) + b"\r\n"
    for i in range(len(line)):
        e.send(line[i : i + 1])
    replies = e.replies()
    assert len(replies) == 1
    assert replies[0].code == (250 if length <= MAX_COMMAND_LINE - 2 else 500)


@pytest.mark.parametrize("tail", [[b"\r\n"], [b"\r", b"\n"], [b"x\r", b"\nNOOP\r\n"]])
def test_100k_without_crlf(e: Dialogue, tail: list[bytes]) -> None:
    for _ in range(100):
        e.send(b"A" * 1024)
        assert e.protocol.relay.machine.buffered <= MAX_COMMAND_LINE
        assert e.output() == b""
    for piece in tail:
        e.send(piece)
    replies = e.replies()
    assert status(replies[0]) == (500, "5.5.2")
    assert [r.code for r in replies[1:]] == ([250] if b"NOOP\r\n" in tail[-1] else [])
    assert status(e.command("NOOP")) == (250, "2.0.0")


def test_100k_in_one_piece(e: Dialogue) -> None:
    e.send(b"A" * 100_000)
    assert e.protocol.relay.machine.buffered <= MAX_COMMAND_LINE
    e.send(b"\r\nNOOP\r\n")
    assert [status(r) for r in e.replies()] == [(500, "5.5.2"), (250, "2.0.0")]


def test_many_lines_in_one_piece(e: Dialogue) -> None:
    e.send(b"NOOP\r\n" * 1000)
    replies = e.replies()
    assert len(replies) == 1000 and all(r.code == 250 for r in replies)


# -- timeouts -----------------------------------------------------------------------------------


def test_idle_timeout(e: Dialogue) -> None:
    e.clock.advance(299)
    assert e.output() == b"" and not e.closed
    e.clock.advance(1)
    assert [status(r) for r in e.replies()] == [(421, "4.4.2")]
    assert e.closed


def test_idle_timeout_before_ehlo(d: Dialogue) -> None:
    d.clock.advance(300)
    assert d.output() == b"421 4.4.2 relay.test Timeout, closing connection\r\n"
    assert d.closed


def test_activity_resets_idle_timer(e: Dialogue) -> None:
    for _ in range(5):
        e.clock.advance(200)
        assert e.command("NOOP").code == 250
    assert not e.closed
    e.clock.advance(300)
    assert e.closed


def test_partial_line_counts_as_activity(e: Dialogue) -> None:
    e.clock.advance(250)
    e.send(b"NO")
    e.clock.advance(250)
    assert not e.closed
    e.send(b"OP\r\n")
    assert e.replies()[0].code == 250


def test_timeout_at_auth_prompt(e: Dialogue) -> None:
    e.send(b"AUTH LOGIN\r\n")
    e.output()
    e.clock.advance(300)
    assert [status(r) for r in e.replies()] == [(421, "4.4.2")]
    assert e.closed


def test_custom_timeout() -> None:
    d = Dialogue(limits=LimitsConfig(command_timeout=10))
    d.output()
    d.clock.advance(10)
    assert d.closed


def test_no_timer_left_after_close(e: Dialogue) -> None:
    e.command("QUIT")
    e.protocol.connectionLost()
    assert e.clock.getDelayedCalls() == []


def test_no_timer_left_after_timeout(e: Dialogue) -> None:
    e.clock.advance(300)
    e.protocol.connectionLost()
    assert e.clock.getDelayedCalls() == []


# -- pipelining ---------------------------------------------------------------------------------

TRANSACTION = (
    b"EHLO client.test\r\n"
    + b"AUTH PLAIN " + plain("alice", USERS["alice"]).encode() + b"\r\n"
    + b"MAIL FROM:<alice@example.com> SIZE=100\r\n"
    + b"RCPT TO:<bob@example.net>\r\n"
    + b"RCPT TO:<carol@example.net>\r\n"
    + b"DATA\r\n"
    + b"Subject: test\r\n\r\n..dot line\r\nsmuggle\n.\nMAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\nbare\rcr\r\n.\r\n"
    + b"MAIL FROM:<alice@example.com>\r\n"
    + b"RCPT TO:<dave@example.net>\r\n"
    + b"DATA\r\n"
    + b".\r\n"
    + b"RSET\r\nNOOP\r\nVRFY x\r\nXYZZY\r\nQUIT\r\n"
)


def run_pipelined(pieces: list[bytes]) -> tuple[bytes, FakeConnector]:
    connector = FakeConnector()
    d = Dialogue(connector=connector)
    for piece in pieces:
        d.send(piece)
    return d.output(), connector


def test_pipelined_transaction() -> None:
    output, connector = run_pipelined([TRANSACTION])
    codes = [r.code for r in split_replies(output)]
    assert codes == [220, 250, 235, 250, 250, 250, 354, 250, 250, 250, 354, 250, 250, 250, 252, 500, 221]
    (session,) = connector.sessions
    assert session.commands == [
        b"MAIL FROM:<alice@example.com> SIZE=100",
        b"RCPT TO:<bob@example.net>",
        b"RCPT TO:<carol@example.net>",
        b"DATA",
        b"MAIL FROM:<alice@example.com>",
        b"RCPT TO:<dave@example.net>",
        b"DATA",
    ]
    assert session.messages == [
        b"Subject: test\r\n\r\n..dot line\r\nsmuggle\r\n..\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\nbare\r\ncr\r\n.\r\n",
        b".\r\n",
    ]


def test_pipelined_whole_vs_bytewise() -> None:
    whole, c1 = run_pipelined([TRANSACTION])
    bytewise, c2 = run_pipelined([TRANSACTION[i : i + 1] for i in range(len(TRANSACTION))])
    assert bytewise == whole
    assert c2.sessions[0].messages == c1.sessions[0].messages
    assert c2.sessions[0].commands == c1.sessions[0].commands


def test_pipelined_random_splits() -> None:
    whole, c1 = run_pipelined([TRANSACTION])
    rng = random.Random(2920)
    for _ in range(50):
        pieces, i = [], 0
        while i < len(TRANSACTION):
            n = rng.randint(1, 40)
            pieces.append(TRANSACTION[i : i + n])
            i += n
        output, connector = run_pipelined(pieces)
        assert output == whole, [len(p) for p in pieces]
        assert connector.sessions[0].messages == c1.sessions[0].messages


# -- transactions with a scripted upstream ------------------------------------------------------


def test_transaction(relay: Dialogue) -> None:
    assert status(relay.command("MAIL FROM:<alice@example.com>")) == (250, "OK")
    assert relay.command("RCPT TO:<bob@example.net>").code == 250
    assert relay.command("DATA").code == 354
    relay.send(b"Hello\r\n.\r\n")
    assert relay.replies()[0].code == 250
    session = relay.connector.sessions[0]  # type: ignore[union-attr]
    assert session.messages == [b"Hello\r\n.\r\n"]


def test_nested_mail(relay: Dialogue) -> None:
    relay.command("MAIL FROM:<alice@example.com>")
    assert status(relay.command("MAIL FROM:<alice@example.com>")) == (503, "5.5.1")


def test_auth_during_transaction(relay: Dialogue) -> None:
    relay.command("MAIL FROM:<alice@example.com>")
    assert relay.command("AUTH PLAIN " + plain("bob", USERS["bob"])).code == 503


def test_data_without_recipients(relay: Dialogue) -> None:
    relay.command("MAIL FROM:<alice@example.com>")
    assert relay.command("DATA").to_bytes() == Catalogue.RCPT_FIRST.to_bytes()


def test_auth_parameter_not_forwarded(relay: Dialogue) -> None:
    assert relay.command("MAIL FROM:<alice@example.com> AUTH=<someone@else> BODY=8BITMIME").code == 250
    assert relay.connector.sessions[0].commands == [b"MAIL FROM:<alice@example.com> BODY=8BITMIME"]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "params,expected",
    [("SIZE=abc", (501, "5.5.4")), ("SIZE=999999999999", (552, "5.3.4")), ("BODY=BINARYMIME", (501, "5.5.4")), ("RET=HDRS", (555, "5.5.4"))],
)
def test_mail_parameters_refused(relay: Dialogue, params: str, expected: tuple[int, str]) -> None:
    assert status(relay.command(f"MAIL FROM:<alice@example.com> {params}")) == expected
    assert relay.connector.sessions == []  # type: ignore[union-attr]


def test_rcpt_parameters_refused(relay: Dialogue) -> None:
    relay.command("MAIL FROM:<alice@example.com>")
    assert status(relay.command("RCPT TO:<bob@example.net> NOTIFY=NEVER")) == (555, "5.5.4")


def test_sender_not_owned() -> None:
    d = Dialogue(connector=FakeConnector(), users={"alice": UserConfig("alice", allowed_senders=("alice@example.com",))})
    d.output()
    d.ehlo()
    d.login()
    assert status(d.command("MAIL FROM:<mallory@example.com>")) == (553, "5.7.1")
    assert status(d.command("MAIL FROM:<>")) == (553, "5.7.1")
    assert d.command("MAIL FROM:<Alice@Example.com>").code == 250


def test_open_relay_probe_addresses(relay: Dialogue) -> None:
    relay.command("MAIL FROM:<alice@example.com>")
    for address in ("@a.example:b@c.example", "user@d.example@other.example", "host!user"):
        assert status(relay.command(f"RCPT TO:<{address}>")) == (501, "5.1.3")
    assert relay.connector.sessions[0].commands == [b"MAIL FROM:<alice@example.com>"]  # type: ignore[union-attr]


def test_upstream_refuses_recipient() -> None:
    def script(line: bytes) -> Reply:
        if line.startswith(b"RCPT"):
            return Reply(550, ("5.1.1 no such user",))
        return ok(354, "go") if line == b"DATA" else ok()

    d = Dialogue(connector=FakeConnector(script=script))
    d.output()
    d.ehlo()
    d.login()
    d.command("MAIL FROM:<alice@example.com>")
    d.send(b"RCPT TO:<nobody@example.net>\r\n")
    # Relayed as the upstream sent it.
    assert d.output() == b"550 5.1.1 no such user\r\n"
    assert status(d.command("DATA")) == (554, "5.5.1")


@pytest.mark.parametrize(
    "body,expected",
    [
        (b"nul\x00here\r\n", (554, "5.6.0")),
        (b"x" * 1200 + b"\r\n", (554, "5.6.0")),
    ],
)
def test_body_faults(relay: Dialogue, body: bytes, expected: tuple[int, str]) -> None:
    relay.command("MAIL FROM:<alice@example.com>")
    relay.command("RCPT TO:<bob@example.net>")
    assert relay.command("DATA").code == 354
    relay.send(body + b"MAIL FROM:<evil@x>\r\n.\r\nNOOP\r\n")
    assert [status(r) for r in relay.replies()] == [expected, (250, "2.0.0")]
    session = relay.connector.sessions[0]  # type: ignore[union-attr]
    assert session.aborted and session.messages == []


def test_message_too_big() -> None:
    d = Dialogue(connector=FakeConnector(), server=ServerConfig("relay.test", max_message_size=100))
    d.output()
    d.ehlo()
    d.login()
    d.command("MAIL FROM:<alice@example.com>")
    d.command("RCPT TO:<bob@example.net>")
    d.command("DATA")
    d.send((b"y" * 60 + b"\r\n") * 3 + b".\r\n")
    assert [status(r) for r in d.replies()] == [(552, "5.3.4")]


def test_data_timeout(relay: Dialogue) -> None:
    relay.command("MAIL FROM:<alice@example.com>")
    relay.command("RCPT TO:<bob@example.net>")
    relay.command("DATA")
    relay.send(b"partial body\r\n")
    relay.clock.advance(LimitsConfig().data_timeout)
    assert [status(r) for r in relay.replies()] == [(421, "4.4.2")]
    assert relay.closed
    session = relay.connector.sessions[0]  # type: ignore[union-attr]
    assert session.aborted and session.messages == []


def test_rset_during_transaction(relay: Dialogue) -> None:
    relay.command("MAIL FROM:<alice@example.com>")
    assert status(relay.command("RSET")) == (250, "2.0.0")
    assert relay.connector.sessions[0].commands[-1] == b"RSET"  # type: ignore[union-attr]
    assert relay.command("MAIL FROM:<alice@example.com>").code == 250


# -- abuse controls -----------------------------------------------------------------------------


def test_too_many_auth_failures_in_one_session(e: Dialogue) -> None:
    limit = LimitsConfig().max_auth_failures_per_session
    for _ in range(limit - 1):
        assert status(e.command("AUTH PLAIN " + plain("alice", "wrong"))) == (535, "5.7.8")
    e.send(("AUTH PLAIN " + plain("alice", "wrong") + "\r\n").encode())
    assert [status(r) for r in e.replies()] == [(535, "5.7.8"), (421, "4.7.0")]
    assert e.closed


def test_auth_throttle_across_sessions() -> None:
    from relayproxy.limits import AuthThrottle, ConnectionCounter
    from twisted.internet.task import Clock

    limits = LimitsConfig()
    clock = Clock()
    throttle, connections = AuthThrottle(clock, limits), ConnectionCounter(limits)
    failures = 0
    session = None
    while failures < limits.auth_failures_per_ip:
        if session is None or session.closed:
            if session is not None:
                session.protocol.connectionLost()
            session = Dialogue(clock=clock, throttle=throttle, connections=connections)
            session.output()
            session.ehlo()
        session.send(("AUTH PLAIN " + plain("alice", f"guess{failures}") + "\r\n").encode())
        assert session.replies()[0].code == 535
        failures += 1
    assert session is not None
    if session.closed:
        session.protocol.connectionLost()
        session = Dialogue(clock=clock, throttle=throttle, connections=connections)
        session.output()
        session.ehlo()
    # Blocked now, even with the right password, before any password is checked.
    assert status(session.command("AUTH PLAIN " + plain("alice", USERS["alice"]))) == (454, "4.7.0")
    clock.advance(limits.auth_backoff)
    session.ehlo()
    assert session.command("AUTH PLAIN " + plain("alice", USERS["alice"])).code == 235


def test_early_talker() -> None:
    d = Dialogue(limits=LimitsConfig(greeting_delay=5))
    assert d.output() == b""
    d.send(b"EHLO bot.test\r\n")
    assert [r.code for r in d.replies()] == [554]
    assert d.closed


def test_greeting_delay() -> None:
    d = Dialogue(limits=LimitsConfig(greeting_delay=5))
    d.clock.advance(4.9)
    assert d.output() == b""
    d.clock.advance(0.1)
    assert d.replies()[0].code == 220
    assert d.ehlo().code == 250


def test_too_many_invalid_commands(e: Dialogue) -> None:
    limit = LimitsConfig().max_invalid_commands
    e.send(b"XYZZY\r\n" * (limit - 1))
    assert [r.code for r in e.replies()] == [500] * (limit - 1)
    assert status(e.command("NOOP")) == (250, "2.0.0")  # a good command starts the count over
    e.send(b"XYZZY\r\n" * limit + b"NOOP\r\n")
    replies = e.replies()
    assert [r.code for r in replies] == [500] * limit + [421]
    assert status(replies[-1]) == (421, "4.7.0")
    assert e.closed


def test_too_many_long_lines(e: Dialogue) -> None:
    limit = LimitsConfig().max_invalid_commands
    e.send((b"x" * 600 + b"\r\n") * limit)
    assert [r.code for r in e.replies()] == [500] * limit + [421]
    assert e.closed


def test_connection_limit_per_ip() -> None:
    from relayproxy.limits import ConnectionCounter
    from twisted.internet.task import Clock

    limits = LimitsConfig(max_connections_per_ip=2)
    clock, connections = Clock(), ConnectionCounter(limits)
    first = Dialogue(limits=limits, clock=clock, connections=connections)
    Dialogue(limits=limits, clock=clock, connections=connections)
    third = Dialogue(limits=limits, clock=clock, connections=connections)
    assert [status(r)[0] for r in third.replies()] == [421]
    assert third.closed
    third.protocol.connectionLost()  # a refused session does not free someone else's slot
    fourth = Dialogue(limits=limits, clock=clock, connections=connections)
    assert [status(r)[0] for r in fourth.replies()] == [421]
    other_ip = Dialogue(limits=limits, clock=clock, connections=connections, peer="192.0.2.99")
    assert other_ip.replies()[0].code == 220
    first.protocol.connectionLost()
    again = Dialogue(limits=limits, clock=clock, connections=connections)
    assert again.replies()[0].code == 220


def test_session_timeout() -> None:
    d = Dialogue(limits=LimitsConfig(session_timeout=100))
    d.output()
    d.ehlo()
    for _ in range(3):
        d.clock.advance(45)
        if d.closed:
            break
        d.command("NOOP")
    assert d.closed
    assert status(d.replies()[-1]) == (421, "4.4.2")


# -- STARTTLS (the handshake itself is the e2e tests' business) ---------------------------------


@pytest.fixture
def tls() -> Dialogue:
    dialogue = Dialogue(tls="starttls", allow_plaintext_auth=False, tls_options=object())
    dialogue.output()
    dialogue.ehlo()
    return dialogue


def test_starttls(tls: Dialogue) -> None:
    assert status(tls.command("STARTTLS")) == (220, "2.0.0")
    assert tls.transport.tls_started is not None
    # Everything from before TLS is forgotten: EHLO again first.
    assert tls.command("AUTH PLAIN " + plain("alice", USERS["alice"])).code == 503
    features = tls.ehlo().lines[1:]
    assert "STARTTLS" not in features and "AUTH PLAIN LOGIN" in features
    tls.login()
    assert status(tls.command("STARTTLS")) == (503, "5.5.1")


def test_starttls_drops_pipelined_plaintext(tls: Dialogue) -> None:
    """CVE-2011-0411: commands sent with STARTTLS in plaintext must not run after the handshake."""
    tls.send(b"STARTTLS\r\nAUTH PLAIN " + plain("alice", USERS["alice"]).encode() + b"\r\nNOOP\r\n")
    assert [r.code for r in tls.replies()] == [220]
    assert tls.protocol.relay.user is None
    assert tls.ehlo().code == 250


def test_starttls_forgets_login() -> None:
    d = Dialogue(tls="starttls", allow_plaintext_auth=True, tls_options=object())
    d.output()
    d.ehlo()
    d.login()
    assert d.command("STARTTLS").code == 220
    assert d.protocol.relay.user is None
    d.ehlo()
    assert status(d.command("MAIL FROM:<alice@example.com>")) == (530, "5.7.0")


# -- a slow upstream ----------------------------------------------------------------------------


def drain(d: Dialogue, connector: FakeConnector) -> None:
    """Answer the upstream's pending commands one at a time, oldest first."""
    while connector.sessions and connector.sessions[0].pending:
        connector.sessions[0].answer_next()


def test_pipelined_with_slow_upstream() -> None:
    expected, _ = run_pipelined([TRANSACTION])
    connector = FakeConnector(delayed=True)
    d = Dialogue(connector=connector)
    d.send(TRANSACTION)
    # Nothing after MAIL is answered until the upstream answers MAIL.
    assert [r.code for r in split_replies(d.transport.value())] == [220, 250, 235]
    drain(d, connector)
    assert d.output() == expected
    assert connector.sessions[0].messages[0].startswith(b"Subject: test\r\n")


def test_slow_upstream_bytewise() -> None:
    expected, _ = run_pipelined([TRANSACTION])
    connector = FakeConnector(delayed=True)
    d = Dialogue(connector=connector)
    for i in range(len(TRANSACTION)):
        d.send(TRANSACTION[i : i + 1])
        if i % 7 == 0:
            drain(d, connector)
    drain(d, connector)
    assert d.output() == expected


def test_reading_pauses_while_upstream_is_slow() -> None:
    connector = FakeConnector(delayed=True)
    d = Dialogue(connector=connector)
    d.output()
    d.ehlo()
    d.login()
    d.send(b"MAIL FROM:<alice@example.com>\r\n")
    assert connector.sessions[0].pending
    d.send(b"NOOP\r\n" * 12_000)  # 72 KB of pipelined commands
    assert d.transport.producerState == "paused"
    assert d.output() == b""
    drain(d, connector)
    assert d.transport.producerState == "producing"
    replies = d.replies()
    assert len(replies) == 12_001 and all(r.code == 250 for r in replies)


def test_idle_timer_stops_while_upstream_works() -> None:
    connector = FakeConnector(delayed=True)
    d = Dialogue(connector=connector)
    d.output()
    d.ehlo()
    d.login()
    d.send(b"MAIL FROM:<alice@example.com>\r\n")
    d.clock.advance(LimitsConfig().command_timeout + 1)
    assert not d.closed
    drain(d, connector)
    assert d.replies()[0].code == 250
    d.clock.advance(LimitsConfig().command_timeout)
    assert d.closed
