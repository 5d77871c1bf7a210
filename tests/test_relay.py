"""End to end: smtplib -> relayproxy -> aiosmtpd smarthost with STARTTLS and AUTH, real certificates."""

from __future__ import annotations

import smtplib

import pytest
from harness import CLIENT_PASSWORD, CLIENT_USER, PKI, Proxy, Smarthost

MESSAGE = (
    b"From: app1@example.org\r\nTo: bob@example.net\r\nSubject: hello\r\n\r\n"
    b"first line\r\n.starts with a dot\r\n..two dots\r\n.\r\n\r\nend\r\n"
)


def client(proxy: Proxy, pki: PKI) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", proxy.port, timeout=20)
    smtp.starttls(context=pki.client_context())
    smtp.login(CLIENT_USER, CLIENT_PASSWORD)
    return smtp


def test_message_arrives_byte_for_byte(proxy: Proxy, pki: PKI, smarthost: Smarthost) -> None:
    with client(proxy, pki) as smtp:
        refused = smtp.sendmail("app1@example.org", ["bob@example.net"], MESSAGE)
    assert refused == {}
    [got] = smarthost.received
    assert got.mail_from == "app1@example.org"
    assert got.rcpt_tos == ["bob@example.net"]
    assert got.content == MESSAGE
