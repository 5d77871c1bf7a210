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
