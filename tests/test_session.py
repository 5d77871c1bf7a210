"""The pure session machine, without Twisted: bytes in, actions out, answers in."""

from __future__ import annotations

import pytest

from relayproxy.smtp.envelope import Data, Mail, Rcpt
from relayproxy.smtp.reply import Catalogue, Reply
from relayproxy.smtp.session import (
    Abandon, Body, CheckMail, CheckRcpt, CheckThrottle, Close, EndOfData, Forward, Forwarded, Login, Send,
    ServerSession, SessionSettings, StartTLS, State,
)

OK = Reply(250, ("OK",))
GO = Reply(354, ("go ahead",))


def sent(actions: list[object]) -> list[Reply]:
    return [a.reply for a in actions if isinstance(a, Send)]


def logged_in(**settings: object) -> ServerSession:
    session = ServerSession(SessionSettings("relay.test", plaintext_auth=True, **settings))  # type: ignore[arg-type]
    session.greet()
    session.receive(b"EHLO client\r\nAUTH PLAIN AGFsaWNlAHB3\r\n")
    assert isinstance(session.answer(None)[-1], CheckThrottle)  # the user name's turn
    assert isinstance(session.answer(None)[-1], Login)
    assert sent(session.answer(Catalogue.AUTH_OK)) == [Catalogue.AUTH_OK]
    assert session.state is State.AUTHENTICATED
    return session


def checks(session: ServerSession, actions: list[object]) -> list[object]:
    """Answer every policy question with a pass, as far as the machine asks."""
    while actions and isinstance(actions[-1], CheckMail | CheckRcpt):
        actions = actions[:-1] + session.answer(None)
    return actions


def test_a_pipelined_envelope_is_one_forward_with_refusals_in_place() -> None:
    session = logged_in()
    actions = checks(session, session.receive(b"MAIL FROM:<a@x.org>\r\nRCPT TO:<b@x.org>\r\nRCPT TO:<bad\r\nRCPT TO:<c@x.org>\r\nDATA\r\n"))
    assert actions == [Forward((Mail("a@x.org"), Rcpt("b@x.org"), Rcpt("c@x.org"), Data()))]
    replies = session.answer(Forwarded((OK, OK, OK, GO)))
    assert sent(replies) == [OK, OK, Catalogue.BAD_RECIPIENT, OK, GO]
    assert session.state is State.BODY
    [end] = session.receive(b"Subject: x\r\n\r\n..hi\r\n.\r\nNOOP\r\n")
    # The client's dot-stuffing undone and done again for the upstream; NOOP waits for the verdict.
    assert isinstance(end, EndOfData) and end.last == b"Subject: x\r\n\r\n..hi\r\n" and end.fault is None
    assert sent(session.answer(Reply(250, ("queued",)))) == [Reply(250, ("queued",)), Catalogue.OK]


def test_data_goes_last_and_what_follows_waits_for_the_354() -> None:
    session = logged_in()
    actions = checks(session, session.receive(b"MAIL FROM:<a@x.org>\r\nRCPT TO:<b@x.org>\r\nDATA\r\nbody\r\n.\r\n"))
    assert actions == [Forward((Mail("a@x.org"), Rcpt("b@x.org"), Data()))]
    # The upstream refuses DATA: the bytes after it are commands, not a body.
    assert sent(session.answer(Forwarded((OK, OK, Reply(554, ("no",)))))) == [OK, OK, Reply(554, ("no",)), Catalogue.UNRECOGNIZED, Catalogue.UNRECOGNIZED]


def test_a_group_ends_at_the_first_other_command() -> None:
    session = logged_in()
    actions = checks(session, session.receive(b"MAIL FROM:<a@x.org>\r\nRCPT TO:<b@x.org>\r\nNOOP\r\nRCPT TO:<c@x.org>\r\n"))
    assert actions == [Forward((Mail("a@x.org"), Rcpt("b@x.org")))]
    assert checks(session, session.answer(Forwarded((OK, OK))))[:-1] == [Send(OK), Send(OK), Send(Catalogue.OK)]


def test_rset_abandons_the_transaction_upstream() -> None:
    session = logged_in()
    checks(session, session.receive(b"MAIL FROM:<a@x.org>\r\n"))
    session.answer(Forwarded((OK,)))
    assert session.receive(b"RSET\r\n") == [Abandon(), Send(Catalogue.RESET)]
    assert session.state is State.AUTHENTICATED


def test_starttls_drops_what_followed_it_and_forgets_the_hello() -> None:
    session = ServerSession(SessionSettings("relay.test", starttls=True, tls_available=True))
    session.greet()
    session.receive(b"EHLO client\r\n")
    assert session.receive(b"STARTTLS\r\nMAIL FROM:<injected@x.org>\r\n") == [Send(Catalogue.READY_TLS), StartTLS()]
    assert session.state is State.CONNECTED and session.tls
    assert sent(session.receive(b"AUTH PLAIN AGFsaWNlAHB3\r\n")) == [Catalogue.EHLO_FIRST]


