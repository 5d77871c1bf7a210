"""AUTH (RFC 4954 sections 4 and 6): every reply that applies, malformed payloads, password guessing."""

from __future__ import annotations

import re
import time

import bcrypt
import pytest
from harness import PKI, Proxy
from peers import Client, ScriptedUpstream, auth_plain, b64, expect
from relayproxy.smtp.reply import Catalogue

from .support import Launch, LogCapture

AUTH_OK = expect(Catalogue.AUTH_OK, b"235 2.7.0")
INVALID = expect(Catalogue.AUTH_INVALID, b"535 5.7.8")
CANCELLED = expect(Catalogue.AUTH_CANCELLED, b"501 5.5.2")
BAD_BASE64 = expect(Catalogue.AUTH_BAD_BASE64, b"501 5.5.2")
MALFORMED = expect(Catalogue.AUTH_MALFORMED, b"501 5.5.2")
TOO_LONG = expect(Catalogue.AUTH_LINE_TOO_LONG, b"500 5.5.6")
THROTTLED = expect(Catalogue.AUTH_TEMPORARY, b"454 4.7.0")
OK = expect(Catalogue.OK, b"250 2.0.0")
USERNAME = b"334 " + b64(b"Username:") + b"\r\n"
PASSWORD = b"334 " + b64(b"Password:") + b"\r\n"
USERS = {"app1": "app1-password", "printer": "printer-password"}


def tls_client(proxy: Proxy, pki: PKI, source: str = "127.0.0.1") -> Client:
    c = Client(proxy.tls_port, tls=pki.client_context(), source=source)
    c.ehlo()
    return c


@pytest.fixture
def auth_proxy(launch: Launch, upstream: ScriptedUpstream) -> Proxy:
    return launch(upstream.toml(), users=USERS)


def test_auth_plain_with_empty_challenge(auth_proxy: Proxy, pki: PKI) -> None:
    """Attack surface: AUTH PLAIN without initial response - the 334 challenge, then success."""
    c = tls_client(auth_proxy, pki)
    assert c.command(b"AUTH PLAIN") == b"334 \r\n"
    assert c.command(b64(b"\0app1\0app1-password")) == AUTH_OK
    c.close()


def test_auth_login_challenges(auth_proxy: Proxy, pki: PKI) -> None:
    """Attack surface: AUTH LOGIN with and without an initial response."""
    c = tls_client(auth_proxy, pki)
    assert c.command(b"AUTH LOGIN") == USERNAME
    assert c.command(b64(b"app1")) == PASSWORD
    assert c.command(b64(b"app1-password")) == AUTH_OK
    c.close()
    c = tls_client(auth_proxy, pki)
    assert c.command(b"AUTH LOGIN " + b64(b"app1")) == PASSWORD
    assert c.command(b64(b"app1-password")) == AUTH_OK
    c.close()


def test_auth_cancelled_with_star(auth_proxy: Proxy, pki: PKI) -> None:
    """Attack: "*" at every challenge (RFC 4954 4: 501), which must not count as a failure nor stick."""
    c = tls_client(auth_proxy, pki)
    for _ in range(4):  # more than max_auth_failures_per_session: cancels are not failures
        assert c.command(b"AUTH PLAIN") == b"334 \r\n"
        assert c.command(b"*") == CANCELLED
        assert c.command(b"AUTH LOGIN") == USERNAME
        assert c.command(b"*") == CANCELLED
        assert c.command(b"AUTH LOGIN") == USERNAME
        assert c.command(b64(b"app1")) == PASSWORD
        assert c.command(b"*") == CANCELLED
    c.login()
    c.close()


def test_auth_not_base64(auth_proxy: Proxy, pki: PKI) -> None:
    """Attack: payloads that are not base64 (initial response, PLAIN challenge, LOGIN challenges)."""
    c = tls_client(auth_proxy, pki)
    assert c.command(b"AUTH PLAIN %%%not-base64%%%") == BAD_BASE64
    assert c.command(b"AUTH PLAIN AGFwcDEAYXBwMS1wYXNzd29yZA") == BAD_BASE64  # missing padding
    assert c.command(b"AUTH PLAIN") == b"334 \r\n"
    assert c.command(b"!!!!") == BAD_BASE64
    assert c.command(b"AUTH LOGIN") == USERNAME
    assert c.command(b"app1 in clear") == BAD_BASE64
    assert c.command(b"AUTH LOGIN") == USERNAME
    assert c.command(b64(b"app1")) == PASSWORD
    assert c.command(b"\xff\xfe") == BAD_BASE64
    c.login()
    c.close()


