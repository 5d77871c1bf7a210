"""The header From rewriter: only the header block is held, and it is bounded."""

from __future__ import annotations

import pytest

from relayproxy.smtp.headers import FromRewriter, HeaderTooLong

NEW_FROM = "Alerts <alerts@example.org>"


def rewrite(message: bytes, step: int | None = None, max_header: int = 4096) -> bytes:
    rewriter = FromRewriter(NEW_FROM, max_header)
    chunks = [message] if step is None else [message[i : i + step] for i in range(0, len(message), step)]
    return b"".join(rewriter.feed(c) for c in chunks) + rewriter.finish()


@pytest.mark.parametrize("step", [None, 1, 3, 7])
def test_from_replaced_and_kept_as_reply_to(step: int | None) -> None:
    message = b"Subject: hi\r\nFrom: App\r\n <app@y.example>\r\nTo: b@c.example\r\n\r\nFrom: not a header\r\n"
    assert rewrite(message, step) == (
        b"Subject: hi\r\nFrom: Alerts <alerts@example.org>\r\nReply-To: App\r\n <app@y.example>\r\n"
        b"To: b@c.example\r\n\r\nFrom: not a header\r\n"
    )


def test_existing_reply_to_is_kept() -> None:
    message = b"Reply-To: keep@z.example\r\nfrom:  app@y.example\r\n\r\nbody\r\n"
    assert rewrite(message) == b"Reply-To: keep@z.example\r\nFrom: Alerts <alerts@example.org>\r\n\r\nbody\r\n"


def test_message_without_from_gets_one() -> None:
    assert rewrite(b"Subject: x\r\n\r\nbody\r\n") == b"From: Alerts <alerts@example.org>\r\nSubject: x\r\n\r\nbody\r\n"


def test_message_without_header_block() -> None:
    assert rewrite(b"\r\nbody\r\n") == b"From: Alerts <alerts@example.org>\r\n\r\nbody\r\n"


def test_second_from_is_dropped() -> None:
    assert rewrite(b"From: a@a.example\r\nFrom: b@b.example\r\n\r\nx\r\n") == (
        b"From: Alerts <alerts@example.org>\r\nReply-To: a@a.example\r\n\r\nx\r\n"
    )


def test_body_streams_after_the_header() -> None:
    rewriter = FromRewriter(NEW_FROM, 100)
    assert rewriter.feed(b"From: a@a.example\r\n") == b""
    assert rewriter.feed(b"\r\nline 1\r\n").endswith(b"\r\nline 1\r\n")
    big = b"x" * 1000 + b"\r\n"
    assert rewriter.feed(big) == big


def test_over_long_header_block_is_refused() -> None:
    rewriter = FromRewriter(NEW_FROM, 100)
    with pytest.raises(HeaderTooLong):
        for _ in range(20):
            rewriter.feed(b"X-Filler: " + b"y" * 20 + b"\r\n")
