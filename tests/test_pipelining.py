"""Pipelining end to end (RFC 2920), on real sockets: a client's pipelined MAIL, RCPTs and DATA
reach an upstream that offers PIPELINING in one write, one that does not a command at a time, and
through a distant upstream the message costs round trips per group, not per command.

Everything is asserted where a user sees it: the replies the client reads, in order, and the
reads (segments) the upstream received.
"""

from __future__ import annotations

import time

from conftest import ProxyFactory, UpstreamFactory
from harness import Proxy, wait_for
from peers import EHLO_NO_PIPELINING, GO_AHEAD, QUEUED, Action, ScriptedUpstream, expect, ready

from relayproxy.smtp.reply import Catalogue

RECIPIENTS = 10
GROUP = [b"MAIL FROM:<app1@example.org>", *(b"RCPT TO:<r%d@example.net>" % i for i in range(RECIPIENTS)), b"DATA"]
BODY = b"From: app1@example.org\r\nSubject: pipelined\r\n\r\none body, sent once\r\n"
SENDER_OK = b"250 2.1.0 sender ok\r\n"
RECIPIENT_OK = [b"250 2.1.5 r%d ok\r\n" % i for i in range(RECIPIENTS)]
RSET = b"RSET\r\n"
QUIT = b"QUIT\r\n"


def script() -> dict[str, Action]:
    """Each recipient's reply names it, so the client can tell the replies are in order (a fresh
    queue per message)."""
    return {"MAIL": SENDER_OK, "RCPT": list(RECIPIENT_OK)}


def pipelined_message(proxy: Proxy) -> float:
    """One client: MAIL, 10 RCPT and DATA in one write, then the body; the seconds from that write
    to the 250 for the message."""
    c = ready(proxy.plain_port)
    started = time.monotonic()
    c.send_lines(*GROUP)
    # 12 replies, in the order of the commands, each the upstream's own.
    assert c.replies(len(GROUP)) == [SENDER_OK, *RECIPIENT_OK, GO_AHEAD]
    c.send(BODY + b".\r\n")
    assert c.reply() == QUEUED
    elapsed = time.monotonic() - started
    assert c.command(b"QUIT") == expect(Catalogue.closing("relay.test"), b"221 2.0.0")
    c.close()
    return elapsed


def lines(*commands: bytes) -> bytes:
    return b"".join(command + b"\r\n" for command in commands)


def after_ehlo(upstream: ScriptedUpstream, session: int) -> list[bytes]:
    reads = list(upstream.reads[session])
    assert reads[0].startswith(b"EHLO ") and reads[0].endswith(b"\r\n") and reads[0].count(b"\r\n") == 1, reads[0]
    return reads[1:]


def test_a_pipelined_group_reaches_a_pipelining_upstream_in_one_segment(
    make_proxy: ProxyFactory, make_upstream: UpstreamFactory
) -> None:
    upstream = make_upstream(script())
    proxy = make_proxy(upstream.toml())
    pipelined_message(proxy)
    wait_for(lambda: upstream.closed == 1)
    envelope, *body, quit_ = after_ehlo(upstream, 0)
    assert envelope == lines(*GROUP), "the group was split"
    # The body after the 354, once, then the end of the session.
    assert b"".join(body) == BODY + b".\r\n"
    assert quit_ == QUIT
    assert upstream.bodies == [BODY]


def test_a_kept_session_gets_its_rset_in_the_same_segment_as_the_group(
    make_proxy: ProxyFactory, make_upstream: UpstreamFactory
) -> None:
    upstream = make_upstream(script())
    proxy = make_proxy(upstream.toml(pool_size=2))
    pipelined_message(proxy)
    upstream.script.update(script())
    pipelined_message(proxy)  # another client: the kept session owes an RSET
    assert upstream.connections == 1
    reads = after_ehlo(upstream, 0)
    [second_at] = [i for i, read in enumerate(reads) if read.startswith(RSET)]
    (first, *first_body), (second, *second_body) = reads[:second_at], reads[second_at:]
    assert first == lines(*GROUP)
    assert second == RSET + lines(*GROUP), "the RSET or the group took a round trip of its own"
    assert b"".join(first_body) == b"".join(second_body) == BODY + b".\r\n"
    assert upstream.bodies == [BODY, BODY]


def test_without_pipelining_upstream_one_command_per_segment(make_proxy: ProxyFactory, make_upstream: UpstreamFactory) -> None:
    """The client may still pipeline (the proxy offers PIPELINING): the proxy waits for each reply."""
    upstream = make_upstream({**script(), "EHLO": EHLO_NO_PIPELINING})
    proxy = make_proxy(upstream.toml())
    pipelined_message(proxy)
    wait_for(lambda: upstream.closed == 1)
    reads = after_ehlo(upstream, 0)
    assert reads[: len(GROUP)] == [command + b"\r\n" for command in GROUP]
    *body, quit_ = reads[len(GROUP) :]
    assert b"".join(body) == BODY + b".\r\n"
    assert quit_ == QUIT
    assert upstream.bodies == [BODY]


DELAY = 0.05


def test_a_distant_upstream_costs_a_pipelined_message_two_round_trips(
    make_proxy: ProxyFactory, make_upstream: UpstreamFactory
) -> None:
    """Every reply of the upstream comes 50 ms after what it answers. On a kept session the whole
    message is two round trips (RSET and the group; the body and its dot), not one per command."""
    upstream = make_upstream(script(), delay=DELAY)
    proxy = make_proxy(upstream.toml(pool_size=2))
    pipelined_message(proxy)  # opens the session (greeting, EHLO) and leaves it in the pool
    upstream.script.update(script())
    read_before = len(upstream.reads[0])
    elapsed = pipelined_message(proxy)
    assert upstream.connections == 1
    # The message's segments: everything the proxy had to wait on.
    envelope, *body = list(upstream.reads[0])[read_before:]
    assert envelope == RSET + lines(*GROUP)
    assert b"".join(body) == BODY + b".\r\n"
    round_trips = 1 + len(body)
    assert round_trips < 3, f"{round_trips} round trips: {[envelope, *body]}"
    # The clock agrees, loosely: at least the two round trips, and far below one per command
    # (13 x 50 ms without pipelining).
    assert 2 * DELAY <= elapsed < (len(GROUP) + 1) * DELAY, f"{elapsed:.3f}s"
