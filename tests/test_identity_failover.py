"""Per-upstream identity rules (envelope_from, header_from) and failover across hosts."""

from __future__ import annotations

import smtplib
from pathlib import Path

from conftest import ProxyFactory, SmarthostFactory, UpstreamFactory
from harness import CLIENT_PASSWORD, CLIENT_USER, PKI, UPSTREAM_USER, Proxy, free_port


def send(proxy: Proxy, pki: PKI, message: bytes, sender: str = "app1@example.org") -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", proxy.port, timeout=20) as smtp:
        smtp.starttls(context=pki.client_context())
        smtp.login(CLIENT_USER, CLIENT_PASSWORD)
        code, text = smtp.mail(sender)
        if code != 250:
            return code, text
        smtp.rcpt("bob@example.net")
        return smtp.data(message)


def upstream(pki: PKI, hosts: list[str], extra: str = "", tls: str = "starttls") -> str:
    listed = ", ".join(f'"{h}"' for h in hosts)
    credentials = (
        f'username = "{UPSTREAM_USER}"\npassword_env = "RELAYPROXY_TEST_UPSTREAM_PASSWORD"\nca_file = "{pki.ca_path}"\n'
        if tls != "none"
        else ""
    )
    return f"[upstream.default]\nhosts = [{listed}]\ntls = \"{tls}\"\n{credentials}connect_timeout = 5\n{extra}"


def test_envelope_and_header_from_are_rewritten(make_proxy: ProxyFactory, make_smarthost: SmarthostFactory, pki: PKI) -> None:
    smarthost = make_smarthost()
    proxy = make_proxy(upstream(
        pki, [f"localhost:{smarthost.port}"],
        'envelope_from = "alerts@example.com"\nheader_from = "Alerts <alerts@example.com>"\n',
    ))
    message = b"From: Printer <printer@example.org>\r\nSubject: scan\r\n\r\nFrom: this is body text\r\n"
    assert send(proxy, pki, message) == (250, b"2.0.0 Ok: queued as TEST1")
    [got] = smarthost.received
    assert got.mail_from == "alerts@example.com"
    assert got.content == (
        b"From: Alerts <alerts@example.com>\r\nReply-To: Printer <printer@example.org>\r\n"
        b"Subject: scan\r\n\r\nFrom: this is body text\r\n"
    )


def test_over_long_header_block_is_refused(make_proxy: ProxyFactory, make_smarthost: SmarthostFactory, pki: PKI) -> None:
    smarthost = make_smarthost()
    proxy = make_proxy(
        upstream(pki, [f"localhost:{smarthost.port}"], 'header_from = "Alerts <alerts@example.com>"\n'),
        extra="[limits]\nmax_header_size = 1024\n",
    )
    headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"y" * 60) for i in range(40))
    assert send(proxy, pki, headers + b"\r\nbody\r\n") == (552, b"5.3.4 Message header block too big to check or rewrite the From")
    assert smarthost.received == []


def test_failover_when_the_first_host_is_down(make_proxy: ProxyFactory, make_smarthost: SmarthostFactory, pki: PKI) -> None:
    smarthost = make_smarthost()
    proxy = make_proxy(upstream(pki, [f"localhost:{free_port()}", f"localhost:{smarthost.port}"]))
    assert send(proxy, pki, b"Subject: failover\r\n\r\nhi\r\n") == (250, b"2.0.0 Ok: queued as TEST1")
    assert len(smarthost.received) == 1


def test_failover_when_the_first_host_answers_4xx(make_proxy: ProxyFactory, make_upstream: UpstreamFactory, pki: PKI) -> None:
    busy = make_upstream({"greeting": b"421 4.3.2 busy, try another\r\n"})
    good = make_upstream()
    proxy = make_proxy(upstream(pki, [f"127.0.0.1:{busy.port}", f"127.0.0.1:{good.port}"], tls="none"))
    assert send(proxy, pki, b"Subject: failover\r\n\r\nhi\r\n") == (250, b"2.0.0 Ok: queued as REC1")
    assert b"MAIL FROM:<app1@example.org>" not in busy.data
    assert b"MAIL FROM:<app1@example.org>" in good.data


def test_refused_credentials_go_back_to_the_client(make_proxy: ProxyFactory, make_smarthost: SmarthostFactory, pki: PKI) -> None:
    wrong = make_smarthost(password="rotated-elsewhere")
    second = make_smarthost()
    proxy = make_proxy(upstream(pki, [f"localhost:{wrong.port}", f"localhost:{second.port}"]))
    assert send(proxy, pki, b"Subject: x\r\n\r\nhi\r\n") == (
        454, b"4.7.0 Upstream default refused the relay's credentials, try again later"
    )
    # Another host of the same account would refuse the same secret; trying it risks a lockout.
    assert second.auth_attempts == []


def test_all_hosts_down(make_proxy: ProxyFactory, pki: PKI, tmp_path: Path) -> None:
    proxy = make_proxy(upstream(pki, [f"localhost:{free_port()}", f"localhost:{free_port()}"]))
    assert send(proxy, pki, b"Subject: x\r\n\r\nhi\r\n") == (451, b"4.4.1 Upstream default unreachable, try again later")
