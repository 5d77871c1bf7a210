"""The spool through the in-process proxy: delivery = "spool" and "relay-then-spool", retries,
notifications, write failures, corrupt files.

The upstream is aiosmtpd (tests/harness.py Smarthost); the client smtplib; what is asserted is what
the client heard, what the upstream received, and what is left in the spool directory.
"""

from __future__ import annotations

import email
import email.policy
import errno
import json
import smtplib
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import PKI, Proxy, Smarthost, fields_of, free_port, login, smarthost_upstream, start_proxy, wait_for, write_config
from relayproxy.spool.store import Spool

MESSAGE = b"From: app1@example.org\r\nSubject: scan\r\nMessage-ID: <scan-1@example.org>\r\n\r\nthe scan\r\n.leading dot\r\n"
FAST = "max_age = 30\nretry_initial = 0.2\nretry_max = 0.4\nscan_interval = 0.1\n"


def spool_config(tmp_path: Path, pki: PKI, smarthost: Smarthost, delivery: str, spool: str = FAST) -> tuple[Path, tuple[int, int, int]]:
    extra = f'[users.app1]\ndelivery = "{delivery}"\n\n[spool]\ndirectory = "{tmp_path / "spool"}"\n{spool}'
    return write_config(tmp_path, pki, smarthost_upstream(smarthost, pki), extra=extra)


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[Proxy]]:
    proxies: list[Proxy] = []
    yield proxies
    for proxy in proxies:
        proxy.stop()


def run(config: tuple[Path, tuple[int, int, int]], started: list[Proxy]) -> Proxy:
    proxy = start_proxy(*config)
    started.append(proxy)
    return proxy


def send(proxy: Proxy, pki: PKI, recipients: tuple[str, ...] = ("bob@example.net",), message: bytes = MESSAGE) -> tuple[int, bytes]:
    with login(proxy.port, pki) as smtp:
        smtp.mail("app1@example.org")
        for recipient in recipients:
            code, text = smtp.rcpt(recipient)
            assert code == 250, (code, text)
        smtp.putcmd("data")
        code, text = smtp.getreply()
        assert code == 354
        smtp.send(message.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        return smtp.getreply()


def queued(tmp_path: Path, folder: str = "queue") -> list[dict[str, Any]]:
    """The envelopes in the folder now (one delivered while they are read is left out)."""
    found = []
    for path in sorted((tmp_path / "spool" / folder).glob("*.env")):
        try:
            found.append(json.loads(path.read_bytes()))
        except FileNotFoundError:
            pass
    return found


def test_spool_answers_250_once_on_disk_then_delivers_once(tmp_path: Path, pki: PKI, smarthost: Smarthost, started: list[Proxy]) -> None:
    smarthost.data_reply = "451 4.3.0 not now"
    proxy = run(spool_config(tmp_path, pki, smarthost, "spool"), started)
    code, text = send(proxy, pki)
    assert code == 250 and text.startswith(b"2.0.0 Ok: queued as ") and text.endswith(b" (spooled)")
    spool_id = text.split()[4].decode()
    (envelope,) = queued(tmp_path)
    assert envelope["id"] == spool_id and envelope["recipients"] == ["bob@example.net"] and envelope["user"] == "app1"
    assert envelope["sender"] == "app1@example.org" and envelope["upstream"] == "default"
    assert envelope["message_id"] == "<scan-1@example.org>"
    for path in (tmp_path / "spool" / "queue").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "spool").stat().st_mode) == 0o700
    wait_for(lambda: any(e["attempts"] >= 1 for e in queued(tmp_path)))
    assert queued(tmp_path)[0]["last_error"].startswith("451 4.3.0 not now")
    smarthost.data_reply = None
    wait_for(lambda: not queued(tmp_path))
    assert [(m.mail_from, m.rcpt_tos, m.content) for m in smarthost.received] == [("app1@example.org", ["bob@example.net"], MESSAGE)]


@pytest.mark.parametrize("delivery", ["spool", "relay-then-spool"])
def test_the_upstream_down_then_up_gets_the_message_once(tmp_path: Path, pki: PKI, started: list[Proxy], delivery: str) -> None:
    later = Smarthost(pki, port=free_port())
    proxy = run(spool_config(tmp_path, pki, later, delivery), started)
    code, text = send(proxy, pki)
    assert code == 250 and text.endswith(b"(spooled)")
    wait_for(lambda: any(e["attempts"] >= 2 for e in queued(tmp_path)))
    later.start()
    try:
        wait_for(lambda: not queued(tmp_path))
        assert [m.content for m in later.received] == [MESSAGE]
    finally:
        later.stop()


