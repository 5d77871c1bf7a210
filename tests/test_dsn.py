"""The spool's delivery status notification, read as a mail client would: Python's email package."""

from __future__ import annotations

import email
import email.policy
import secrets
from email.message import EmailMessage
from typing import Any

import pytest

from relayproxy.spool.dsn import Failure, notification

ARRIVAL = 1_700_000_000.0
NOW = ARRIVAL + 5 * 86400 + 42
HEADER = b"From: App <app@example.org>\r\nTo: bob@example.net, carol@example.org\r\nSubject: Monthly report\r\n"
REFUSED = Failure("bob@example.net", "5.1.1", "550 5.1.1 <bob@example.net>: no such user", "smtp.example.com")
TIMED_OUT = Failure("carol@example.org", "4.4.7", None, "smtp.example.com")


def compose(**changes: Any) -> bytes:
    arguments: dict[str, Any] = dict(
        reporting_host="relay.example.org",
        sender="app@example.org",
        spool_id="01HF3Q8Z2K",
        arrival=ARRIVAL,
        now=NOW,
        failures=[REFUSED, TIMED_OUT],
        expired=True,
        original_header=HEADER,
    )
    return notification(**(arguments | changes))


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def parts(message: EmailMessage) -> list[EmailMessage]:
    """A multipart's parts, or the message a message/* part holds (as a list of one)."""
    payload = message.get_payload()
    assert isinstance(payload, list)
    return [part for part in payload if isinstance(part, EmailMessage)]


def status_groups(data: bytes) -> list[EmailMessage]:
    """The per-message fields, then one group per recipient."""
    return parts(parts(parse(data))[1])


def test_a_multipart_report_from_the_mailer_daemon_to_the_sender() -> None:
    message = parse(compose())
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert [part.get_content_type() for part in parts(message)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert message["From"] == "Mail Delivery System <MAILER-DAEMON@relay.example.org>"
    assert message["To"] == "app@example.org"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert message["Date"].datetime.timestamp() == int(NOW)
    assert message["Message-ID"].startswith("<01HF3Q8Z2K.")
    assert message["Message-ID"].endswith("@relay.example.org>")
    assert parse(compose())["Message-ID"] != message["Message-ID"]


def test_the_report_has_per_message_then_per_recipient_fields() -> None:
    per_message, refused, timed_out = status_groups(compose())
    assert dict(per_message.items()) == {
        "Reporting-MTA": "dns; relay.example.org",
        "X-Relayproxy-Spool-Id": "01HF3Q8Z2K",
        "Arrival-Date": "Tue, 14 Nov 2023 22:13:20 +0000",
    }
    last_attempt = "Sun, 19 Nov 2023 22:14:02 +0000"
    assert dict(refused.items()) == {
        "Final-Recipient": "rfc822; bob@example.net",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; smtp.example.com",
        "Diagnostic-Code": "smtp; 550 5.1.1 <bob@example.net>: no such user",
        "Last-Attempt-Date": last_attempt,
    }
    assert dict(timed_out.items()) == {
        "Final-Recipient": "rfc822; carol@example.org",
        "Action": "failed",
        "Status": "4.4.7",
        "Remote-MTA": "dns; smtp.example.com",
        "Last-Attempt-Date": last_attempt,
    }


def test_unknown_remote_and_diagnostic_are_left_out() -> None:
    _, group = status_groups(compose(failures=[Failure("carol@example.org", "4.4.7", None, None)]))
    assert "Remote-MTA" not in group and "Diagnostic-Code" not in group


def test_the_text_says_who_failed_why_and_for_how_long() -> None:
    text = parts(parse(compose()))[0]
    assert text.get_content_charset() == "us-ascii"
    content = text.get_content()
    assert "<bob@example.net>: refused (status 5.1.1)" in content
    assert "smtp.example.com replied: 550 5.1.1 <bob@example.net>: no such user" in content
    assert "<carol@example.org>: not delivered within 5 days (status 4.4.7)" in content
    assert "kept it for 5 days and has now given up" in content
    assert "01HF3Q8Z2K" in content


def test_a_refusal_does_not_speak_of_giving_up() -> None:
    content = parts(parse(compose(failures=[REFUSED], expired=False)))[0].get_content()
    assert "<bob@example.net>: refused (status 5.1.1)" in content
    assert "given up" not in content and "carol" not in content


def test_the_original_header_is_the_third_part() -> None:
    assert parts(parse(compose()))[2].get_content() == HEADER.decode()


def test_crlf_everywhere() -> None:
    data = compose()
    assert data.endswith(b"\r\n")
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")


def test_a_long_diagnostic_is_folded_within_998_octets() -> None:
    words = " ".join(f"word{i}" for i in range(200))
    diagnostic = f"550 5.7.1 {words} {'x' * 2000}"
    data = compose(failures=[Failure("bob@example.net", "5.7.1", diagnostic, "smtp.example.com")], expired=False)
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    _, group = status_groups(data)
    unfolded = group["Diagnostic-Code"]
    # The run without spaces had to be cut: unfolding leaves a space at each cut.
    assert unfolded.startswith(f"smtp; 550 5.7.1 {words} x")
    assert unfolded.replace(" ", "").endswith("x" * 2000)


def test_control_characters_and_8bit_text_of_an_upstream_stay_out_of_the_fields() -> None:
    diagnostic = "550 refused\r\nInjected: yes\x1b[31m caf\u00e9"
    data = compose(failures=[Failure("bob@example.net", "5.7.1", diagnostic, "mx\r\nX: y")], expired=False)
    assert data.isascii()
    _, group = status_groups(data)
    assert "Injected" not in group and "X" not in group
    assert group["Diagnostic-Code"] == "smtp; 550 refused Injected: yes [31m caf\\xe9"
    assert group["Remote-MTA"] == "dns; mx X: y"


def test_the_boundary_never_occurs_in_the_embedded_header(monkeypatch: pytest.MonkeyPatch) -> None:
    # The first random tokens are ones the original header happens to hold, as if by chance.
    tokens = iter(["0" * 24] * 3)
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(tokens, "1" * 24))
    header = HEADER + b"X-Trap: --=_" + b"0" * 24 + b"\r\n"
    message = parse(compose(original_header=header))
    boundary = message.get_boundary()
    assert boundary is not None and boundary.encode() not in header
    assert parts(message)[2].get_content() == header.decode()


