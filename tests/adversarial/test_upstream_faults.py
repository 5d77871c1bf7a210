"""Upstream faults: a scripted upstream that drops, lies, floods, injects, or has a bad certificate.

Whatever it does, the client gets a 4xx (never 250 for a message that was not accepted), the message
goes upstream at most once, memory stays bounded, and credentials never travel in the clear.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest
import trustme
from conftest import UpstreamFactory
from harness import PKI, Proxy, wait_for
from peers import DROP, EHLO_NO_STARTTLS, GO_AHEAD, Certificate, ScriptedUpstream, expect, flood, issue, ready
from relayproxy.smtp.reply import Catalogue

from .support import Launch, RssMonitor, read_wire

UNREACHABLE = expect(Catalogue.upstream_unreachable("default"), b"451 4.4.1")
LOST = expect(Catalogue.UPSTREAM_LOST, b"451 4.4.2")
BAD_REPLY = expect(Catalogue.UPSTREAM_BAD_REPLY, b"451 4.4.0")
TLS_FAILED = expect(Catalogue.upstream_tls_failed("default"), b"454 4.7.0")
MAIL_FIRST = expect(Catalogue.MAIL_FIRST, b"503 5.5.1")
OK = b"250 2.0.0 OK\r\n"
GO = GO_AHEAD
QUEUED = b"250 2.0.0 Ok: queued as REC1\r\n"
BODY = b"From: app1@example.org\r\nSubject: fault\r\nMessage-ID: <fault@example.org>\r\n\r\n" + (b"b" * 76 + b"\r\n") * 4000


@pytest.fixture
def certificate(pki: PKI) -> Certificate:
    return issue(pki.ca, pki.dir, "scripted-localhost", "localhost")


def start(
    make_upstream: UpstreamFactory, launch: Launch, pki: PKI, script: dict[str, Any], *,
    certificate: Certificate, tls: str = "starttls", **kwargs: Any,
) -> tuple[ScriptedUpstream, Proxy]:
    upstream = make_upstream(script, tls=tls, certificate=certificate, **kwargs)
    proxy = launch(upstream.toml(ca_file=pki.ca_path))
    return upstream, proxy


def transaction(proxy: Proxy) -> list[bytes]:
    """MAIL, RCPT, DATA (and the body when DATA got 354), then NOOP; every reply the client saw."""
    c = ready(proxy.plain_port)
    replies = [c.command(b"MAIL FROM:<app1@example.org>"), c.command(b"RCPT TO:<bob@example.net>")]
    replies.append(c.command(b"DATA"))
    if replies[-1].startswith(b"354"):
        c.send(BODY + b".\r\n")
        replies.append(c.reply())
    assert c.command(b"NOOP") == expect(Catalogue.OK, b"250 2.0.0"), "the client session did not survive"
    c.close()
    return replies


def assert_safe(upstream: ScriptedUpstream, replies: list[bytes], max_dots: int = 0, accepted: bool = False) -> None:
    if len(replies) == 4 and not accepted:
        assert not replies[3].startswith(b"2"), "250 for a message the upstream did not accept"
    for reply in replies:
        assert all(0x20 <= b < 0x7F for b in reply[:-2]), f"unprintable bytes relayed: {reply!r}"
    wait_for(lambda: upstream.closed == upstream.connections)
    assert upstream.connections <= 1, "the proxy reconnected on its own (and could deliver twice)"
    assert upstream.final_dots == max_dots
    assert b"AUTH" not in bytes(upstream.plaintext), "credentials sent in the clear"


DROPS: dict[str, tuple[dict[str, Any], list[bytes], int]] = {
    "before-greeting": ({"greeting": DROP}, [UNREACHABLE, MAIL_FIRST, MAIL_FIRST], 0),
    "after-MAIL": ({"MAIL": DROP}, [LOST, MAIL_FIRST, MAIL_FIRST], 0),
    "after-RCPT": ({"RCPT": DROP}, [OK, LOST, LOST], 0),
    "after-354": ({"DATA": lambda conn: conn.sendall(GO)}, [OK, OK, GO, LOST], 0),
    "mid-body": ({"BODY": DROP}, [OK, OK, GO, LOST], 0),
    "after-final-dot": ({"DATA-END": DROP}, [OK, OK, GO, LOST], 1),
}


@pytest.mark.parametrize("point", DROPS.keys())
def test_upstream_drops_connection(make_upstream: UpstreamFactory, launch: Launch, pki: PKI, certificate: Certificate, point: str) -> None:
    """Attack: the upstream (or the network) drops the connection at each point of the dialogue."""
    script, expected, dots = DROPS[point]
    upstream, proxy = start(make_upstream, launch, pki, script, certificate=certificate, body_drop_after=50_000)
    replies = transaction(proxy)
    assert_safe(upstream, replies, max_dots=dots)
    assert replies == expected


GARBAGE = {
    "2_5": b"2_5 ok\r\n",
    "two-digits": b"25 ok\r\n",
    "250x": b"250x ok\r\n",
    "non-ascii": b"250 caf\xc3\xa9 \xff\r\n",
    "ansi-escape": b"250 \x1b[31mred\x1b[0m \x1b]0;owned\x07\r\n",
    "code-change": b"250-first\r\n550 second\r\n",
    "nul": b"250 o\x00k\r\n",
}


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
@pytest.mark.parametrize("where", ["greeting", "MAIL", "DATA-END"])
def test_upstream_garbage_reply(
    make_upstream: UpstreamFactory, launch: Launch, pki: PKI, certificate: Certificate, where: str, garbage: bytes
) -> None:
    """Attack: malformed reply lines from the upstream (reply parsing, terminal injection into logs and clients)."""
    upstream, proxy = start(make_upstream, launch, pki, {where: garbage}, certificate=certificate)
    replies = transaction(proxy)
    assert_safe(upstream, replies, max_dots=1 if where == "DATA-END" else 0)
    assert replies == {
        "greeting": [UNREACHABLE, MAIL_FIRST, MAIL_FIRST],
        "MAIL": [BAD_REPLY, MAIL_FIRST, MAIL_FIRST],
        "DATA-END": [OK, OK, GO, BAD_REPLY],
    }[where]


def test_upstream_sends_unrequested_reply(make_upstream: UpstreamFactory, launch: Launch, pki: PKI, certificate: Certificate) -> None:
    """Attack: an extra reply after MAIL's, so every later command would be answered by the wrong reply."""
    upstream, proxy = start(make_upstream, launch, pki, {"MAIL": b"250 2.1.0 ok\r\n250 2.1.5 injected\r\n"}, certificate=certificate)
    replies = transaction(proxy)
    assert_safe(upstream, replies)
    assert replies == [b"250 2.1.0 ok\r\n", BAD_REPLY, LOST]


