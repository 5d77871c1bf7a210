"""Smuggling and framing: the upstream must find exactly the ends of data the client really sent.

The upstream is the ScriptedUpstream of tests/peers.py; assertions are on the exact bytes it
received, read the way a strict RFC 5321 server reads them (``read_wire``) and the way a lenient
one would.
"""

from __future__ import annotations

import re

import pytest
from harness import PKI, Proxy, Smarthost, wait_for
from peers import Client, Closed, ScriptedUpstream, expect, ready

from relayproxy.smtp.reply import Catalogue

from .support import RssMonitor, read_wire

CARRIER = b"From: app1@example.org\r\nTo: bob@example.net\r\nSubject: carrier\r\n\r\ncarrier body"
HIDDEN = (
    b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@target.example>\r\nDATA\r\n"
    b"From: ceo@example.org\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n"
)
QUEUED = b"250 2.0.0 Ok: queued as REC1\r\n"
OK = expect(Catalogue.OK, b"250 2.0.0")
EXPECTED_COMMANDS = [b"MAIL FROM:<app1@example.org>", b"RCPT TO:<bob@example.net>", b"DATA"]

LOOKALIKES = [
    b"\n.\n", b"\n.\r\n", b"\r.\n", b"\r.\r\n", b"\r.\r", b"\n.\r",
    b"\r\n.\n", b"\r\n.\r", b"\r\n.\r\r\n", b"\r\r\n.\r\r\n",
]
NUL_LOOKALIKES = [b"\r\n\x00.\r\n", b"\r\n.\x00\r\n"]


def relayed(client_body: bytes) -> bytes:
    """What a correct proxy sends for ``client_body`` (the bytes between DATA's 354 and the final
    ".\\r\\n"): undo the client's dot-stuffing per CRLF line, turn bare CR and bare LF into line
    ends, and dot-stuff every line again."""
    assert client_body.endswith(b"\r\n")
    lines: list[bytes] = []
    for line in client_body[:-2].split(b"\r\n"):
        if line.startswith(b"."):
            line = line[1:]
        lines.extend(re.split(rb"\r|\n", line))
    return b"".join((b"." + l if l.startswith(b".") else l) + b"\r\n" for l in lines)


def assert_no_bare_line_ends(data: bytes) -> None:
    assert re.search(rb"\r(?!\n)", data) is None, "the upstream received a bare CR"
    assert re.search(rb"(?<!\r)\n", data) is None, "the upstream received a bare LF"


def send_message(proxy: Proxy, body: bytes) -> tuple[Client, bytes]:
    """MAIL, RCPT, DATA on the plaintext listener, then ``body`` and the real end of data."""
    c = ready(proxy.plain_port)
    c.envelope()
    assert c.command(b"DATA") == b"354 go ahead\r\n"
    c.send(body + b".\r\n")
    return c, c.reply()


@pytest.mark.parametrize("lookalike", LOOKALIKES, ids=lambda b: b.decode().replace("\r", "CR").replace("\n", "LF"))
def test_end_of_data_lookalike_does_not_smuggle(upstream: ScriptedUpstream, upstream_proxy: Proxy, lookalike: bytes) -> None:
    """Attack: SMTP smuggling - an end-of-data lookalike inside the body followed by a hidden MAIL/RCPT/DATA."""
    client_body = CARRIER + lookalike + HIDDEN
    c, reply = send_message(upstream_proxy, client_body)
    assert reply == QUEUED
    assert c.command(b"QUIT") == expect(Catalogue.closing("relay.test"), b"221 2.0.0")
    c.close()
    wait_for(lambda: upstream.closed >= 1)

    data = upstream.data
    wire = read_wire(data)
    assert wire.commands[0].startswith(b"EHLO ")
    assert wire.commands[1:] == EXPECTED_COMMANDS + [b"QUIT"], "the upstream saw more than one transaction"
    assert wire.bodies == [relayed(client_body)]
    assert wire.unterminated is None
    assert_no_bare_line_ends(data)
    # A lenient reader (any of CR, LF, CRLF ends a line) finds one lone dot too: the real one.
    assert re.split(rb"\r\n|\r|\n", data).count(b".") == 1