def test_a_cut_short_header_still_ends_its_lines_and_keeps_them_within_998_octets() -> None:
    header = b"Subject: hi\r\n\r\nX-Long: " + b"y" * 1500 + b"\r\nReceived: from a\r"
    data = compose(original_header=header)
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    assert b"\r" not in data.replace(b"\r\n", b"")
    embedded = email.message_from_string(parts(parse(data))[2].get_content(), policy=email.policy.default)
    assert embedded["Subject"] == "hi"
    assert embedded["X-Long"].replace(" ", "") == "y" * 1500
    assert embedded["Received"] == "from a"


def test_an_smtputf8_message_gets_the_international_form() -> None:
    header = "From: Jörg <jörg@bücher.example>\r\nSubject: Bücher\r\n".encode()
    data = compose(
        sender="jörg@bücher.example",
        failures=[Failure("anna@bücher.example", "5.1.1", "550 5.1.1 no such user", "mx.example.net"), TIMED_OUT],
        original_header=header,
        smtputf8=True,
    )
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    message = parse(data)
    assert message.get_param("report-type") == "delivery-status"
    text, report, original = parts(message)
    assert [text.get_content_type(), report.get_content_type(), original.get_content_type()] == [
        "text/plain",
        "message/global-delivery-status",
        "message/global-headers",
    ]
    assert message["To"] == "jörg@bücher.example"
    assert text.get_content_charset() == "utf-8"
    assert "<anna@bücher.example>: refused (status 5.1.1)" in text.get_content()
    # The email package reads a message/global-* part as a message: the per-message fields become
    # its header and the recipients' groups its body.
    (per_message,) = parts(report)
    assert per_message["Reporting-MTA"] == "dns; relay.example.org"
    body = per_message.get_payload(decode=True)
    assert isinstance(body, bytes)
    groups = [email.message_from_string(group) for group in body.decode().split("\r\n\r\n")]
    assert [group["Final-Recipient"] for group in groups] == ["utf-8; anna@bücher.example", "rfc822; carol@example.org"]
    assert groups[0]["Status"] == "5.1.1"
    (embedded,) = parts(original)
    assert embedded["From"] == "Jörg <jörg@bücher.example>"
    assert embedded["Subject"] == "Bücher"


@pytest.mark.parametrize(
    "changes",
    [
        {"failures": []},
        {"sender": ""},
        {"sender": "app@example.org\r\nBcc: victim@example.net"},
        {"failures": [Failure("anna@bücher.example", "5.1.1", None, None)]},
        {"expired": False},
        {"reporting_host": "relay example.org"},
        {"spool_id": "a b"},
    ],
    ids=["no failure", "null sender", "injection", "utf-8 without smtputf8", "4.x.x not expired", "host", "spool id"],
)
def test_what_cannot_be_written_as_given_is_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        compose(**changes)


@pytest.mark.parametrize("status", ["2.0.0", "5.1", "550", "5.1.1 "])
def test_a_failure_has_a_failure_status(status: str) -> None:
    with pytest.raises(ValueError):
        Failure("bob@example.net", status, None, None)


def test_an_upstream_that_sends_only_as_its_mailbox_gets_that_as_the_author() -> None:
    message = parse(compose(author="Mail Delivery System <alerts@example.org>"))
    assert message["From"] == "Mail Delivery System <alerts@example.org>"
    with pytest.raises(ValueError):
        compose(author="two\r\nlines")