def _line_flood(conn: Any) -> int:
    conn.sendall(b"250 ")
    return 4 + flood(60 * 1024 * 1024, b"x" * 1024)(conn)


FLOODS = {
    "60MB-of-250-lines": flood(60 * 1024 * 1024),
    "one-60MB-line": _line_flood,
}


@pytest.mark.parametrize("where", ["EHLO", "MAIL"])
@pytest.mark.parametrize("shape", FLOODS.keys())
def test_upstream_reply_flood(make_upstream: UpstreamFactory, launch: Launch, pki: PKI, certificate: Certificate, shape: str, where: str) -> None:
    """Attack: an upstream answering with 60 MB (memory exhaustion of the proxy's reply reader)."""
    upstream, proxy = start(make_upstream, launch, pki, {where: FLOODS[shape]}, certificate=certificate)
    with RssMonitor() as rss:
        replies = transaction(proxy)
        wait_for(lambda: upstream.closed == 1, timeout=30)
    assert rss.growth_mib < 20, f"RSS grew by {rss.growth_mib:.1f} MiB"
    assert 0 < upstream.sent_flood < 60 * 1024 * 1024, "the proxy read the whole flood instead of closing"
    assert_safe(upstream, replies)
    assert replies == [UNREACHABLE if where == "EHLO" else BAD_REPLY, MAIL_FIRST, MAIL_FIRST]


