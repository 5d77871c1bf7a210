"""A user limited to some senders may not claim another in the header From or Sender either, nor reach
another mailbox through a quoted local part, a percent hack or a bang path under an allowed domain."""

from __future__ import annotations

import pytest
from conftest import ProxyFactory
from harness import CLIENT_USER, PKI, Smarthost, login, smarthost_upstream

SENDERS = f"""
[users.{CLIENT_USER}]
allowed_senders = ["scanner@example.org", "@printers.example.org"]
"""


def send(port: int, pki: PKI, sender: str, header: str) -> tuple[int, bytes]:
    smtp = login(port, pki)
    try:
        smtp.mail(sender)
        smtp.rcpt("bob@example.net")
        code, text = smtp.data(f"{header}\r\nSubject: scan\r\n\r\nscan attached\r\n".encode())
        return code, text
    finally:
        smtp.close()


@pytest.mark.parametrize(
    "header",
    [
        "From: CEO <ceo@example.org>",
        "From: scanner@example.org, ceo@example.org",
        "From: scanner@example.org\r\nSender: ceo@example.org",
        "From: scanner@example.org <ceo@example.org>",
        "From:\r\n ceo@example.org",
        "Subject-only: no From at all",
    ],
    ids=["display-name", "second-author", "sender", "address-as-name", "folded", "no-from"],
)
def test_a_foreign_header_sender_is_refused_and_nothing_is_delivered(
    make_proxy: ProxyFactory, smarthost: Smarthost, pki: PKI, header: str, log_lines: list[str]
) -> None:
    proxy = make_proxy(smarthost_upstream(smarthost, pki), extra=SENDERS)
    code, text = send(proxy.port, pki, "scanner@example.org", header)
    assert (code, text) == (550, b"5.7.1 Header From or Sender address not owned by user app1")
    assert smarthost.received == []
    assert any("outcome=refused" in line and "header sender" in line for line in log_lines)


@pytest.mark.parametrize(
    "header", ["From: Scanner <scanner@example.org>", "From: Floor 2 <floor2@printers.example.org>\r\nSender: scanner@example.org"]
)
def test_allowed_header_senders_are_relayed(make_proxy: ProxyFactory, smarthost: Smarthost, pki: PKI, header: str) -> None:
    proxy = make_proxy(smarthost_upstream(smarthost, pki), extra=SENDERS)
    assert send(proxy.port, pki, "scanner@example.org", header)[0] == 250
    assert [m.content.split(b"\r\n")[0] for m in smarthost.received] == [header.split("\r\n")[0].encode()]


def test_check_header_from_false_leaves_the_header_to_the_app(make_proxy: ProxyFactory, smarthost: Smarthost, pki: PKI) -> None:
    proxy = make_proxy(smarthost_upstream(smarthost, pki), extra=SENDERS + "check_header_from = false\n")
    assert send(proxy.port, pki, "scanner@example.org", "From: CEO <ceo@example.org>")[0] == 250
    assert len(smarthost.received) == 1


@pytest.mark.parametrize(
    "sender", ['"ceo@example.org"@printers.example.org', "ceo%example.org@printers.example.org", "ceo!example.org@printers.example.org"]
)
def test_routed_local_parts_need_an_exact_entry(make_proxy: ProxyFactory, smarthost: Smarthost, pki: PKI, sender: str) -> None:
    proxy = make_proxy(smarthost_upstream(smarthost, pki), extra=SENDERS)
    smtp = login(proxy.port, pki)
    code, text = smtp.mail(sender)
    smtp.close()
    assert (code, text) == (553, b"5.7.1 Sender address not owned by user app1")


def test_a_routed_local_part_listed_exactly_may_be_used(make_proxy: ProxyFactory, smarthost: Smarthost, pki: PKI) -> None:
    extra = f'[users.{CLIENT_USER}]\nallowed_senders = ["ceo%example.org@printers.example.org"]\n'
    proxy = make_proxy(smarthost_upstream(smarthost, pki), extra=extra)
    smtp = login(proxy.port, pki)
    assert smtp.mail("ceo%example.org@printers.example.org")[0] == 250
    smtp.close()
