"""The in-memory server dialogues that need code: log events, memory bounds, many inputs, a slow upstream.

Everything dialogue-shaped is a transcript in tests/dialogues/ (run by test_dialogues.py). These use
the same proxy in memory (tests/dialogue.py: SMTPServerProtocol, the relay and the real SMTPUpstream
with a scripted upstream server) and the same transcript runner.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from dialogue import USERS, Dialogue, MemoryUpstream, plain, split_replies, standard_respond, status
from transcript import run, sent

from relayproxy.config import LimitsConfig
from relayproxy.smtp.commands import MAX_COMMAND_LINE

PIPELINED = Path(__file__).parent / "dialogues" / "pipelined-transaction.smtp"
TRANSACTION = sent(PIPELINED)
"""Everything the client of pipelined-transaction.smtp sends, in one piece: two messages and more."""


@pytest.fixture
def e() -> Dialogue:
    """After EHLO."""
    dialogue = Dialogue()
    assert status(dialogue.replies()[0])[0] == 220
    assert dialogue.ehlo().code == 250
    return dialogue


def auth_failure_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [ev for ev in events if ev.get("relayproxy_event") == "auth failed"]


# -- AUTH: what is counted and logged ----------------------------------------------------------


def test_auth_failure_counted_and_logged_once(e: Dialogue, events: list[dict[str, Any]]) -> None:
    """One failed login is one failure and one log line (fail2ban counts the lines)."""
    assert e.command("AUTH PLAIN " + plain("alice", "wrong")).code == 535
    assert e.protocol.relay is not None and e.protocol.relay.machine._auth_failures == 1
    failures = auth_failure_events(events)
    fields = [ev["relayproxy_fields"] for ev in failures]
    assert len(fields) == 1, fields
    assert fields[0]["reason"] == "bad credentials"


def test_authzid_failure_logged_once(e: Dialogue, events: list[dict[str, Any]]) -> None:
    assert e.command("AUTH PLAIN " + plain("alice", USERS["alice"], authzid="bob")).code == 535
    assert len(auth_failure_events(events)) == 1
    assert e.protocol.relay is not None and e.protocol.relay.machine._auth_failures == 1


def test_password_not_logged(e: Dialogue, events: list[dict[str, Any]]) -> None:
    e.command("AUTH PLAIN " + plain("alice", "Sekr1t-guess"))
    e.command("AUTH PLAIN " + plain("alice", USERS["alice"]))
    for ev in events:
        assert "Sekr1t-guess" not in repr(ev) and USERS["alice"] not in repr(ev)


# -- line length and memory ---------------------------------------------------------------------


@pytest.mark.parametrize("tail", [[b"\r\n"], [b"\r", b"\n"], [b"x\r", b"\nNOOP\r\n"]])
def test_100k_without_crlf(e: Dialogue, tail: list[bytes]) -> None:
    assert e.protocol.relay is not None
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
    assert e.protocol.relay is not None
    e.send(b"A" * 100_000)
    assert e.protocol.relay.machine.buffered <= MAX_COMMAND_LINE
    e.send(b"\r\nNOOP\r\n")
    assert [status(r) for r in e.replies()] == [(500, "5.5.2"), (250, "2.0.0")]


def test_many_lines_in_one_piece(e: Dialogue) -> None:
    e.send(b"NOOP\r\n" * 1000)
    replies = e.replies()
    assert len(replies) == 1000 and all(r.code == 250 for r in replies)


def test_too_many_long_lines(e: Dialogue) -> None:
    limit = LimitsConfig().max_invalid_commands
    e.send((b"x" * 600 + b"\r\n") * limit)
    assert [r.code for r in e.replies()] == [500] * limit + [421]
    assert e.closed


# -- pipelining ---------------------------------------------------------------------------------


def test_pipelined_random_splits() -> None:
    """pipelined-transaction.smtp in 50 more random splits, in pieces of up to 40 bytes."""
    for seed in range(2920, 2970):
        run(PIPELINED, f"random-{seed}", max_piece=40)


REFUSED_GROUP = (
    b"EHLO client.test\r\nAUTH PLAIN " + plain("alice", USERS["alice"]).encode() + b"\r\n"
    b"MAIL FROM:<refused@example.com>\r\nRCPT TO:<bob@example.net>\r\nRCPT TO:<@bad:route@example.net>\r\n"
    b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<carol@example.net>\r\nDATA\r\n.\r\nNOOP\r\n"
)


def refusing(line: bytes) -> bytes | None:
    """A smarthost that refuses one sender and, as RFC 2920 servers do, what follows it."""
    if line.startswith(b"MAIL FROM:<refused@"):
        return b"550 5.7.1 Sender refused\r\n"
    return standard_respond(line)


@pytest.mark.parametrize("upstream", [{}, {"unreachable": True}], ids=["refused", "unreachable"])
def test_failed_mail_replies_do_not_depend_on_splits(upstream: dict[str, Any]) -> None:
    """A MAIL that fails (the upstream refuses it, or cannot be reached) takes its pipelined group
    down with it the same way however the client's bytes were split."""
    def replies(pieces: list[bytes]) -> bytes:
        return run_pipelined(pieces, MemoryUpstream(respond=refusing, **upstream))[0]

    whole = replies([REFUSED_GROUP])
    codes = [reply.code for reply in split_replies(whole)]
    if upstream:
        assert codes[3:] == [451, 503, 503, 451, 503, 503, 500, 250]
    else:
        assert codes[3:] == [550, 503, 503, 250, 250, 354, 250, 250]
    assert replies([REFUSED_GROUP[i : i + 1] for i in range(len(REFUSED_GROUP))]) == whole
    for seed in range(20):
        rng = random.Random(seed)
        pieces, i = [], 0
        while i < len(REFUSED_GROUP):
            n = rng.randint(1, 30)
            pieces.append(REFUSED_GROUP[i : i + n])
            i += n
        assert replies(pieces) == whole, [len(piece) for piece in pieces]


def run_pipelined(pieces: list[bytes], upstream: MemoryUpstream | None = None) -> tuple[bytes, Dialogue]:
    d = Dialogue(upstream=upstream)
    for piece in pieces:
        d.send(piece)
    return d.output(), d


# -- a slow upstream ----------------------------------------------------------------------------


def test_slow_upstream_bytewise() -> None:
    """The upstream answers only now and then while the client's pipelined bytes trickle in."""
    expected, whole = run_pipelined([TRANSACTION])
    d = Dialogue(upstream=MemoryUpstream(respond=standard_respond, hold=True))
    for i in range(len(TRANSACTION)):
        d.send(TRANSACTION[i : i + 1])
        if i % 7 == 0:
            d.upstream.answer_all()
    d.upstream.answer_all()
    assert d.output() == expected
    ((connection,), (reference,)) = d.upstream.connections, whole.upstream.connections
    assert connection.messages == reference.messages and len(connection.messages) == 2
    assert connection.commands == reference.commands


def test_reading_pauses_while_upstream_is_slow() -> None:
    d = Dialogue(upstream=MemoryUpstream(respond=standard_respond, hold=True))
    d.output()
    d.ehlo()
    d.login()
    d.send(b"MAIL FROM:<alice@example.com>\r\n")
    assert d.upstream.connections[0].held
    d.send(b"NOOP\r\n" * 12_000)  # 72 KB of pipelined commands
    assert d.transport.producerState == "paused"
    assert d.output() == b""
    d.upstream.answer_all()
    assert d.transport.producerState == "producing"
    replies = split_replies(d.output())
    assert len(replies) == 12_001 and all(r.code == 250 for r in replies)