def test_reply_injected_across_starttls(make_upstream: UpstreamFactory, launch: Launch, pki: PKI, certificate: Certificate) -> None:
    """Attack: STARTTLS response injection - a reply sent in plaintext with the 220, read after the handshake."""
    upstream, proxy = start(make_upstream, launch, pki, {"STARTTLS": b"220 go\r\n250 injected\r\n"}, certificate=certificate)
    replies = transaction(proxy)
    assert_safe(upstream, replies)
    assert upstream.secure == b"", "the proxy carried on over TLS after an injected reply"
    assert replies[1:] == [MAIL_FIRST, MAIL_FIRST]
    assert replies[0] == TLS_FAILED


REFUSALS = {
    "not-offered": {"EHLO": EHLO_NO_STARTTLS},
    "refused": {"STARTTLS": b"454 4.7.0 TLS not available due to temporary reason\r\n"},
    "garbage-ready": {"STARTTLS": b"220\r\n" + b"\x16\x03\x01\x00\x05hello"},
}


@pytest.mark.parametrize("case", REFUSALS.keys())
def test_upstream_without_starttls(make_upstream: UpstreamFactory, launch: Launch, pki: PKI, certificate: Certificate, case: str) -> None:
    """Attack: STARTTLS stripping - the upstream does not offer or refuses STARTTLS but offers AUTH in the clear."""
    upstream, proxy = start(make_upstream, launch, pki, REFUSALS[case], certificate=certificate)
    replies = transaction(proxy)
    assert_safe(upstream, replies)
    assert upstream.secure == b""
    assert [c for c in read_wire(bytes(upstream.plaintext)).commands if not c.startswith((b"EHLO ", b"STARTTLS", b"QUIT"))] == []
    assert replies[1:] == [MAIL_FIRST, MAIL_FIRST]
    # Plaintext bytes after the 220 are an injection like the one above: either 4xx of the Catalogue.
    assert replies[0] == TLS_FAILED or (case == "garbage-ready" and replies[0] == UNREACHABLE)


def bad_certificate(pki: PKI, kind: str) -> Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    if kind == "self-signed":
        return issue(trustme.CA(), pki.dir, "untrusted-localhost", "localhost")
    if kind == "expired":
        return issue(pki.ca, pki.dir, "expired-localhost", "localhost",
                     not_before=now - datetime.timedelta(days=30), not_after=now - datetime.timedelta(days=1))
    if kind == "not-yet-valid":
        return issue(pki.ca, pki.dir, "future-localhost", "localhost",
                     not_before=now + datetime.timedelta(days=1), not_after=now + datetime.timedelta(days=30))
    assert kind == "wrong-name"
    return issue(pki.ca, pki.dir, "wrong-name", "mail.wrong.example")


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
@pytest.mark.parametrize("kind", ["self-signed", "expired", "not-yet-valid", "wrong-name"])
def test_upstream_bad_certificate(make_upstream: UpstreamFactory, launch: Launch, pki: PKI, kind: str, tls: str) -> None:
    """Attack: TLS man in the middle with an untrusted, expired, not yet valid or wrong-name certificate."""
    upstream, proxy = start(make_upstream, launch, pki, {}, certificate=bad_certificate(pki, kind), tls=tls)
    replies = transaction(proxy)
    assert_safe(upstream, replies)
    assert upstream.tls_errors, "the handshake was not refused"
    assert upstream.secure == b"", "the proxy talked to an unverified server"
    assert replies == [TLS_FAILED, MAIL_FIRST, MAIL_FIRST]


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_scripted_upstream_control(make_upstream: UpstreamFactory, launch: Launch, pki: PKI, certificate: Certificate, tls: str) -> None:
    """Control for the attacks above: with a valid certificate the same upstream accepts the message once."""
    upstream, proxy = start(make_upstream, launch, pki, {}, certificate=certificate, tls=tls)
    replies = transaction(proxy)
    assert replies == [OK, OK, GO, QUEUED]
    assert_safe(upstream, replies, max_dots=1, accepted=True)
    assert upstream.bodies == [BODY]
    assert bytes(upstream.secure).count(b"AUTH PLAIN ") == 1
