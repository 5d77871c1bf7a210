"""An upstream reply that does not fit its command means the upstream is broken: the client gets a
4xx from the Catalogue (never a 2xx other than the upstream's 250 for a message, never 354 unless
the upstream said 354 to DATA), the message is logged outcome=failed, and the session is not reused."""

from __future__ import annotations

import pytest
from conftest import ProxyFactory, UpstreamFactory
from harness import wait_for
from peers import ScriptedUpstream, expect, ready
from relayproxy.smtp.reply import Catalogue

BAD_REPLY = expect(Catalogue.UPSTREAM_BAD_REPLY, b"451 4.4.0")
LOST = expect(Catalogue.UPSTREAM_LOST, b"451 4.4.2")
BODY = b"Subject: fit\r\n\r\nhello\r\n.\r\n"


def message(port: int) -> list[bytes]:
    c = ready(port)
    replies = [c.command(b"MAIL FROM:<app1@example.org>"), c.command(b"RCPT TO:<bob@example.net>"), c.command(b"DATA")]
    if replies[-1].startswith(b"354"):
        c.send(BODY)
        replies.append(c.reply())
    c.command(b"QUIT")
    c.close()
    return replies


def pooled(make_proxy: ProxyFactory, upstream: ScriptedUpstream) -> int:
    return make_proxy(upstream.toml(pool_size=4)).plain_port


def test_221_after_the_final_dot_is_no_verdict(make_proxy: ProxyFactory, make_upstream: UpstreamFactory, log_lines: list[str]) -> None:
    upstream = make_upstream({"DATA-END": [b"221 2.0.0 closing, not queued\r\n", b"250 2.0.0 queued as OK2\r\n"]})
    port = pooled(make_proxy, upstream)
    assert message(port)[-1] == BAD_REPLY
    [line] = [line for line in log_lines if line.startswith("message ")]
    assert "outcome=failed" in line
    # The broken session is never used again: the next message dials anew.
    assert message(port)[-1] == b"250 2.0.0 queued as OK2\r\n"
    assert upstream.connections == 2


def test_250_to_data_never_starts_a_body(make_proxy: ProxyFactory, make_upstream: UpstreamFactory) -> None:
    upstream = make_upstream({"DATA": [b"250 2.0.0 ok\r\n", b"354 go ahead\r\n"]})
    port = pooled(make_proxy, upstream)
    assert message(port) == [b"250 2.0.0 OK\r\n", b"250 2.0.0 OK\r\n", BAD_REPLY]
    assert upstream.final_dots == 0
    assert message(port)[-1].startswith(b"250 ")
    assert upstream.connections == 2


def test_354_to_rcpt_is_not_relayed(make_proxy: ProxyFactory, make_upstream: UpstreamFactory) -> None:
    upstream = make_upstream({"RCPT": b"354 go ahead\r\n"})
    port = pooled(make_proxy, upstream)
    assert message(port) == [b"250 2.0.0 OK\r\n", BAD_REPLY, LOST]
    wait_for(lambda: upstream.closed == 1)
    assert upstream.final_dots == 0


@pytest.mark.parametrize("reply", [b"235 2.7.0 ok\r\n", b"354 go ahead\r\n", b"221 bye\r\n"])
def test_an_unfitting_reply_to_mail(make_proxy: ProxyFactory, make_upstream: UpstreamFactory, reply: bytes) -> None:
    upstream = make_upstream({"MAIL": reply})
    port = pooled(make_proxy, upstream)
    assert message(port)[0] == BAD_REPLY
    assert upstream.final_dots == 0
