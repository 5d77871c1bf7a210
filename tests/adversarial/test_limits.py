"""Abuse limits: connection floods, early talkers, junk commands, idle clients, size and recipient
limits, and commands that must never reach the upstream."""

from __future__ import annotations

import time

from harness import Proxy, wait_for
from peers import Client, ScriptedUpstream, expect, ready
from relayproxy.smtp.reply import Catalogue

from .support import Launch, read_wire

OK = expect(Catalogue.OK, b"250 2.0.0")
GREETING = Catalogue.greeting("relay.test").to_bytes()
QUEUED = b"250 2.0.0 Ok: queued as REC1\r\n"


def test_connections_over_per_ip_limit(launch: Launch, upstream: ScriptedUpstream) -> None:
    """Attack: connection flood from one address past max_connections_per_ip."""
    proxy = launch(upstream.toml(), limits="max_connections_per_ip = 3")
    held = [Client(proxy.plain_port, source="127.0.0.2") for _ in range(3)]
    assert [c.greeting for c in held] == [GREETING] * 3
    refusals = []
    for _ in range(3):
        extra = Client(proxy.plain_port, source="127.0.0.2")
        refusals.append(extra.greeting)
        assert extra.greeting.startswith(b"421 ")
        assert extra.wait_closed() == b""
        extra.close()
    # Other addresses are not affected.
    other = Client(proxy.plain_port, source="127.0.0.1")
    assert other.greeting == GREETING
    other.close()
    # A slot freed is a slot available again.
    held.pop().close()

    def admitted() -> bool:
        c = Client(proxy.plain_port, source="127.0.0.2")
        c.close()
        return c.greeting == GREETING

    wait_for(admitted)
    for c in held:
        assert c.command(b"NOOP") == expect(Catalogue.OK, b"250 2.0.0")
        c.close()
    # Last, the exact reply the issue specifies (with its enhanced code, though no EHLO came yet).
    assert refusals == [expect(Catalogue.too_many_connections("relay.test"), b"421 4.7.0")] * 3


def test_early_talker(launch: Launch, upstream: ScriptedUpstream) -> None:
    """Attack: a spambot that talks before the greeting (greeting_delay > 0)."""
    proxy = launch(upstream.toml(), limits="greeting_delay = 1")
    c = Client(proxy.plain_port, read_greeting=False)
    c.send(b"EHLO bot.example\r\nMAIL FROM:<a@b.example>\r\n")
    refusal = c.reply()
    assert refusal.startswith(b"554 "), "no 220 (or anything else) may come first"
    assert c.wait_closed() == b""
    c.close()
    # A patient client gets the greeting after the delay.
    start = time.monotonic()
    patient = Client(proxy.plain_port)
    assert patient.greeting == GREETING
    assert time.monotonic() - start >= 0.9
    patient.close()
    # Last, the exact reply the issue specifies (with its enhanced code, though no EHLO came yet).
    assert refusal == expect(Catalogue.EARLY_TALKER, b"554 5.5.0")


def test_twenty_unknown_commands(upstream_proxy: Proxy) -> None:
    """Attack: junk commands in a row (protocol fuzzing, HTTP to the SMTP port)."""
    c = Client(upstream_proxy.plain_port)
    c.ehlo()
    unknown = expect(Catalogue.UNRECOGNIZED, b"500 5.5.1")
    for i in range(19):
        assert c.command(b"XYZZY%d" % i) == unknown
    assert c.command(b"GET / HTTP/1.1") == unknown
    assert c.reply() == expect(Catalogue.TOO_MANY_ERRORS, b"421 4.7.0")
    assert c.wait_closed() == b""
    c.close()


def test_unknown_commands_count_resets_on_valid_command(upstream_proxy: Proxy) -> None:
    """Attack surface: the invalid-command limit counts in a row, so a working client is not cut off."""
    c = Client(upstream_proxy.plain_port)
    c.ehlo()
    unknown = expect(Catalogue.UNRECOGNIZED, b"500 5.5.1")
    for _ in range(3):
        for _ in range(19):
            assert c.command(b"XYZZY") == unknown
        assert c.command(b"NOOP") == OK
    c.close()


def test_idle_client_times_out(launch: Launch, upstream: ScriptedUpstream) -> None:
    """Attack: a client that connects and goes quiet (slot exhaustion)."""
    proxy = launch(upstream.toml(), limits="command_timeout = 1")
    c = Client(proxy.plain_port)
    c.ehlo()
    start = time.monotonic()
    assert c.reply() == expect(Catalogue.timeout("relay.test"), b"421 4.4.2")
    assert 0.9 <= time.monotonic() - start < 5
    assert c.wait_closed() == b""
    c.close()


def test_idle_client_mid_data_times_out_without_delivery(launch: Launch, upstream: ScriptedUpstream) -> None:
    """Attack: a client that stops mid-body (slowloris); the partial message must not be delivered."""
    proxy = launch(upstream.toml(), limits="data_timeout = 1")
    c = ready(proxy.plain_port)
    c.envelope()
    assert c.command(b"DATA") == b"354 go ahead\r\n"
    c.send(b"Subject: partial\r\n\r\nhalf a message\r\n")
    assert c.reply() == expect(Catalogue.timeout("relay.test"), b"421 4.4.2")
    assert c.wait_closed() == b""
    c.close()
    wait_for(lambda: upstream.closed >= 1)
    assert read_wire(upstream.data).bodies == []