def test_auth_empty_payload(auth_proxy: Proxy, pki: PKI) -> None:
    """Attack: empty payloads ("=" and an empty line) in PLAIN and LOGIN."""
    c = tls_client(auth_proxy, pki)
    assert c.command(b"AUTH PLAIN =") == MALFORMED
    assert c.command(b"AUTH PLAIN") == b"334 \r\n"
    assert c.command(b"") == MALFORMED
    assert c.command(b"AUTH PLAIN " + b64(b"\0\0")) == MALFORMED
    assert c.command(b"AUTH PLAIN " + b64(b"\0app1\0")) == MALFORMED
    assert c.command(b"AUTH LOGIN =") == MALFORMED
    assert c.command(b"AUTH LOGIN") == USERNAME
    assert c.command(b"") == MALFORMED
    c.login()
    c.close()


def test_auth_payload_of_12_kb(auth_proxy: Proxy, pki: PKI) -> None:
    """Attack: a 12 KB AUTH line and a 12 KB challenge response (buffer growth, RFC 4954 4)."""
    c = tls_client(auth_proxy, pki)
    blob = b64(b"\0app1\0" + b"x" * 9000)
    assert len(blob) == 12_008
    assert c.command(b"AUTH PLAIN " + blob) == TOO_LONG
    assert c.command(b"AUTH PLAIN") == b"334 \r\n"
    assert c.command(blob) == TOO_LONG
    assert c.command(b"AUTH LOGIN") == USERNAME
    assert c.command(blob) == TOO_LONG
    assert c.command(b"NOOP") == OK
    c.login()
    c.close()


def test_auth_nul_in_username(auth_proxy: Proxy, pki: PKI) -> None:
    """Attack: a NUL inside the user name (truncation in C checkers, field shifting in PLAIN)."""
    c = tls_client(auth_proxy, pki)
    assert c.command(auth_plain("app1\0evil", "app1-password")) == MALFORMED
    assert c.command(b"AUTH PLAIN " + b64(b"\0app1\0\0app1-password")) == MALFORMED
    assert c.command(b"AUTH LOGIN " + b64(b"app1\0evil")) == MALFORMED
    assert c.command(b"AUTH LOGIN") == USERNAME
    assert c.command(b64(b"app1\0")) == MALFORMED
    c.login()
    c.close()


def test_auth_authzid_of_another_user(auth_proxy: Proxy, pki: PKI) -> None:
    """Attack: PLAIN with app1's valid credentials and the authzid of another user (act as printer)."""
    c = tls_client(auth_proxy, pki)
    assert c.command(auth_plain("app1", "app1-password", authzid="printer")) == INVALID
    assert c.command(auth_plain("app1", "app1-password", authzid="app1")) == AUTH_OK
    c.close()


def test_auth_wrong_password_and_unknown_user(auth_proxy: Proxy, pki: PKI) -> None:
    """Attack: a wrong password and a user that does not exist get the same reply (no user oracle)."""
    c = tls_client(auth_proxy, pki)
    assert c.command(auth_plain("app1", "wrong")) == INVALID
    assert c.command(auth_plain("nosuchuser", "wrong")) == INVALID
    c.close()


def test_auth_unknown_mechanism(auth_proxy: Proxy, pki: PKI) -> None:
    """Attack: mechanisms the proxy does not offer, and AUTH with no mechanism."""
    c = tls_client(auth_proxy, pki)
    unknown = expect(Catalogue.AUTH_UNKNOWN_MECHANISM, b"504 5.5.4")
    for mechanism in (b"CRAM-MD5", b"GSSAPI", b"XOAUTH2 dG9rZW4=", b"ANONYMOUS", b"PLAINX"):
        assert c.command(b"AUTH " + mechanism) == unknown
    assert c.command(b"AUTH") == expect(Catalogue.AUTH_NO_MECHANISM, b"501 5.5.2")
    c.close()


def test_auth_twice(auth_proxy: Proxy, pki: PKI) -> None:
    """Attack: a second AUTH to switch identity once authenticated (RFC 4954 4: 503)."""
    c = tls_client(auth_proxy, pki)
    c.login()
    again = expect(Catalogue.ALREADY_AUTHENTICATED, b"503 5.5.1")
    assert c.command(auth_plain("printer", "printer-password")) == again
    assert c.command(b"AUTH LOGIN") == again
    c.close()


def test_auth_before_ehlo(auth_proxy: Proxy, pki: PKI) -> None:
    """Attack: AUTH before EHLO."""
    c = Client(auth_proxy.tls_port, tls=pki.client_context())
    assert c.command(auth_plain()) == expect(Catalogue.EHLO_FIRST, b"503 5.5.1")
    c.close()


def test_mail_without_auth(auth_proxy: Proxy, pki: PKI, upstream: ScriptedUpstream) -> None:
    """Attack: MAIL, RCPT and DATA without authenticating (RFC 4954 6: 530 5.7.0)."""
    c = tls_client(auth_proxy, pki)
    required = expect(Catalogue.AUTH_REQUIRED, b"530 5.7.0")
    assert c.command(b"MAIL FROM:<app1@example.org>") == required
    assert c.command(b"RCPT TO:<bob@example.net>") == required
    assert c.command(b"DATA") == required
    c.close()
    assert upstream.sessions == []