@pytest.mark.parametrize("lookalike", NUL_LOOKALIKES, ids=["CRLF-NUL-dot-CRLF", "CRLF-dot-NUL-CRLF"])
def test_nul_end_of_data_lookalike_is_refused(upstream: ScriptedUpstream, upstream_proxy: Proxy, lookalike: bytes) -> None:
    """Attack: SMTP smuggling with a NUL next to the dot (parsers that drop NULs see CRLF.CRLF)."""
    c, reply = send_message(upstream_proxy, CARRIER + lookalike + HIDDEN)
    assert reply == expect(Catalogue.BODY_NUL, b"554 5.6.0")
    assert c.command(b"NOOP") == OK
    c.close()
    wait_for(lambda: upstream.closed >= 1)

    data = upstream.data
    wire = read_wire(data)
    assert wire.commands[1:] == EXPECTED_COMMANDS
    assert wire.bodies == [], "the upstream saw an end of data for a refused message"
    assert b"\r\n.\r\n" not in data
    assert b"evil@attacker.example" not in b"\r\n".join(wire.commands)


def dotty_message() -> tuple[bytes, bytes, list[int]]:
    """A message (unstuffed, as the user wrote it) full of dot lines, one of them starting exactly
    at offset 16 KiB and one at 64 KiB of the dot-stuffed stream; returns (message, stuffed, splits)."""
    head = [b".", b"..", b"...", b"....", b". a line with a leading dot", b""]
    original = b"\r\n".join(head) + b"\r\n"

    def stuffed_len(msg: bytes) -> int:
        return len(re.sub(rb"(?m)^\.", b"..", msg))

    splits = []
    for boundary in (16 * 1024, 64 * 1024):
        gap = boundary - stuffed_len(original)
        # Filler lines of 78 octets plus CRLF, then one shorter line that lands exactly on the boundary.
        while gap > 80 + 4:
            original += b"x" * 78 + b"\r\n"
            gap -= 80
        original += b"y" * (gap - 2) + b"\r\n"
        assert stuffed_len(original) == boundary
        original += b".boundary dot\r\n..\r\n"
        splits += [boundary - 1, boundary, boundary + 1]
    original += b"last line\r\n."  + b"\r\n"
    stuffed = re.sub(rb"(?m)^\.", b"..", original)
    return original, stuffed, splits


def send_split(c: Client, data: bytes, splits: list[int], progress: object = None) -> None:
    start = 0
    for at in [*splits, len(data)]:
        c.send(data[start:at])
        if callable(progress):
            progress(at)
        start = at


def test_dot_lines_and_chunk_boundaries_are_stuffed_on_the_wire(upstream: ScriptedUpstream, upstream_proxy: Proxy) -> None:
    """Attack: dot lines (first line ".", lines of only dots, dots at the 16/64 KiB boundaries) that
    a proxy forgetting to re-stuff, or losing state across reads, turns into an early end of data."""
    original, stuffed, splits = dotty_message()
    c = ready(upstream_proxy.plain_port)
    c.envelope()
    assert c.command(b"DATA") == b"354 go ahead\r\n"
    wait_for(lambda: upstream.data.endswith(b"DATA\r\n"))
    base = len(upstream.data)
    # Each piece really arrives separately: wait until the upstream got it (minus the few bytes a
    # correct proxy holds back while they could still become CRLF "." CRLF).
    send_split(c, stuffed, splits, lambda at: wait_for(lambda: len(upstream.data) - base >= at - 4))
    c.send(b".\r\n")
    assert c.reply() == QUEUED
    c.close()
    wait_for(lambda: upstream.closed >= 1)

    wire = read_wire(upstream.data)
    assert wire.commands[1:] == EXPECTED_COMMANDS + [b"QUIT"]
    # A CRLF-clean, correctly stuffed body goes on exactly as the client sent it.
    assert wire.bodies == [stuffed]


