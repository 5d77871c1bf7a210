"""Open relay: without AUTH, every address trick of nmap's smtp-open-relay script is refused with 530."""

from __future__ import annotations

import pytest
from harness import PKI, Proxy
from peers import Client, ScriptedUpstream, expect
from relayproxy.smtp.reply import Catalogue

# The patterns nmap's smtp-open-relay tries, with relay.test the relay and other.example the target.
PATTERNS = {
    "plain": b"user@other.example",
    "percent-hack": b"user%other.example@relay.test",
    "percent-hack-literal": b"user%other.example@[127.0.0.1]",
    "source-route": b"@relay.test:user@other.example",
    "source-route-literal": b"@[127.0.0.1]:user@other.example",
    "quoted-local-part": b'"user@other.example"@relay.test',
    "quoted-local-part-literal": b'"user@other.example"@[127.0.0.1]',
    "quoted-no-domain": b'"user@other.example"',
    "double-at": b"user@other.example@relay.test",
    "double-at-literal": b"user@other.example@[127.0.0.1]",
    "bang-path": b"other.example!user",
    "bang-path-domain": b"other.example!user@relay.test",
    "bang-path-literal": b"other.example!user@[127.0.0.1]",
    "ip-literal": b"user@[127.0.0.1]",
}


@pytest.mark.parametrize("address", PATTERNS.values(), ids=PATTERNS.keys())
@pytest.mark.parametrize("listener", ["starttls", "plain"])
def test_open_relay_probe(upstream: ScriptedUpstream, upstream_proxy: Proxy, pki: PKI, address: bytes, listener: str) -> None:
    """Attack: nmap smtp-open-relay - relaying without AUTH through an address trick."""
    if listener == "starttls":
        c = Client(upstream_proxy.port)
        c.ehlo()
        c.command(b"STARTTLS")
        c.starttls(pki.client_context())
    else:
        c = Client(upstream_proxy.plain_port)
    c.ehlo()
    replies = [
        c.command(b"MAIL FROM:<" + address + b">"),
        c.command(b"MAIL FROM:<>"),
        c.command(b"RCPT TO:<" + address + b">"),
        c.command(b"MAIL FROM:<antispam@relay.test>"),
        c.command(b"RCPT TO:<" + address + b">"),
        c.command(b"DATA"),
    ]
    c.close()
    # First what matters for relaying: refused, permanently, and nothing went anywhere.
    assert all(r.startswith(b"5") for r in replies), replies
    assert upstream.sessions == []
    # Then the reply the issue specifies for each: authentication required.
    required = expect(Catalogue.AUTH_REQUIRED, b"530 5.7.0")
    assert replies == [required] * len(replies)
