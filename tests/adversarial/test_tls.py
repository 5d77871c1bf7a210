"""TLS attacks: plaintext injected after STARTTLS, state kept across it, AUTH before TLS, and a
TLS 1.2 handshake pushed to weak cipher suites."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme
from harness import PKI, Proxy, free_port, reactor, wait_for, wait_listening
from peers import Client, ScriptedUpstream, auth_plain, b64, expect
from twisted.internet.threads import blockingCallFromThread

from relayproxy.smtp.reply import Catalogue

from .support import Launch, read_wire

READY = expect(Catalogue.READY_TLS, b"220 2.0.0")


def extensions(ehlo: bytes) -> list[bytes]:
    return [line[4:] for line in ehlo.split(b"\r\n")[1:] if line]


def test_starttls_with_pipelined_plaintext_commands(upstream: ScriptedUpstream, upstream_proxy: Proxy, pki: PKI) -> None:
    """Attack: CVE-2011-0411 - commands sent in the STARTTLS packet, executed after the handshake."""
    c = Client(upstream_proxy.port)
    c.ehlo()
    c.send(b"STARTTLS\r\nEHLO evil.example\r\n" + auth_plain() + b"\r\nMAIL FROM:<app1@example.org>\r\nNOOP\r\n")
    assert c.reply() == READY
    c.starttls(pki.client_context())  # also asserts no plaintext reply followed the 220
    # Were EHLO and AUTH from the packet executed, this would be 250 (or a stale reply).
    assert c.command(b"MAIL FROM:<app1@example.org>") == expect(Catalogue.AUTH_REQUIRED, b"530 5.7.0")
    assert c.command(b"NOOP") == expect(Catalogue.OK, b"250 2.0.0")
    assert extensions(c.ehlo())[-1] == b"AUTH PLAIN LOGIN"
    assert c.command(b"MAIL FROM:<app1@example.org>") == expect(Catalogue.AUTH_REQUIRED, b"530 5.7.0")
    c.close()
    assert upstream.sessions == []


def test_starttls_forgets_auth_ehlo_and_envelope(launch: Launch, upstream: ScriptedUpstream, pki: PKI) -> None:
    """Attack: authenticate and open an envelope in plaintext, then rely on them surviving STARTTLS."""
    port = free_port()
    launch(
        upstream.toml(),
        extra=f'[[listener]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\ntls = "starttls"\nallow_plaintext_auth = true\n',
    )
    wait_listening(port)
    c = Client(port)
    assert extensions(c.ehlo())[-2:] == [b"STARTTLS", b"AUTH PLAIN LOGIN"]
    c.login()
    assert c.command(b"MAIL FROM:<app1@example.org>") == b"250 2.0.0 OK\r\n"
    assert c.command(b"STARTTLS") == READY
    c.starttls(pki.client_context())
    assert c.command(b"RCPT TO:<bob@example.net>") == expect(Catalogue.AUTH_REQUIRED, b"530 5.7.0"), "AUTH survived STARTTLS"
    assert c.command(auth_plain()) == expect(Catalogue.EHLO_FIRST, b"503 5.5.1"), "EHLO survived STARTTLS"
    ehlo = extensions(c.ehlo())
    assert b"STARTTLS" not in ehlo and ehlo[-1] == b"AUTH PLAIN LOGIN"
    c.login()
    assert c.command(b"RCPT TO:<bob@example.net>") == expect(Catalogue.MAIL_FIRST, b"503 5.5.1"), "envelope survived STARTTLS"
    assert c.command(b"DATA") == expect(Catalogue.MAIL_FIRST, b"503 5.5.1")
    # The plaintext transaction was reset upstream and its session not kept for the client after TLS.
    wait_for(lambda: upstream.closed >= 1)
    first = read_wire(bytes(upstream.sessions[0]))
    assert first.commands[1:] == [b"MAIL FROM:<app1@example.org>", b"RSET", b"QUIT"]
    c.envelope()
    assert c.command(b"DATA") == b"354 go ahead\r\n"
    assert c.command(b"Subject: after TLS\r\n\r\nhi\r\n.") == b"250 2.0.0 Ok: queued as REC1\r\n"
    c.close()
    assert len(read_wire(upstream.data).bodies) == 1


def test_starttls_on_implicit_tls_listener(upstream_proxy: Proxy, pki: PKI) -> None:
    """Attack: STARTTLS inside an implicit-TLS session (renegotiation / state confusion)."""
    c = Client(upstream_proxy.tls_port, tls=pki.client_context())
    assert b"STARTTLS" not in extensions(c.ehlo())
    assert c.command(b"STARTTLS") == expect(Catalogue.TLS_ACTIVE, b"503 5.5.1")
    assert c.command(b"NOOP") == expect(Catalogue.OK, b"250 2.0.0")
    c.close()


def test_second_starttls_refused(upstream_proxy: Proxy, pki: PKI) -> None:
    """Attack: STARTTLS again after a STARTTLS handshake."""
    c = Client(upstream_proxy.port)
    c.ehlo()
    assert c.command(b"STARTTLS") == READY
    c.starttls(pki.client_context())
    assert b"STARTTLS" not in extensions(c.ehlo())
    assert c.command(b"STARTTLS") == expect(Catalogue.TLS_ACTIVE, b"503 5.5.1")
    c.close()


def test_starttls_on_plaintext_listener(upstream_proxy: Proxy) -> None:
    """Attack: STARTTLS where the listener has no TLS (the client must not believe it is protected)."""
    c = Client(upstream_proxy.plain_port)
    assert b"STARTTLS" not in extensions(c.ehlo())
    assert c.command(b"STARTTLS") == expect(Catalogue.TLS_UNAVAILABLE, b"502 5.5.1")
    c.close()


def test_auth_before_tls_on_starttls_listener(upstream: ScriptedUpstream, upstream_proxy: Proxy, pki: PKI) -> None:
    """Attack: credentials in the clear - AUTH on a STARTTLS listener before the handshake."""
    c = Client(upstream_proxy.port)
    ehlo = extensions(c.ehlo())
    assert b"STARTTLS" in ehlo
    assert not any(e.startswith(b"AUTH") for e in ehlo), "AUTH advertised before TLS"
    refused = expect(Catalogue.AUTH_ENCRYPTION_REQUIRED, b"538 5.7.11")
    assert c.command(auth_plain()) == refused
    assert c.command(b"AUTH PLAIN") == refused, "a 334 prompt would invite the password in plaintext"
    assert c.command(b"AUTH LOGIN") == refused
    assert c.command(b"AUTH LOGIN " + b64(b"app1")) == refused
    assert c.command(b"MAIL FROM:<app1@example.org>") == expect(Catalogue.AUTH_REQUIRED, b"530 5.7.0")
    assert c.command(b"STARTTLS") == READY
    c.starttls(pki.client_context())
    assert extensions(c.ehlo())[-1] == b"AUTH PLAIN LOGIN"
    c.login()
    c.close()
    assert upstream.sessions == []


# Both key types' names: a client offers only what cannot work with the other key anyway.
CBC_SUITES = "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES256-SHA384"
RSA_KEY_EXCHANGE = "AES128-GCM-SHA256:AES256-GCM-SHA384:AES128-SHA"
AEAD_SUITES = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"


def tls12_only(pki: PKI, suites: str) -> ssl.SSLContext:
    context = pki.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(suites)
    return context


def tls_session(proxy: Proxy, listener: str, context: ssl.SSLContext) -> Client:
    """A client after the TLS handshake on the STARTTLS or the implicit-TLS listener."""
    if listener == "implicit":
        return Client(proxy.tls_port, tls=context)
    c = Client(proxy.port)
    c.ehlo()
    assert c.command(b"STARTTLS") == READY
    c.starttls(context)
    return c


@pytest.fixture(params=["ECDSA", "RSA"])
def relay_key(request: pytest.FixtureRequest, upstream_proxy: Proxy, pki: PKI, tmp_path: Path) -> str:
    """The key type of the listeners' certificate: trustme's ECDSA one, or an RSA one put in by a reload."""
    key_type: str = request.param
    if key_type == "RSA":
        leaf = pki.ca.issue_cert("relay.test", "localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
        cert, key = tmp_path / "relay-rsa.crt", tmp_path / "relay-rsa.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        text = upstream_proxy.config_path.read_text()
        tls = text[text.index("[tls]") : text.index("[[listener]]")]
        text = text.replace(tls, f'[tls]\ncertificate = "{cert}"\nkey = "{key}"\n\n')
        upstream_proxy.config_path.write_text(text)
        assert blockingCallFromThread(reactor, upstream_proxy.service.reload)
    return key_type


@pytest.mark.parametrize("listener", ["starttls", "implicit"])
def test_tls12_with_cbc_suites_or_rsa_key_exchange_is_refused(upstream_proxy: Proxy, pki: PKI, relay_key: str, listener: str) -> None:
    """Attack: a TLS 1.2 client (or a man in the middle editing its ClientHello) offering only CBC
    suites (padding oracles, SHA1 MACs) or RSA key exchange (no forward secrecy, ROBOT)."""
    for suites in (CBC_SUITES, RSA_KEY_EXCHANGE):
        with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
            tls_session(upstream_proxy, listener, tls12_only(pki, suites))


@pytest.mark.parametrize("listener", ["starttls", "implicit"])
def test_tls12_with_ecdhe_and_aes_gcm_and_tls13_are_accepted(upstream_proxy: Proxy, pki: PKI, relay_key: str, listener: str) -> None:
    c = tls_session(upstream_proxy, listener, tls12_only(pki, AEAD_SUITES))
    assert (c.sock.version(), c.sock.cipher()[0]) == ("TLSv1.2", f"ECDHE-{relay_key}-AES128-GCM-SHA256")
    assert c.command(b"NOOP") == expect(Catalogue.OK, b"250 2.0.0")
    c.close()
    tls13 = pki.client_context()
    tls13.minimum_version = ssl.TLSVersion.TLSv1_3
    c = tls_session(upstream_proxy, listener, tls13)
    assert c.sock.version() == "TLSv1.3"
    assert c.command(b"NOOP") == expect(Catalogue.OK, b"250 2.0.0")
    c.close()
