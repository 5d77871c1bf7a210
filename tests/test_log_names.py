"""A user name that is not in the users file is logged as a keyed digest, never as typed."""

from __future__ import annotations

import re
import smtplib

import pytest
from harness import CLIENT_USER, PKI, Proxy


def failed_logins(proxy: Proxy, pki: PKI, names: list[str]) -> None:
    smtp = smtplib.SMTP("127.0.0.1", proxy.port, timeout=20)
    smtp.starttls(context=pki.client_context())
    smtp.ehlo()
    for name in names:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            smtp.auth("PLAIN", lambda challenge=None, name=name: f"\0{name}\0not-the-password")
        assert refused.value.smtp_code == 535
        smtp.rset()
    smtp.close()


def auth_failed_users(lines: list[str]) -> list[str]:
    return [m.group(1) for line in lines if (m := re.search(r"auth failed client=\S+ user=(\S+)", line))]


def test_a_password_typed_as_the_user_name_is_not_logged(proxy: Proxy, pki: PKI, log_lines: list[str]) -> None:
    # Two failures per session at most: the third would end it (max_auth_failures_per_session).
    failed_logins(proxy, pki, ["AlicePw-S3cret!x", "AlicePw-S3cret!x"])
    failed_logins(proxy, pki, ["someone-else"])
    users = auth_failed_users(log_lines)
    assert len(users) == 3
    assert not any("S3cret" in line or "someone-else" in line for line in log_lines)
    assert re.fullmatch(r"unknown-[0-9a-f]{10}", users[0])
    # Stable within the run, so repeated guesses still correlate; another name, another digest.
    assert users[0] == users[1] != users[2]


def test_a_known_user_name_is_logged_as_it_is(proxy: Proxy, pki: PKI, log_lines: list[str]) -> None:
    failed_logins(proxy, pki, [CLIENT_USER])
    assert auth_failed_users(log_lines) == [CLIENT_USER]