def test_dot_lines_arrive_intact_at_smarthost(proxy: Proxy, pki: PKI, smarthost: Smarthost) -> None:
    """Attack: the same dot lines over implicit TLS (16 KiB records) to aiosmtpd, which unstuffs them."""
    original, stuffed, splits = dotty_message()
    c = ready(proxy.tls_port, tls=pki.client_context())
    c.envelope()
    assert c.command(b"DATA").startswith(b"354 ")
    send_split(c, stuffed + b".\r\n", splits)
    assert c.reply() == b"250 2.0.0 Ok: queued as TEST1\r\n"
    c.close()
    [got] = smarthost.received
    assert got.content == original


def test_long_body_line_then_commands_are_not_executed(upstream: ScriptedUpstream, upstream_proxy: Proxy) -> None:
    """Attack: a 17 KB body line (overflowing a line buffer) followed by lines that look like commands."""
    body = b"Subject: long\r\n\r\n" + b"A" * 17_000 + b"\r\n" + HIDDEN + b"QUIT\r\n"
    c, reply = send_message(upstream_proxy, body)
    assert reply == expect(Catalogue.BODY_LINE_TOO_LONG, b"554 5.6.0")
    assert c.command(b"NOOP") == OK
    c.close()
    wait_for(lambda: upstream.closed >= 1)

    wire = read_wire(upstream.data)
    assert wire.commands[1:] == EXPECTED_COMMANDS, "a line from the body was executed as a command"
    assert wire.bodies == []
    assert b"evil@attacker.example" not in upstream.data.split(b"DATA\r\n", 1)[0]


def test_thirty_megabytes_without_line_end(upstream: ScriptedUpstream, upstream_proxy: Proxy) -> None:
    """Attack: 30 MB body with no line end at all - memory exhaustion, then an end of data."""
    c = ready(upstream_proxy.plain_port)
    c.envelope()
    assert c.command(b"DATA") == b"354 go ahead\r\n"
    chunk = b"A" * 65536
    with RssMonitor() as rss:
        for _ in range(30 * 1024 * 1024 // len(chunk)):
            c.send(chunk)
        c.send(b"\r\n.\r\n")
        try:
            reply: bytes | None = c.reply()
        except Closed:
            reply = None
    assert rss.growth_mib < 20, f"RSS grew by {rss.growth_mib:.1f} MiB"
    # The issue allows a 5xx after the end of data, or a close; the proxy answers:
    assert reply in (None, expect(Catalogue.BODY_LINE_TOO_LONG, b"554 5.6.0"))
    c.close()
    wait_for(lambda: upstream.closed >= 1)
    wire = read_wire(upstream.data)
    assert wire.bodies == [], "the upstream saw a final dot"
    assert len(upstream.data) < 64 * 1024, "the proxy relayed the oversized line"


@pytest.mark.parametrize("bare", [b"\n", b"\r"], ids=["LF", "CR"])
def test_bare_line_end_in_command(upstream: ScriptedUpstream, upstream_proxy: Proxy, bare: bytes) -> None:
    """Attack: two commands in one line joined by a bare CR or LF (for a peer that splits differently)."""
    c = ready(upstream_proxy.plain_port)
    c.send(b"MAIL FROM:<a@b.example>" + bare + b"RCPT TO:<x@y.example>\r\n")
    assert c.reply() == expect(Catalogue.BARE_LINE_END, b"501 5.5.2")
    # Exactly one reply: the next one answers NOOP.
    assert c.command(b"NOOP") == OK
    c.close()
    assert upstream.sessions == [], "something reached the upstream"