def test_mail_size_parameter_over_limit(launch: Launch, upstream: ScriptedUpstream) -> None:
    """Attack: MAIL FROM with SIZE= above max_message_size."""
    proxy = launch(upstream.toml(), server="max_message_size = 10000")
    c = Client(proxy.plain_port)
    assert b"250-SIZE 10000\r\n" in c.ehlo()
    c.login()
    too_big = expect(Catalogue.MESSAGE_TOO_BIG, b"552 5.3.4")
    assert c.command(b"MAIL FROM:<app1@example.org> SIZE=10001") == too_big
    assert c.command(b"MAIL FROM:<app1@example.org> SIZE=99999999999999999999999999") == too_big
    c.close()
    assert upstream.sessions == []


def test_body_over_max_message_size(launch: Launch, upstream: ScriptedUpstream) -> None:
    """Attack: a body over max_message_size (declared small, or not declared at all)."""
    proxy = launch(upstream.toml(), server="max_message_size = 10000")
    c = ready(proxy.plain_port)
    assert c.command(b"MAIL FROM:<app1@example.org> SIZE=500") == b"250 2.0.0 OK\r\n"
    assert c.command(b"RCPT TO:<bob@example.net>") == b"250 2.0.0 OK\r\n"
    assert c.command(b"DATA") == b"354 go ahead\r\n"
    c.send(b"Subject: big\r\n\r\n" + (b"z" * 78 + b"\r\n") * 250 + b".\r\n")
    assert c.reply() == expect(Catalogue.MESSAGE_TOO_BIG, b"552 5.3.4")
    assert c.command(b"NOOP") == OK
    c.close()
    wait_for(lambda: upstream.closed >= 1)
    wire = read_wire(upstream.data)
    assert wire.bodies == [], "the upstream saw a final dot for an over-size message"


def test_too_many_recipients(launch: Launch, upstream: ScriptedUpstream) -> None:
    """Attack: more RCPT than max_recipients (spam fan-out)."""
    proxy = launch(upstream.toml(), server="max_recipients = 3")
    c = ready(proxy.plain_port)
    assert c.command(b"MAIL FROM:<app1@example.org>") == b"250 2.0.0 OK\r\n"
    for i in range(3):
        assert c.command(b"RCPT TO:<r%d@example.net>" % i) == b"250 2.0.0 OK\r\n"
    too_many = expect(Catalogue.TOO_MANY_RECIPIENTS, b"452 4.5.3")
    assert c.command(b"RCPT TO:<r3@example.net>") == too_many
    assert c.command(b"RCPT TO:<r4@example.net>") == too_many
    assert c.command(b"DATA") == b"354 go ahead\r\n"
    assert c.command(b"Subject: three\r\n\r\nhi\r\n.") == QUEUED
    assert c.command(b"QUIT") == expect(Catalogue.closing("relay.test"), b"221 2.0.0")
    c.close()
    wait_for(lambda: upstream.closed >= 1)
    wire = read_wire(upstream.data)
    assert [cmd for cmd in wire.commands if cmd.startswith(b"RCPT")] == [b"RCPT TO:<r%d@example.net>" % i for i in range(3)]
    assert len(wire.bodies) == 1


def test_mail_auth_parameter_not_passed_upstream(upstream: ScriptedUpstream, upstream_proxy: Proxy) -> None:
    """Attack: MAIL FROM with AUTH=<someone> to make the next hop believe another identity (RFC 4954 5)."""
    c = ready(upstream_proxy.plain_port)
    assert c.command(b"MAIL FROM:<app1@example.org> AUTH=<ceo@example.org>") == b"250 2.0.0 OK\r\n"
    assert c.command(b"RSET") == expect(Catalogue.RESET, b"250 2.0.0")
    assert c.command(b"MAIL FROM:<app1@example.org> SIZE=500 AUTH=<>") == b"250 2.0.0 OK\r\n"
    assert c.command(b"QUIT") == expect(Catalogue.closing("relay.test"), b"221 2.0.0")
    c.close()
    wait_for(lambda: upstream.closed >= 1)
    wire = read_wire(upstream.data)
    assert wire.commands[1:] == [
        b"MAIL FROM:<app1@example.org>",
        b"RSET",
        b"MAIL FROM:<app1@example.org> SIZE=500",
        b"RSET",
        b"QUIT",
    ]  # QUIT in an open transaction: the upstream's transaction is reset, then the connection closed politely
    assert b"AUTH" not in upstream.data


def test_vrfy_expn_etrn_xclient_answered_locally(upstream: ScriptedUpstream, upstream_proxy: Proxy) -> None:
    """Attack: address harvesting and MTA control commands (VRFY, EXPN, ETRN, XCLIENT) passed upstream."""
    c = ready(upstream_proxy.plain_port)
    probes = {
        b"VRFY postmaster": expect(Catalogue.VRFY, b"252 2.5.0"),
        b"EXPN staff": expect(Catalogue.NOT_IMPLEMENTED, b"502 5.5.1"),
        b"ETRN other.example": expect(Catalogue.UNRECOGNIZED, b"500 5.5.1"),
        b"XCLIENT ADDR=10.0.0.1 LOGIN=ceo": expect(Catalogue.UNRECOGNIZED, b"500 5.5.1"),
        b"XFORWARD ADDR=10.0.0.1": expect(Catalogue.UNRECOGNIZED, b"500 5.5.1"),
    }
    for line, reply in probes.items():
        assert c.command(line) == reply
    # Also inside a transaction, when an upstream session is open.
    assert c.command(b"MAIL FROM:<app1@example.org>") == b"250 2.0.0 OK\r\n"
    for line, reply in probes.items():
        assert c.command(line) == reply
    assert c.command(b"QUIT") == expect(Catalogue.closing("relay.test"), b"221 2.0.0")
    c.close()
    wait_for(lambda: upstream.closed >= 1)
    assert read_wire(upstream.data).commands[1:] == [b"MAIL FROM:<app1@example.org>", b"RSET", b"QUIT"]
