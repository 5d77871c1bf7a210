"""Reply: formatting, strict incremental parsing of upstream replies, and the catalogue."""

from __future__ import annotations

import re

import pytest
from catalogue import composed_replies

from relayproxy.smtp.reply import MAX_LINE, Catalogue, Reply, ReplyError, ReplyParser, composed, parse_reply

# -- formatting ---------------------------------------------------------------------------------


def test_single_line_with_enhanced() -> None:
    reply = composed(250, "2.1.0", "Sender OK")
    assert reply.to_bytes() == b"250 2.1.0 Sender OK\r\n"


def test_without_enhanced_code() -> None:
    reply = Reply(220, ("relay.example ESMTP",))
    assert reply.to_bytes() == b"220 relay.example ESMTP\r\n"


def test_multi_line() -> None:
    reply = Reply(250, ("relay.example", "PIPELINING", "SIZE 100"))
    assert reply.to_bytes() == b"250-relay.example\r\n250-PIPELINING\r\n250 SIZE 100\r\n"


def test_multi_line_with_enhanced() -> None:
    reply = Reply(550, ("one", "two"), "5.7.1")
    assert reply.to_bytes() == b"550-5.7.1 one\r\n550 5.7.1 two\r\n"


def test_empty_text() -> None:
    assert Reply(334, ("",)).to_bytes() == b"334 \r\n"


def test_str() -> None:
    assert str(Reply(250, ("a", "b"), "2.0.0")) == "250-2.0.0 a / 250 2.0.0 b"


def test_classification() -> None:
    assert Reply(250, ("x",)).is_positive and Reply(354, ("x",)).is_positive
    assert Reply(451, ("x",)).is_temporary and not Reply(451, ("x",)).is_positive
    assert not Reply(550, ("x",)).is_temporary and not Reply(550, ("x",)).is_positive


@pytest.mark.parametrize(
    "code,lines,enhanced",
    [
        (199, ("x",), None),
        (600, ("x",), None),
        (250, (), None),
        (250, ("x",), "5.0.0"),
        (550, ("x",), "2.0.0"),
        (250, ("x",), "2.0"),
        (250, ("x",), "2.0.1234"),
        (250, ("x",), "2.a.0"),
        (250, ("bad\r\ntext",), None),
        (250, ("esc \x1b[31m",), None),
        (250, ("caf\u00e9",), None),
        (250, ("tab\there",), None),
        (250, ("x" * (MAX_LINE - 5),), None),
    ],
)
def test_invalid_replies_cannot_be_built(code: int, lines: tuple[str, ...], enhanced: str | None) -> None:
    with pytest.raises(ReplyError):
        Reply(code, lines, enhanced)


@pytest.mark.parametrize("enhanced", [None, "2.0.0", "2.123.456"])
def test_every_buildable_reply_fits_in_a_line(enhanced: str | None) -> None:
    """MAX_LINE is the longest reply line we compose, CRLF and any enhanced code included."""
    longest = "x" * (MAX_LINE - 6)
    try:
        reply = Reply(250, (longest, longest), enhanced)
    except ReplyError:
        return
    for line in reply.to_bytes().split(b"\r\n")[:-1]:
        assert len(line) + 2 <= MAX_LINE, f"composed line of {len(line) + 2} octets"


# -- parsing ------------------------------------------------------------------------------------


def feed(lines: list[bytes], max_lines: int = 200) -> Reply | None:
    parser = ReplyParser(max_lines)
    result = None
    for i, line in enumerate(lines):
        result = parser.line(line)
        if i < len(lines) - 1:
            assert result is None
    return result


@pytest.mark.parametrize(
    "lines,expected",
    [
        ([b"250 OK"], Reply(250, ("OK",))),
        ([b"250"], Reply(250, ("",))),
        ([b"250 "], Reply(250, ("",))),
        ([b"354 Go ahead"], Reply(354, ("Go ahead",))),
        ([b"250-a", b"250-b", b"250 c"], Reply(250, ("a", "b", "c"))),
        ([b"250-", b"250 c"], Reply(250, ("", "c"))),
        ([b"550 5.7.1 Relay denied"], Reply(550, ("5.7.1 Relay denied",))),
        ([b"421 4.4.2 bye ~!@#$%^&*()"], Reply(421, ("4.4.2 bye ~!@#$%^&*()",))),
    ],
)
def test_good_replies(lines: list[bytes], expected: Reply) -> None:
    assert feed(lines) == expected


def test_parser_is_reusable() -> None:
    parser = ReplyParser()
    assert parser.line(b"250-a") is None
    assert parser.line(b"250 b") == Reply(250, ("a", "b"))
    assert parser.line(b"354 go") == Reply(354, ("go",))


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"2_5 x",
        b"25",
        b"25 ok",
        b"250x",
        b"250x ok",
        b"250\tok",
        b"ABC ok",
        b" 250 ok",
        b"-250 ok",
        b"+25 ok",
        b"\xd9\xa2\xd9\xa5\xd9\xa0 ok",
        b"199 low",
        b"600 high",
        b"000 zero",
        b"250 caf\xc3\xa9",
        b"250 \xff",
        b"250 \x1b[31mred",
        b"250 nul\x00",
        b"250 bare\rcr",
        b"250 bare\nlf",
        b"250 del\x7f",
        b"250 tab\tx",
        b"250 " + b"x" * (MAX_LINE - 5),
    ],
)
def test_garbage_refused(line: bytes) -> None:
    with pytest.raises(ReplyError):
        ReplyParser().line(line)


def test_longest_line_accepted() -> None:
    line = b"250 " + b"x" * (MAX_LINE - 6)
    assert len(line) + 2 == MAX_LINE
    assert ReplyParser().line(line) == Reply(250, ("x" * (MAX_LINE - 6),))


