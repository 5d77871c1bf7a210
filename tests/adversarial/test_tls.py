"""STARTTLS attacks: plaintext injected after STARTTLS, state kept across it, AUTH before TLS."""

from __future__ import annotations

from harness import PKI, Proxy, Recorder, free_port, recorder_upstream, wait_for, wait_listening

from relayproxy.smtp.reply import Catalogue

from .clients import Client, auth_plain, b64, expect
from .support import Launch, read_wire

READY = expect(Catalogue.READY_TLS, b"220 2.0.0")


def extensions(ehlo: bytes) -> list[bytes]:
    return [line[4:] for line in ehlo.split(b"\r\n")[1:] if line]


def test_starttls_with_pipelined_plaintext_commands(recorder: Recorder, recorder_proxy: Proxy, pki: PKI) -> None:
    """Attack: CVE-2011-0411 - commands sent in the STARTTLS packet, executed after the handshake."""
    c = Client(recorder_proxy.port)
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
    assert recorder.sessions == []


def test_starttls_forgets_auth_ehlo_and_envelope(launch: Launch, recorder: Recorder, pki: PKI) -> None:
    """Attack: authenticate and open an envelope in plaintext, then rely on them surviving STARTTLS."""
    port = free_port()
    launch(
        recorder_upstream(recorder),
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
    # The plaintext transaction's upstream session was closed without going further.
    wait_for(lambda: recorder.closed >= 1)
    first = read_wire(bytes(recorder.sessions[0]))
    assert first.commands[1:] == [b"MAIL FROM:<app1@example.org>"]
    c.envelope()
    assert c.command(b"DATA") == b"354 go ahead\r\n"
    assert c.command(b"Subject: after TLS\r\n\r\nhi\r\n.") == b"250 2.0.0 Ok: queued as REC1\r\n"
    c.close()
    assert len(read_wire(recorder.data).bodies) == 1


def test_starttls_on_implicit_tls_listener(recorder_proxy: Proxy, pki: PKI) -> None:
    """Attack: STARTTLS inside an implicit-TLS session (renegotiation / state confusion)."""
    c = Client(recorder_proxy.tls_port, tls=pki.client_context())
    assert b"STARTTLS" not in extensions(c.ehlo())
    assert c.command(b"STARTTLS") == expect(Catalogue.TLS_ACTIVE, b"503 5.5.1")
    assert c.command(b"NOOP") == expect(Catalogue.OK, b"250 2.0.0")
    c.close()


def test_second_starttls_refused(recorder_proxy: Proxy, pki: PKI) -> None:
    """Attack: STARTTLS again after a STARTTLS handshake."""
    c = Client(recorder_proxy.port)
    c.ehlo()
    assert c.command(b"STARTTLS") == READY
    c.starttls(pki.client_context())
    assert b"STARTTLS" not in extensions(c.ehlo())
    assert c.command(b"STARTTLS") == expect(Catalogue.TLS_ACTIVE, b"503 5.5.1")
    c.close()


def test_starttls_on_plaintext_listener(recorder_proxy: Proxy) -> None:
    """Attack: STARTTLS where the listener has no TLS (the client must not believe it is protected)."""
    c = Client(recorder_proxy.plain_port)
    assert b"STARTTLS" not in extensions(c.ehlo())
    assert c.command(b"STARTTLS") == expect(Catalogue.TLS_UNAVAILABLE, b"502 5.5.1")
    c.close()


def test_auth_before_tls_on_starttls_listener(recorder: Recorder, recorder_proxy: Proxy, pki: PKI) -> None:
    """Attack: credentials in the clear - AUTH on a STARTTLS listener before the handshake."""
    c = Client(recorder_proxy.port)
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
    assert recorder.sessions == []
