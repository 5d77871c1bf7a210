"""SMTPUTF8 (RFC 6531) end to end: smtplib -> relayproxy -> an upstream that offers SMTPUTF8 (aiosmtpd),
one that does not (the scripted upstream), and Microsoft Graph (the stand-in), with the log lines
an operator reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import ProxyFactory, UpstreamFactory
from graph_standin import GraphStandIn
from harness import CLIENT_USER, PKI, Smarthost, fields_of, login, smarthost_upstream
from peers import ScriptedUpstream

from relayproxy.smtp.reply import Catalogue, Reply

SENDER = "j\u00f6rg@b\u00fccher.example"
RECIPIENT = "\u7528\u6237@\u4f8b\u3048.\u30c6\u30b9\u30c8"
MESSAGE = (
    f"From: J\u00f6rg <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: Gr\u00fc\u00dfe\r\n\r\nSch\u00f6ne Gr\u00fc\u00dfe\r\n"
).encode("utf-8")


def status(reply: Reply) -> tuple[int, bytes]:
    """``reply`` as smtplib returns it."""
    return reply.code, reply.to_bytes()[4:].rstrip(b"\r\n")


def test_utf8_addresses_and_header_arrive_as_written(make_proxy: ProxyFactory, smarthost: Smarthost, pki: PKI) -> None:
    proxy = make_proxy(smarthost_upstream(smarthost, pki))
    with login(proxy.port, pki) as smtp:
        assert smtp.has_extn("smtputf8")
        refused = smtp.sendmail(SENDER, [RECIPIENT, "bob@xn--bcher-kva.example"], MESSAGE, mail_options=["SMTPUTF8"])
    assert refused == {}
    [got] = smarthost.received
    assert got.mail_from == SENDER
    assert got.rcpt_tos == [RECIPIENT, "bob@xn--bcher-kva.example"]
    assert "SMTPUTF8" in got.mail_options
    assert got.content == MESSAGE


def test_allowed_senders_compare_idna_normalised_domains(make_proxy: ProxyFactory, smarthost: Smarthost, pki: PKI) -> None:
    # The entry in U-labels; the envelope in A-labels, the header From in U-labels: one domain.
    proxy = make_proxy(smarthost_upstream(smarthost, pki), extra=f'[users.{CLIENT_USER}]\nallowed_senders = ["@B\u00fccher.example"]\n')
    header = "From: Anna <anna@b\u00fccher.example>\r\nSubject: ok\r\n\r\nok\r\n".encode("utf-8")
    foreign = "From: Anna <anna@bucher.example>\r\nSubject: no\r\n\r\nno\r\n".encode("utf-8")
    with login(proxy.port, pki) as smtp:
        assert smtp.sendmail("anna@xn--bcher-kva.example", ["bob@example.net"], header, mail_options=["SMTPUTF8"]) == {}
        assert smtp.mail("anna@bucher.example") == status(Catalogue.sender_not_owned(CLIENT_USER))
        smtp.rset()
        smtp.mail("anna@B\u00dcCHER.example", ["SMTPUTF8"])
        smtp.rcpt("bob@example.net")
        assert smtp.data(foreign) == status(Catalogue.header_sender_not_owned(CLIENT_USER))
    [got] = smarthost.received
    assert got.mail_from == "anna@xn--bcher-kva.example" and got.content == header


def test_refused_for_an_upstream_without_smtputf8(
    make_proxy: ProxyFactory, upstream: ScriptedUpstream, pki: PKI, events: list[dict[str, Any]]
) -> None:
    proxy = make_proxy(upstream.toml())
    with login(proxy.port, pki) as smtp:
        refusal = status(Catalogue.upstream_no_smtputf8("default"))
        assert refusal == (553, b"5.6.7 Upstream default does not support international addresses (SMTPUTF8)")
        assert smtp.mail(SENDER, ["SMTPUTF8"]) == refusal
        # ASCII addresses too: the header may be UTF-8, and it cannot be downgraded.
        assert smtp.mail("app1@example.org", ["SMTPUTF8"]) == refusal
        assert smtp.sendmail("app1@example.org", ["bob@example.net"], b"Subject: ascii\r\n\r\nok\r\n") == {}
    assert [line for line in upstream.commands if line.startswith(b"MAIL")] == [b"MAIL FROM:<app1@example.org> SIZE=22"]
    refused = fields_of(events, "refused")
    assert [r["command"] for r in refused] == ["MAIL", "MAIL"]
    assert refused[0]["hint"].startswith("upstream default does not support international addresses (no SMTPUTF8)")


def test_a_scripted_upstream_that_offers_smtputf8_gets_it(make_upstream: UpstreamFactory, make_proxy: ProxyFactory, pki: PKI) -> None:
    upstream = make_upstream({"EHLO": b"250-scripted.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"})
    proxy = make_proxy(upstream.toml())
    with login(proxy.port, pki) as smtp:
        assert smtp.sendmail(SENDER, [RECIPIENT], MESSAGE, mail_options=["SMTPUTF8"]) == {}
    assert f"MAIL FROM:<{SENDER}> SMTPUTF8".encode("utf-8") in upstream.commands
    assert f"RCPT TO:<{RECIPIENT}>".encode("utf-8") in upstream.commands


def test_a_utf8_address_without_smtputf8_is_told_to_use_it(
    make_proxy: ProxyFactory, upstream: ScriptedUpstream, pki: PKI, events: list[dict[str, Any]]
) -> None:
    proxy = make_proxy(upstream.toml())
    with login(proxy.port, pki) as smtp:
        smtp.command_encoding = "utf-8"  # smtplib encodes UTF-8 only once asked for SMTPUTF8
        assert smtp.mail(SENDER) == (553, b"5.6.7 Non-ASCII address needs the SMTPUTF8 parameter of MAIL FROM")
        assert smtp.mail("app1@example.org")[0] == 250
        assert smtp.rcpt(RECIPIENT) == status(Catalogue.NEEDS_SMTPUTF8)
    [mail, rcpt] = fields_of(events, "refused")
    assert (mail["command"], rcpt["command"]) == ("MAIL", "RCPT")
    assert "SMTPUTF8" in mail["hint"] and "CRLF" not in mail["hint"]
    # The log line shows what the client sent; a reply never does.
    assert SENDER not in mail["reply"]


def test_graph_refuses_smtputf8(make_proxy: ProxyFactory, graph: GraphStandIn, tmp_path: Path, pki: PKI) -> None:
    # Graph documents no UTF-8 header (RFC 6532) in sendMail's MIME: refused at MAIL, before a token.
    proxy = make_proxy(graph.upstream_toml(tmp_path), extra=f'[users.{CLIENT_USER}]\nupstream = "m365"\n')
    with login(proxy.port, pki) as smtp:
        assert smtp.mail(SENDER, ["SMTPUTF8"]) == status(Catalogue.graph_no_smtputf8("m365"))
        assert smtp.rcpt("bob@example.net") == status(Catalogue.MAIL_FIRST)
        assert smtp.mail("alerts@example.org")[0] == 250
    assert graph.deliveries == []