def test_auth_throttled_per_ip(launch: Launch, upstream: ScriptedUpstream, pki: PKI) -> None:
    """Attack: password guessing past auth_failures_per_ip: 454 4.7.0, even for the right password."""
    proxy = launch(upstream.toml(), users=USERS, limits="auth_failures_per_ip = 2\nmax_auth_failures_per_session = 5")
    c = tls_client(proxy, pki, source="127.0.0.2")
    assert c.command(auth_plain("app1", "guess1")) == INVALID
    assert c.command(auth_plain("app1", "guess2")) == INVALID
    assert c.command(auth_plain("app1", "app1-password")) == THROTTLED
    assert c.command(b"AUTH LOGIN") == THROTTLED
    c.close()
    # The block is per address: app1 from elsewhere still logs in.
    c = tls_client(proxy, pki, source="127.0.0.1")
    c.login()
    c.close()


def test_hundred_wrong_passwords_from_one_ip(
    launch: Launch, upstream: ScriptedUpstream, pki: PKI, twisted_log: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: 100 wrong passwords for one user from one IP (online guessing, log injection of secrets)."""
    checks = []
    real_checkpw = bcrypt.checkpw

    def counting_checkpw(password: bytes, hashed: bytes) -> bool:
        checks.append(1)
        return real_checkpw(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting_checkpw)
    proxy = launch(upstream.toml(), users=USERS)
    passwords = [f"Guess-{i:03d}-s3cret" for i in range(100)]
    closed_sessions = 0
    replies: list[bytes] = []
    throttled_started = None
    c = tls_client(proxy, pki, source="127.0.0.3")
    in_session = 0
    for password in passwords:
        reply = c.command(auth_plain("app1", password))
        replies.append(reply)
        if reply == THROTTLED and throttled_started is None:
            throttled_started = time.monotonic()
        if reply == INVALID:
            in_session += 1
            if in_session == 3:
                # max_auth_failures_per_session (3): 535, then 421 and the close.
                assert c.reply() == expect(Catalogue.TOO_MANY_AUTH_FAILURES, b"421 4.7.0")
                assert c.wait_closed() == b""
                closed_sessions += 1
                c = tls_client(proxy, pki, source="127.0.0.3")
                in_session = 0
    throttled_time = time.monotonic() - (throttled_started or time.monotonic())
    # auth_failures_per_ip (10): the 10th failure blocks the address; the rest never reach bcrypt.
    assert replies == [INVALID] * 10 + [THROTTLED] * 90
    assert closed_sessions == 3
    assert len(checks) == 10, "bcrypt ran for throttled attempts"
    assert throttled_time < 5, f"90 throttled attempts took {throttled_time:.1f}s"
    # The right password during the block gets the same 454: no oracle.
    assert c.command(auth_plain()) == THROTTLED
    assert c.command(b"NOOP") == OK
    c.close()
    assert len(checks) == 10

    lines = twisted_log.lines()
    for password in [*passwords, "app1-password"]:
        secret_forms = [password, b64(b"\0app1\0" + password.encode()).decode()]
        leaked = [line for line in lines for form in secret_forms if form in line]
        assert not leaked, f"password in the log: {leaked[:3]}"
    failures = [line for line in lines if "auth failed" in line]
    assert len(failures) == 10
    for line in failures:
        assert re.fullmatch(r"auth failed client=127\.0\.0\.3 user=app1 reason=.*", line), line
    assert not [line for line in lines if "Traceback" in line or "internal error" in line]


def test_guessing_elsewhere_does_not_lock_a_user_out_of_its_usual_address(auth_proxy: Proxy, pki: PKI) -> None:
    """Attack: lock a known login out by guessing its password from another address (DoS via the per-user limit)."""
    usual = tls_client(auth_proxy, pki, source="127.0.0.1")
    assert usual.command(auth_plain("app1", "app1-password")) == AUTH_OK
    usual.close()
    for _ in range(4):
        guesser = tls_client(auth_proxy, pki, source="127.0.0.5")
        for _ in range(3):
            guesser.command(auth_plain("app1", "guess"))
        guesser.close()
    # The user name is now throttled for addresses it never logged in from...
    stranger = tls_client(auth_proxy, pki, source="127.0.0.6")
    assert stranger.command(auth_plain("app1", "app1-password")) == THROTTLED
    stranger.close()
    # ...but not for the one it uses.
    usual = tls_client(auth_proxy, pki, source="127.0.0.1")
    assert usual.command(auth_plain("app1", "app1-password")) == AUTH_OK
    usual.close()