def test_relay_then_spool_relays_when_the_upstream_takes_it(tmp_path: Path, pki: PKI, smarthost: Smarthost, started: list[Proxy]) -> None:
    proxy = run(spool_config(tmp_path, pki, smarthost, "relay-then-spool"), started)
    assert send(proxy, pki) == (250, b"2.0.0 Ok: queued as TEST1")
    assert [m.content for m in smarthost.received] == [MESSAGE]
    assert queued(tmp_path) == [] and list((tmp_path / "spool" / "tmp").iterdir()) == []


@pytest.mark.parametrize("step", ["mail", "data-end"])
def test_relay_then_spool_spools_on_a_4xx(tmp_path: Path, pki: PKI, smarthost: Smarthost, started: list[Proxy], step: str) -> None:
    if step == "mail":
        smarthost.mail_reply = "421 4.7.0 Try again later"
    else:
        smarthost.data_reply = "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"
    proxy = run(spool_config(tmp_path, pki, smarthost, "relay-then-spool"), started)
    code, text = send(proxy, pki)
    assert code == 250 and text.endswith(b"(spooled)")
    (envelope,) = queued(tmp_path)
    assert envelope["attempts"] == 1 and envelope["last_error"]
    smarthost.mail_reply = smarthost.data_reply = None
    wait_for(lambda: not queued(tmp_path))
    assert [m.content for m in smarthost.received] == [MESSAGE]


def test_relay_then_spool_passes_a_5xx_and_spools_only_the_deferred_recipient(
    tmp_path: Path, pki: PKI, smarthost: Smarthost, started: list[Proxy]
) -> None:
    smarthost.rcpt_replies = {"gone@example.net": "550 5.1.1 No such user", "busy@example.net": "450 4.2.1 Mailbox busy"}
    proxy = run(spool_config(tmp_path, pki, smarthost, "relay-then-spool"), started)
    with login(proxy.port, pki) as smtp:
        smtp.mail("app1@example.org")
        assert smtp.rcpt("gone@example.net") == (550, b"5.1.1 No such user")
        assert smtp.rcpt("bob@example.net")[0] == 250
        assert smtp.rcpt("busy@example.net") == (250, b"2.1.5 Ok")
        code, text = smtp.data(b"Subject: two\r\n\r\nx\r\n")
    assert (code, text) == (250, b"2.0.0 Ok: queued as TEST1")
    assert [m.rcpt_tos for m in smarthost.received] == [["bob@example.net"]]
    (envelope,) = queued(tmp_path)
    assert envelope["pending"] == ["busy@example.net"]
    smarthost.rcpt_replies = {}
    wait_for(lambda: not queued(tmp_path))
    assert [m.rcpt_tos for m in smarthost.received] == [["bob@example.net"], ["busy@example.net"]]