def test_code_change_mid_reply() -> None:
    parser = ReplyParser()
    parser.line(b"250-first")
    with pytest.raises(ReplyError):
        parser.line(b"550 second")


def test_code_change_in_continuation() -> None:
    parser = ReplyParser()
    parser.line(b"250-first")
    with pytest.raises(ReplyError):
        parser.line(b"251-second")


def test_garbage_in_continuation() -> None:
    parser = ReplyParser()
    parser.line(b"250-first")
    with pytest.raises(ReplyError):
        parser.line(b"250-\x1b[2J")


def test_200_lines_accepted_201_refused() -> None:
    lines = [b"250-x"] * 199 + [b"250 end"]
    reply = feed(lines)
    assert reply is not None and len(reply.lines) == 200
    parser = ReplyParser()
    with pytest.raises(ReplyError):
        for _ in range(1000):
            parser.line(b"250-x")
    # It gave up at the limit, not after storing the flood.
    assert len(parser._lines) <= 200


def test_custom_line_limit() -> None:
    parser = ReplyParser(max_lines=3)
    parser.line(b"250-a")
    parser.line(b"250-b")
    with pytest.raises(ReplyError):
        parser.line(b"250-c")


# -- parse_reply --------------------------------------------------------------------------------

ROUND_TRIP = [
    Reply(250, ("OK",)),
    Reply(250, ("relay.example", "PIPELINING", "SIZE 1000", "AUTH PLAIN LOGIN")),
    Reply(334, ("",)),
    Reply(550, ("5.7.1 no",)),
    Reply(421, ("x" * (MAX_LINE - 6),)),
]


@pytest.mark.parametrize("reply", ROUND_TRIP, ids=str)
def test_round_trip(reply: Reply) -> None:
    assert parse_reply(reply.to_bytes()) == reply


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"250 OK",
        b"250-OK\r\n",
        b"250 OK\r\n250 again\r\n",
        b"250 OK\r\nextra",
        b"250 OK\n",
        b"250-a\r\n550 b\r\n",
    ],
)
def test_parse_reply_refuses(data: bytes) -> None:
    with pytest.raises(ReplyError):
        parse_reply(data)


# -- the catalogue ------------------------------------------------------------------------------

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")
NO_ENHANCED_CODE = {"greeting", "ehlo", "helo"}


def test_the_walk_finds_the_catalogue() -> None:
    names = {name for name, _ in composed_replies()}
    assert {"AUTH_INVALID", "OK", "greeting", "sender_not_owned", "upstream_auth_failed", "timeout"} <= names
    assert len(names) > 50


@pytest.mark.parametrize("name,reply", composed_replies(), ids=[name for name, _ in composed_replies()])
def test_catalogue_entry(name: str, reply: Reply) -> None:
    assert isinstance(reply, Reply)
    if name in NO_ENHANCED_CODE:
        assert reply.enhanced is None
    else:
        assert reply.enhanced is not None, f"{name} has no enhanced code"
        m = _ENHANCED.match(reply.enhanced)
        assert m is not None
        assert m.group(1) == str(reply.code)[0], f"{name}: {reply.code} with {reply.enhanced}"
    # On the wire it is a valid reply.
    wire = reply.to_bytes()
    assert parse_reply(wire).code == reply.code
    assert all(len(line) + 2 <= MAX_LINE for line in wire.split(b"\r\n")[:-1])
    if reply.enhanced is not None:
        assert parse_reply(reply.to_bytes()).lines[0].startswith(reply.enhanced + " ")


def test_catalogue_codes() -> None:
    """The codes the clients (and RFC 4954 / 3207 / 2034) rely on."""
    expected = {
        "UNRECOGNIZED": (500, "5.5.1"),
        "LINE_TOO_LONG": (500, "5.5.2"),
        "SYNTAX": (501, "5.5.2"),
        "BARE_LINE_END": (501, "5.5.2"),
        "AUTH_CANCELLED": (501, "5.5.2"),
        "AUTH_BAD_BASE64": (501, "5.5.2"),
        "AUTH_NO_MECHANISM": (501, "5.5.2"),
        "AUTH_UNKNOWN_MECHANISM": (504, "5.5.4"),
        "AUTH_INVALID": (535, "5.7.8"),
        "AUTH_ENCRYPTION_REQUIRED": (538, "5.7.11"),
        "AUTH_TEMPORARY": (454, "4.7.0"),
        "AUTH_REQUIRED": (530, "5.7.0"),
        "AUTH_OK": (235, "2.7.0"),
        "ALREADY_AUTHENTICATED": (503, "5.5.1"),
        "MESSAGE_TOO_BIG": (552, "5.3.4"),
        "VRFY": (252, "2.5.0"),
    }
    for name, (code, enhanced) in expected.items():
        reply = getattr(Catalogue, name)
        assert (reply.code, reply.enhanced) == (code, enhanced), name
    assert (Catalogue.timeout("h").code, Catalogue.timeout("h").enhanced) == (421, "4.4.2")
    assert Catalogue.closing("h").code == 221


def test_long_names_in_composed_replies() -> None:
    """A long host or user name makes a too-long reply fail loudly rather than go out oversized."""
    name = "u" * 600
    for make in (Catalogue.sender_not_owned, Catalogue.header_sender_not_owned, Catalogue.timeout, Catalogue.closing, Catalogue.upstream_unreachable):
        with pytest.raises(ReplyError):
            make(name)




def test_parser_reports_a_reply_in_progress() -> None:
    parser = ReplyParser()
    assert not parser.in_progress
    assert parser.line(b"250-first") is None
    assert parser.in_progress
    assert parser.line(b"250 last") is not None
    assert not parser.in_progress
