"""Messages for Microsoft Graph: dot-stuffing undone, recipients fitted to the envelope, answers mapped."""

from __future__ import annotations

import json

import pytest

from relayproxy.graphmail import Unstuffer, fit_recipients, verdict
from relayproxy.smtp.reply import Catalogue, Reply


def test_unstuffing_across_chunks() -> None:
    unstuffer = Unstuffer()
    pieces = [b"..first\r\n", b"..second\r\nplain\r\n..", b"third\r\nx..y\r\n"]
    # A chunk that ends inside a line: the dots at its start are not a line's.
    assert b"".join(unstuffer.feed(p) for p in pieces) == b".first\r\n.second\r\nplain\r\n.third\r\nx..y\r\n"


def test_unstuffing_keeps_a_dot_that_is_not_at_a_line_start() -> None:
    unstuffer = Unstuffer()
    assert unstuffer.feed(b"abc") + unstuffer.feed(b"..def\r\n") == b"abc..def\r\n"


MESSAGE = (
    b"From: Scanner <scanner@example.org>\r\n"
    b"To: Alice <alice@example.net>, mallory@example.net\r\n"
    b"Cc: bob@example.net\r\n"
    b"Bcc: secret@example.net\r\n"
    b"Subject: scan\r\n\r\nbody\r\nTo: not a header\r\n"
)


def test_only_envelope_recipients_remain_and_the_rest_are_bcc() -> None:
    fitted = fit_recipients(MESSAGE, ["alice@example.net", "bob@example.net", "carol@example.net"])
    assert fitted == (
        b"From: Scanner <scanner@example.org>\r\n"
        b'To: "Alice" <alice@example.net>\r\n'
        b"Cc: bob@example.net\r\n"
        b"Subject: scan\r\n"
        b"Bcc: carol@example.net\r\n\r\nbody\r\nTo: not a header\r\n"
    )


def test_a_field_left_without_recipients_goes() -> None:
    fitted = fit_recipients(MESSAGE, ["alice@example.net"])
    assert b"Cc:" not in fitted and b"mallory" not in fitted and b"Bcc" not in fitted


def test_recipients_compare_without_case_and_a_folded_field_is_read_whole() -> None:
    message = b"To: A <Alice@Example.NET>,\r\n\tB <b@example.net>\r\nSubject: x\r\n\r\nbody\r\n"
    assert fit_recipients(message, ["alice@example.net", "b@example.net"]).startswith(
        b'To: "A" <Alice@Example.NET>, "B" <b@example.net>\r\nSubject: x\r\n'
    )


def error(code: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": "..."}}).encode()


@pytest.mark.parametrize(
    "status,headers,body,expected",
    [
        (202, {"request-id": "8c1e-42"}, b"", Catalogue.graph_accepted("8c1e-42")),
        (429, {"retry-after": "12"}, error("ApplicationThrottled"), Catalogue.graph_throttled("m365", 12)),
        (503, {"retry-after": "30"}, b"", Catalogue.graph_unavailable("m365", 503, 30)),
        (504, {}, b"", Catalogue.graph_unavailable("m365", 504, None)),
        (403, {}, error("ErrorSendAsDenied"), Catalogue.graph_send_as_denied("m365")),
        (403, {}, error("ErrorAccessDenied"), Catalogue.graph_access_denied("m365")),
        (403, {}, b"not json", Catalogue.graph_access_denied("m365")),
        (400, {}, error("ErrorInvalidRecipients"), Catalogue.GRAPH_INVALID_RECIPIENTS),
        (413, {}, b"", Catalogue.MESSAGE_TOO_BIG),
        (400, {}, error("ErrorMimeContentInvalid"), Catalogue.graph_refused("m365", 400, "ErrorMimeContentInvalid")),
    ],
)
def test_graph_answers_as_smtp_replies(status: int, headers: dict[str, str], body: bytes, expected: Reply) -> None:
    assert verdict(status, headers, body, "m365") == expected
    # Never 250 unless Graph said 202.
    assert verdict(status, headers, body, "m365").is_positive == (status == 202)