def test_a_5xx_from_the_spool_sends_a_notification_and_keeps_the_message_in_failed(
    tmp_path: Path, pki: PKI, smarthost: Smarthost, started: list[Proxy], events: list[dict[str, Any]]
) -> None:
    smarthost.rcpt_replies = {"gone@example.net": "550 5.1.1 No such user"}
    proxy = run(spool_config(tmp_path, pki, smarthost, "spool"), started)
    assert send(proxy, pki, ("gone@example.net",))[0] == 250
    wait_for(lambda: bool(smarthost.received) and not queued(tmp_path))
    (notice,) = smarthost.received
    assert notice.mail_from == "<>" and notice.rcpt_tos == ["app1@example.org"]
    report = email.message_from_bytes(notice.content, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report" and report.get_param("report-type") == "delivery-status"
    status = notice.content.decode()
    assert "Final-Recipient: rfc822; gone@example.net" in status and "Status: 5.1.1" in status and "550 5.1.1 No such user" in status
    assert "Subject: scan" in status
    (failed,) = queued(tmp_path, "failed")
    assert failed["bounced"] == [["gone@example.net", "550 5.1.1 No such user"]]
    assert fields_of(events, "spool gave up")[0]["id"] == failed["id"]


def test_a_message_past_max_age_is_given_up_with_a_notification(tmp_path: Path, pki: PKI, smarthost: Smarthost, started: list[Proxy]) -> None:
    smarthost.rcpt_replies = {"bob@example.net": "450 4.2.1 Mailbox busy"}
    proxy = run(spool_config(tmp_path, pki, smarthost, "spool", FAST.replace("max_age = 30", "max_age = 0.5")), started)
    assert send(proxy, pki)[0] == 250
    wait_for(lambda: bool(queued(tmp_path, "failed")))
    wait_for(lambda: bool(smarthost.received))
    status = smarthost.received[0].content.decode()
    assert "Action: failed" in status and "Status: 4.4.7" in status and "450 4.2.1 Mailbox busy" in status


@pytest.mark.parametrize(("error", "reply"), [(errno.ENOSPC, (452, b"4.3.1")), (errno.EIO, (451, b"4.3.0"))])
def test_a_write_error_is_a_4xx_and_nothing_is_spooled(
    tmp_path: Path, pki: PKI, smarthost: Smarthost, started: list[Proxy], monkeypatch: pytest.MonkeyPatch, error: int, reply: tuple[int, bytes]
) -> None:
    def fail(self: Spool, text: Any, envelope: Any) -> None:
        raise OSError(error, "faked at the storage boundary")

    monkeypatch.setattr(Spool, "commit", fail)
    proxy = run(spool_config(tmp_path, pki, smarthost, "spool"), started)
    code, text = send(proxy, pki)
    assert (code, text.split()[0]) == reply
    wait_for(lambda: not list((tmp_path / "spool" / "tmp").iterdir()))
    assert queued(tmp_path) == [] and smarthost.received == []


def test_a_corrupt_file_is_moved_aside_and_the_rest_delivered(
    tmp_path: Path, pki: PKI, smarthost: Smarthost, started: list[Proxy], events: list[dict[str, Any]]
) -> None:
    smarthost.data_reply = "451 4.3.0 not yet"
    proxy = run(spool_config(tmp_path, pki, smarthost, "spool"), started)
    assert send(proxy, pki)[0] == 250
    broken = tmp_path / "spool" / "queue" / "018a0b0c0d0e0f-0badf00d"
    broken.with_suffix(".msg").write_bytes(b"Subject: x\r\n\r\n")
    broken.with_suffix(".env").write_bytes(b"{not json")
    smarthost.data_reply = None
    wait_for(lambda: not list((tmp_path / "spool" / "queue").iterdir()))
    assert sorted(p.name for p in (tmp_path / "spool" / "corrupt").iterdir()) == [
        "018a0b0c0d0e0f-0badf00d.env", "018a0b0c0d0e0f-0badf00d.msg", "018a0b0c0d0e0f-0badf00d.why",
    ]
    assert [m.content for m in smarthost.received] == [MESSAGE]
    assert fields_of(events, "spool file corrupt")[0]["file"] == "018a0b0c0d0e0f-0badf00d.env"


def test_a_user_without_spool_delivery_is_relayed_as_before(tmp_path: Path, pki: PKI, smarthost: Smarthost, started: list[Proxy]) -> None:
    smarthost.data_reply = "451 4.3.0 not now"
    proxy = run(spool_config(tmp_path, pki, smarthost, "relay"), started)
    with pytest.raises(smtplib.SMTPDataError) as refused:
        with login(proxy.port, pki) as smtp:
            smtp.sendmail("app1@example.org", ["bob@example.net"], MESSAGE)
    assert refused.value.smtp_code == 451
    assert not (tmp_path / "spool").exists()


def test_graph_through_the_spool_honours_retry_after(make_proxy: Any, graph: Any, tmp_path: Path, pki: PKI) -> None:
    from graph_standin import throttled

    graph.script("sendMail", throttled(2))
    spool = tmp_path / "graph-spool"
    route = f'[users.app1]\nupstream = "m365"\ndelivery = "relay-then-spool"\n\n[spool]\ndirectory = "{spool}"\n{FAST}'
    proxy = make_proxy(graph.upstream_toml(tmp_path), extra=route)
    with login(proxy.port, pki) as smtp:
        smtp.mail("alerts@example.org")
        smtp.rcpt("alice@example.net")
        code, text = smtp.data(b"From: alerts@example.org\r\nTo: alice@example.net\r\nSubject: alert\r\n\r\ndisk full\r\n")
    assert code == 250 and text.endswith(b"(spooled)")
    (envelope,) = [json.loads(p.read_bytes()) for p in (spool / "queue").glob("*.env")]
    # Graph's Retry-After (2 s), not retry_initial (0.2 s), sets the next attempt.
    assert envelope["next_attempt"] - envelope["received"] >= 2
    assert "throttles upstream m365, try again in 2 seconds" in envelope["last_error"]
    wait_for(lambda: bool(graph.deliveries), timeout=15)
    [delivery] = graph.deliveries
    assert delivery.recipients == ["alice@example.net"] and delivery.raw is not None and delivery.raw.endswith(b"disk full\r\n")
    wait_for(lambda: not list((spool / "queue").iterdir()))


def test_a_graph_refusal_is_notified_as_the_mailbox(make_proxy: Any, graph: Any, tmp_path: Path, pki: PKI) -> None:
    from graph_standin import invalid_recipients

    graph.script("sendMail", invalid_recipients())
    spool = tmp_path / "graph-spool"
    route = f'[users.app1]\nupstream = "m365"\ndelivery = "spool"\n\n[spool]\ndirectory = "{spool}"\n{FAST}'
    proxy = make_proxy(graph.upstream_toml(tmp_path), extra=route)
    with login(proxy.port, pki) as smtp:
        smtp.mail("alerts@example.org")
        smtp.rcpt("nobody@example.net")
        assert smtp.data(b"From: alerts@example.org\r\nSubject: alert\r\n\r\ndisk full\r\n")[0] == 250
    wait_for(lambda: bool(graph.deliveries), timeout=15)
    [notice] = graph.deliveries
    assert notice.recipients == ["alerts@example.org"]
    assert notice.message is not None and notice.message["From"] == "Mail Delivery System <alerts@example.org>"
    assert notice.message.get_content_type() == "multipart/report"
    assert [p.name for p in (spool / "failed").glob("*.env")]


def test_memory_does_not_grow_with_the_message(
    tmp_path: Path, pki: PKI, smarthost: Smarthost, started: list[Proxy], monkeypatch: pytest.MonkeyPatch
) -> None:
    from relayproxy.spool import intake

    writes: list[int] = []
    real_write = intake._Writer._write_chunk

    def write_chunk(self: Any, chunk: bytes) -> None:
        writes.append(len(chunk))
        real_write(self, chunk)

    monkeypatch.setattr(intake._Writer, "_write_chunk", write_chunk)
    proxy = run(spool_config(tmp_path, pki, smarthost, "spool"), started)
    big = b"Subject: big scan\r\n\r\n" + (b"z" * 76 + b"\r\n") * 400_000
    assert send(proxy, pki, message=big)[0] == 250
    wait_for(lambda: bool(smarthost.received), timeout=30)
    assert smarthost.received[0].content == big
    # 31 MB went to disk in pieces of at most a little over what the client may have in flight
    # while it is paused.
    assert sum(writes) >= len(big) and max(writes) <= 3 * intake._AHEAD


def test_pacing_spools_what_a_relay_then_spool_client_would_wait_for_and_spool_deliveries_wait(
    tmp_path: Path, pki: PKI, smarthost: Smarthost, started: list[Proxy], events: list[dict[str, Any]]
) -> None:
    path, ports = spool_config(tmp_path, pki, smarthost, "relay-then-spool")
    path.write_text(path.read_text().replace('password_env = "RELAYPROXY_TEST_UPSTREAM_PASSWORD"\n',
                                             'password_env = "RELAYPROXY_TEST_UPSTREAM_PASSWORD"\nmax_messages_per_minute = 2\npacing_timeout = 0.3\n'))
    proxy = run((path, ports), started)
    replies = [send(proxy, pki) for _ in range(3)]
    assert [code for code, _ in replies] == [250, 250, 250]
    assert replies[0][1] == replies[1][1] == b"2.0.0 Ok: queued as TEST1" and replies[2][1].endswith(b"(spooled)")
    (envelope,) = queued(tmp_path)
    assert "max_messages_per_minute" in envelope["last_error"]
    # The spool's delivery is patient: it waits for the minute to pass, neither refused nor deferred.
    wait_for(lambda: bool(fields_of(events, "spool attempt")))
    with pytest.raises(AssertionError):
        wait_for(lambda: len(smarthost.received) > 2 or bool(fields_of(events, "spool delivery")), timeout=1.5)
    assert len(smarthost.received) == 2 and len(queued(tmp_path)) == 1