@pytest.mark.parametrize("line,reply", [
    (b"A" * 600 + b"\r\n", Catalogue.LINE_TOO_LONG),
    (b"AUTH PLAIN " + b"A" * 600 + b"\r\n", Catalogue.AUTH_LINE_TOO_LONG),
    (b"MAIL FROM:<a@x.org>\r\n", Catalogue.AUTH_REQUIRED),
    (b"NOOP\rRSET\r\n", Catalogue.BARE_LINE_END),
    (b"DATA\r\n", Catalogue.AUTH_REQUIRED),
])
def test_refusals_before_login(line: bytes, reply: Reply) -> None:
    session = ServerSession(SessionSettings("relay.test"))
    session.greet()
    session.receive(b"EHLO client\r\n")
    assert sent(session.receive(line)) == [reply]


def test_bytes_before_the_greeting_end_the_session() -> None:
    session = ServerSession(SessionSettings("relay.test"))
    assert session.receive(b"EHLO early\r\n") == [Send(Catalogue.EARLY_TALKER), Close()]


def test_a_body_fault_aborts_at_once_and_refuses_at_the_end() -> None:
    session = logged_in(max_message_size=10)
    checks(session, session.receive(b"MAIL FROM:<a@x.org>\r\nRCPT TO:<b@x.org>\r\nDATA\r\n"))
    session.answer(Forwarded((OK, OK, GO)))
    first = session.receive(b"0123456789")
    assert [type(a).__name__ for a in first] == ["Body"] and isinstance(first[0], Body)
    assert [type(a).__name__ for a in session.receive(b"0123456789\r\n")] == ["AbortBody"]
    end = session.receive(b".\r\n")
    assert isinstance(end[0], EndOfData) and end[0].fault is not None and end[0].last == b""


# -- SMTPUTF8 (RFC 6531) ----------------------------------------------------------------------


def test_ehlo_offers_smtputf8() -> None:
    session = ServerSession(SessionSettings("relay.test"))
    session.greet()
    [ehlo] = sent(session.receive(b"EHLO client\r\n"))
    assert "SMTPUTF8" in ehlo.lines


def test_smtputf8_mail_and_its_utf8_recipients_go_upstream() -> None:
    session = logged_in()
    line = "MAIL FROM:<j\u00f6rg@b\u00fccher.example> SMTPUTF8\r\nRCPT TO:<\u7528\u6237@\u4f8b\u3048.\u30c6\u30b9\u30c8>\r\n"
    actions = checks(session, session.receive(line.encode("utf-8")))
    mail = Mail("j\u00f6rg@b\u00fccher.example", smtputf8=True)
    assert actions == [Forward((mail, Rcpt("\u7528\u6237@\u4f8b\u3048.\u30c6\u30b9\u30c8")))]


def test_smtputf8_with_an_ascii_sender_still_marks_the_mail() -> None:
    # The header may hold UTF-8 (RFC 6532): only an upstream offering SMTPUTF8 may take it.
    session = logged_in()
    assert checks(session, session.receive(b"MAIL FROM:<a@x.org> SMTPUTF8 BODY=8BITMIME\r\n")) == [
        Forward((Mail("a@x.org", eight_bit=True, smtputf8=True),))
    ]


def test_a_utf8_sender_without_smtputf8_is_553_5_6_7() -> None:
    session = logged_in()
    assert sent(session.receive("MAIL FROM:<j\u00f6rg@example.com>\r\n".encode("utf-8"))) == [Catalogue.NEEDS_SMTPUTF8]
    assert Catalogue.NEEDS_SMTPUTF8.code == 553 and Catalogue.NEEDS_SMTPUTF8.enhanced == "5.6.7"
    assert session.state is State.AUTHENTICATED


def test_a_utf8_recipient_needs_an_smtputf8_transaction() -> None:
    session = logged_in()
    line = "MAIL FROM:<a@x.org>\r\nRCPT TO:<user@b\u00fccher.example>\r\nRCPT TO:<b@x.org>\r\n"
    actions = checks(session, session.receive(line.encode("utf-8")))
    assert actions == [Forward((Mail("a@x.org"), Rcpt("b@x.org")))]
    assert sent(session.answer(Forwarded((OK, OK)))) == [OK, Catalogue.NEEDS_SMTPUTF8, OK]
    # The next transaction says SMTPUTF8: its UTF-8 recipient passes.
    session.receive(b"RSET\r\n")
    actions = checks(session, session.receive("MAIL FROM:<a@x.org> SMTPUTF8\r\nRCPT TO:<user@b\u00fccher.example>\r\n".encode("utf-8")))
    assert actions == [Forward((Mail("a@x.org", smtputf8=True), Rcpt("user@b\u00fccher.example")))]


def test_an_a_label_recipient_is_ascii() -> None:
    session = logged_in()
    actions = checks(session, session.receive(b"MAIL FROM:<a@x.org>\r\nRCPT TO:<user@xn--bcher-kva.example>\r\n"))
    assert actions == [Forward((Mail("a@x.org"), Rcpt("user@xn--bcher-kva.example")))]


def test_smtputf8_takes_no_value() -> None:
    session = logged_in()
    assert sent(session.receive(b"MAIL FROM:<a@x.org> SMTPUTF8=yes\r\n")) == [Catalogue.BAD_PARAMETER_SYNTAX]
