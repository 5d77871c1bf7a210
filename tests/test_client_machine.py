"""The pure upstream machines: replies matched to their commands, and the handshake's steps."""

from __future__ import annotations

import base64

import pytest

from relayproxy.smtp.client import (
    ClientSession, Command, Handshake, Login, NeedToken, Ready, Refused, StartTLS, Unfitting, Unsolicited,
)
from relayproxy.smtp.reply import Reply, ReplyError, parse_reply


def r(text: str) -> Reply:
    return parse_reply(text.encode() + b"\r\n")


def replies(session: ClientSession, data: bytes, bytewise: bool = False) -> list[tuple[str, Reply]]:
    found: list[tuple[str, Reply]] = []
    for piece in [data[i : i + 1] for i in range(len(data))] if bytewise else [data]:
        session.feed(piece)
        while (reply := session.next_reply()) is not None:
            found.append(reply)
    return found


@pytest.mark.parametrize("bytewise", [False, True])
def test_replies_come_in_command_order(bytewise: bool) -> None:
    session = ClientSession()
    for step in ("EHLO", "MAIL", "RCPT", "DATA"):
        session.command(step)
    got = replies(session, b"220 hi\r\n250-relay\r\n250 PIPELINING\r\n250 ok\r\n550 no\r\n354 go\r\n", bytewise)
    assert [(step, reply.code) for step, reply in got] == [("greeting", 220), ("EHLO", 250), ("MAIL", 250), ("RCPT", 550), ("DATA", 354)]
    assert got[1][1].lines == ("relay", "PIPELINING")
    assert session.waiting == 0 and not session.partial


def test_a_reply_nobody_asked_for() -> None:
    session = ClientSession()
    session.command("MAIL")
    with pytest.raises(Unsolicited):
        replies(session, b"220 hi\r\n250 ok\r\n250 2.1.5 injected\r\n")


def test_a_partial_reply_nobody_asked_for() -> None:
    session = ClientSession()
    replies(session, b"220 hi\r\n")
    session.feed(b"421-")
    assert session.partial and session.waiting == 0


@pytest.mark.parametrize(
    "step,reply",
    [("end-of-data", "221 2.0.0 closing, not queued"), ("DATA", "250 ok"), ("RCPT", "354 go ahead"), ("MAIL", "235 ok"), ("RSET", "354 x")],
)
def test_a_reply_that_does_not_fit_its_command(step: str, reply: str) -> None:
    session = ClientSession()
    session.command(step)
    with pytest.raises(Unfitting):
        replies(session, b"220 hi\r\n" + reply.encode() + b"\r\n")


@pytest.mark.parametrize("step", ["MAIL", "RCPT", "DATA", "end-of-data", "AUTH", "EHLO"])
def test_every_refusal_fits_every_command(step: str) -> None:
    session = ClientSession()
    session.command(step)
    session.command(step)
    assert [reply.code for _, reply in replies(session, b"220 hi\r\n421 4.3.2 bye\r\n554 5.7.1 no\r\n")] == [220, 421, 554]


def test_an_overlong_reply_line_fails_before_its_end() -> None:
    session = ClientSession()
    with pytest.raises(ReplyError):
        replies(session, b"250 " + b"x" * 600)


def run(handshake: Handshake, answers: list[str]) -> list[object]:
    """Feed ``answers`` in turn; TLS and token steps are taken as they come."""
    steps: list[object] = []
    step = handshake.receive(r(answers.pop(0)))
    while True:
        steps.append(step)
        if isinstance(step, StartTLS):
            step = handshake.secured()
        elif isinstance(step, NeedToken):
            step = handshake.token(f"token{len([s for s in steps if isinstance(s, NeedToken)])}")
        elif isinstance(step, Command) and answers:
            step = handshake.receive(r(answers.pop(0)))
        else:
            return steps


def test_starttls_then_plain() -> None:
    steps = run(
        Handshake("mx:587", b"EHLO relay.test", True, Login("central", "s3cret")),
        ["220 mx", "250-mx\r\n250-STARTTLS\r\n250 AUTH LOGIN", "220 go", "250-mx\r\n250 AUTH PLAIN LOGIN", "235 ok"],
    )
    plain = b"AUTH PLAIN " + base64.b64encode(b"\0central\0s3cret")
    assert steps[:-1] == [
        Command("EHLO", b"EHLO relay.test"), Command("STARTTLS", b"STARTTLS"), StartTLS(), Command("EHLO", b"EHLO relay.test"),
        Command("AUTH", plain),
    ]
    assert isinstance(steps[-1], Ready) and "PLAIN" in steps[-1].extensions["AUTH"]


def test_login_mechanism() -> None:
    steps = run(Handshake("mx:25", b"EHLO r", False, Login("u", "p")), ["220 mx", "250-mx\r\n250 AUTH LOGIN", "334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", "235 ok"])
    assert [s.line for s in steps if isinstance(s, Command)] == [b"EHLO r", b"AUTH LOGIN", b"dQ==", b"cA=="]
    assert isinstance(steps[-1], Ready)


def test_no_starttls_offered_is_never_plaintext() -> None:
    steps = run(Handshake("mx:587", b"EHLO r", True, Login("u", "p")), ["220 mx", "250-mx\r\n250 AUTH PLAIN"])
    assert steps[-1] == Refused("tls", "STARTTLS", "mx:587 does not offer STARTTLS", True)


def test_refusals_say_whether_another_host_may_do_better() -> None:
    temporary = run(Handshake("mx:25", b"EHLO r", False, None), ["421 busy"])[-1]
    permanent = run(Handshake("mx:25", b"EHLO r", False, Login("u", "p")), ["220 mx", "250-mx\r\n250 AUTH PLAIN", "535 5.7.8 no"])[-1]
    assert isinstance(temporary, Refused) and temporary.kind == "unreachable" and temporary.failover
    assert isinstance(permanent, Refused) and permanent.kind == "auth" and not permanent.failover
    assert permanent.detail == "upstream refused the credentials for u: 535 5.7.8 no"


def test_xoauth2_refused_token_is_replaced_once() -> None:
    steps = run(
        Handshake("mx:587", b"EHLO r", False, Login("alerts@example.org")),
        ["220 mx", "250-mx\r\n250 AUTH XOAUTH2", "334 ", "334 eyJzdGF0dXMiOiI0MDEifQ==", "535 5.7.8 bad token",
         "334 ", "235 ok"],
    )
    assert steps[1] == NeedToken()
    assert NeedToken(revoked="token1") in steps
    assert isinstance(steps[-1], Ready)


def test_xoauth2_second_refusal_gives_up() -> None:
    steps = run(
        Handshake("mx:587", b"EHLO r", False, Login("a@example.org")),
        ["220 mx", "250-mx\r\n250 AUTH XOAUTH2", "535 5.7.8 no", "535 5.7.8 still no"],
    )
    last = steps[-1]
    assert isinstance(last, Refused) and last.kind == "auth" and last.revoked == "token2"
