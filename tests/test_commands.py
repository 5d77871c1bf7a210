"""parse_command: strict RFC 5321 command lines, and no open-relay tricks in envelope addresses."""

from __future__ import annotations

import pytest

from relayproxy.errors import ProtocolError
from relayproxy.smtp.commands import Command, PathCommand, parse_command
from relayproxy.smtp.reply import Catalogue, Reply


def refused(line: bytes) -> Reply:
    with pytest.raises(ProtocolError) as info:
        parse_command(line)
    return info.value.reply


def code(reply: Reply) -> tuple[int, str | None]:
    return reply.code, reply.enhanced


# -- verbs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line,verb,argument",
    [
        (b"EHLO client.example", "EHLO", "client.example"),
        (b"ehlo client.example", "EHLO", "client.example"),
        (b"HeLo client.example", "HELO", "client.example"),
        (b"NOOP", "NOOP", ""),
        (b"noop anything", "NOOP", "anything"),
        (b"RSET", "RSET", ""),
        (b"QUIT", "QUIT", ""),
        (b"DATA", "DATA", ""),
        (b"STARTTLS", "STARTTLS", ""),
        (b"AUTH PLAIN AGFsaWNlAHNlY3JldA==", "AUTH", "PLAIN AGFsaWNlAHNlY3JldA=="),
        (b"AUTH LOGIN", "AUTH", "LOGIN"),
        (b"VRFY postmaster", "VRFY", "postmaster"),
        (b"HELP", "HELP", ""),
        (b"EHLO  spaced.example  ", "EHLO", "spaced.example"),
        (b"XFOO bar", "XFOO", "bar"),
        (b"", "", ""),
    ],
)
def test_verbs(line: bytes, verb: str, argument: str) -> None:
    assert parse_command(line) == Command(verb, argument)


# -- MAIL and RCPT ------------------------------------------------------------------------------


def test_mail_simple() -> None:
    assert parse_command(b"MAIL FROM:<alice@example.com>") == PathCommand("MAIL", "alice@example.com")


def test_mail_case_insensitive_keyword() -> None:
    assert parse_command(b"mail from:<alice@example.com>") == PathCommand("MAIL", "alice@example.com")


def test_mail_with_space_after_colon() -> None:
    assert parse_command(b"MAIL FROM: <a@b.example>") == PathCommand("MAIL", "a@b.example")


def test_null_sender() -> None:
    assert parse_command(b"MAIL FROM:<>") == PathCommand("MAIL", "")
    assert parse_command(b"MAIL FROM:<> SIZE=10") == PathCommand("MAIL", "", (("SIZE", "10"),))


def test_null_recipient_refused() -> None:
    assert refused(b"RCPT TO:<>") == Catalogue.BAD_RECIPIENT


@pytest.mark.parametrize("name", ["postmaster", "Postmaster", "POSTMASTER"])
def test_rcpt_postmaster(name: str) -> None:
    assert parse_command(f"RCPT TO:<{name}>".encode()) == PathCommand("RCPT", name)


def test_mail_from_bare_postmaster_refused() -> None:
    assert refused(b"MAIL FROM:<postmaster>") == Catalogue.BAD_SENDER


def test_parameters() -> None:
    command = parse_command(b"MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME auth=<>")
    assert isinstance(command, PathCommand)
    assert command.parameters == (("SIZE", "1000"), ("BODY", "8BITMIME"), ("AUTH", "<>"))
    assert command.parameter("SIZE") == "1000"
    assert command.has("BODY") and not command.has("RET")
    assert command.parameter("RET") is None


def test_parameter_without_value() -> None:
    command = parse_command(b"RCPT TO:<a@b.example> NOTIFY")
    assert isinstance(command, PathCommand)
    assert command.parameters == (("NOTIFY", None),)
    assert command.has("NOTIFY") and command.parameter("NOTIFY") is None


def test_trailing_space_is_harmless() -> None:
    assert parse_command(b"MAIL FROM:<a@b.example> ") == PathCommand("MAIL", "a@b.example")


@pytest.mark.parametrize("params", [b"SIZE=", b"SIZE==1", b"=1", b"-X=1", b"SIZE=a=b", b"\x7f"])
def test_bad_parameters(params: bytes) -> None:
    reply = refused(b"MAIL FROM:<a@b.example> " + params)
    assert reply.code == 501


@pytest.mark.parametrize(
    "line",
    [b"MAIL", b"MAIL FROM", b"MAIL TO:<a@b.example>", b"RCPT FROM:<a@b.example>", b"MAIL FROM=<a@b.example>"],
)
def test_wrong_keyword_is_syntax_error(line: bytes) -> None:
    assert refused(line) == Catalogue.SYNTAX


@pytest.mark.parametrize(
    "path",
    [b"a@b.example", b"<a@b.example", b"a@b.example>", b"<<a@b.example>>", b"<a@b.example> <c@d.example>"],
)
def test_malformed_paths(path: bytes) -> None:
    assert refused(b"MAIL FROM:" + path).code == 501
    assert refused(b"RCPT TO:" + path).code == 501


VALID = [
    "alice@example.com",
    "first.last@sub.example.co.uk",
    "user+tag@example.com",
    "user%host@relay.example",  # percent hack: a valid local part, the upstream's business
    "!#$&'*+/=?^_`{|}~-@example.com",
    '"john doe"@example.com',
    '"a@b"@example.com',
    '"quoted\\"escape"@example.com',
    "user@[192.0.2.1]",
    "user@[IPv6:2001:db8::1]",
    "host!user@relay.example",  # a bang in the local part is just an atext character
    "a@b",
    "x@" + "a" * 63 + ".example",
]

INVALID = [
    "@a.example:b@c.example",  # source route
    "@a.example,@b.example:c@d.example",  # source route with two hops
    "user@d.example@other.example",  # two @
    "host!user",  # bang path without @
    "user",  # no domain
    "user@",
    "@example.com",
    ".user@example.com",
    "user.@example.com",
    "us..er@example.com",
    "user@-example.com",
    "user@example-.com",
    "user@exa mple.com",
    "us er@example.com",
    "user@example..com",
    "user@" + "a" * 64 + ".example",
    '"unterminated@example.com',
    "user@[192.0.2.1",
    "user@[not-an-ip]",
    "a" * 250 + "@example.com",  # over 256 octets in all
]


@pytest.mark.parametrize("address", VALID)
def test_valid_addresses(address: str) -> None:
    assert parse_command(f"MAIL FROM:<{address}>".encode()) == PathCommand("MAIL", address)
    assert parse_command(f"RCPT TO:<{address}>".encode()) == PathCommand("RCPT", address)


@pytest.mark.parametrize("address", INVALID)
def test_invalid_addresses(address: str) -> None:
    assert refused(f"MAIL FROM:<{address}>".encode()) == Catalogue.BAD_SENDER
    assert refused(f"RCPT TO:<{address}>".encode()) == Catalogue.BAD_RECIPIENT


def test_bad_address_codes() -> None:
    assert code(Catalogue.BAD_SENDER) == (501, "5.1.7")
    assert code(Catalogue.BAD_RECIPIENT) == (501, "5.1.3")


# -- line hygiene -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"NOOP\r",
        b"NOOP\n",
        b"NOOP\rRSET",
        b"MAIL FROM:<a@b.example>\nRCPT TO:<c@d.example>",
        b"RCPT TO:<a@b.example>\r",
        b"\n",
    ],
)
def test_bare_line_ends(line: bytes) -> None:
    reply = refused(line)
    assert code(reply) == (501, "5.5.2")
    assert reply == Catalogue.BARE_LINE_END


@pytest.mark.parametrize(
    "line",
    [
        "EHLO h\u00e9.example".encode("utf-8"),
        "AUTH PLAIN \u00e9".encode("utf-8"),
        "NOOP \u00e9".encode("utf-8"),
        "M\u0410IL FROM:<a@example.com>".encode("utf-8"),  # a Cyrillic A in the verb
        "MA\u0131L FROM:<a@example.com>".encode("utf-8"),  # dotless i: "\u0131".upper() == "I"
        "MAIL FRO\u1d39:<a@example.com>".encode("utf-8"),
        b"NOOP \xff",
        b"\x80",
        b"MAIL FROM:<j\xf6rg@example.com>",  # Latin-1, not UTF-8
        b"MAIL FROM:<j\xc3@example.com>",  # a UTF-8 sequence cut short
    ],
)
def test_non_ascii_outside_addresses(line: bytes) -> None:
    # RFC 6531 widens the addresses of MAIL and RCPT only, and only as UTF-8.
    reply = refused(line)
    assert code(reply) == (501, "5.5.2")


@pytest.mark.parametrize(
    "line,address,parameters",
    [
        ("MAIL FROM:<j\u00f6rg@example.com> SMTPUTF8", "j\u00f6rg@example.com", (("SMTPUTF8", None),)),
        ("MAIL FROM:<s\u00e9nder@example.org> smtputf8 BODY=8BITMIME", "s\u00e9nder@example.org",
         (("SMTPUTF8", None), ("BODY", "8BITMIME"))),
        ("MAIL FROM:<user@b\u00fccher.example>", "user@b\u00fccher.example", ()),
        ("MAIL FROM:<\u7528\u6237@\u4f8b\u3048.\u30c6\u30b9\u30c8> SMTPUTF8",
         "\u7528\u6237@\u4f8b\u3048.\u30c6\u30b9\u30c8", (("SMTPUTF8", None),)),
        ('MAIL FROM:<"j\u00f6rg smith"@example.com>', '"j\u00f6rg smith"@example.com', ()),
        ("MAIL FROM:<user@B\u00dcCHER.example>", "user@B\u00dcCHER.example", ()),
        ("RCPT TO:<\u0434\u0436\u043e@\u043f\u0440\u0438\u043c\u0435\u0440.\u0440\u0444>",
         "\u0434\u0436\u043e@\u043f\u0440\u0438\u043c\u0435\u0440.\u0440\u0444", ()),
        ("RCPT TO:<user@xn--bcher-kva.example>", "user@xn--bcher-kva.example", ()),
        # 256 octets in all, the most a path may hold.
        ("RCPT TO:<" + "\u00e9" * 120 + "@b\u00fccher.example>", "\u00e9" * 120 + "@b\u00fccher.example", ()),
    ],
)
def test_utf8_addresses(line: str, address: str, parameters: tuple[tuple[str, str | None], ...]) -> None:
    parsed = parse_command(line.encode("utf-8"))
    assert isinstance(parsed, PathCommand)
    assert (parsed.address, parsed.parameters) == (address, parameters)


@pytest.mark.parametrize(
    "line,reply",
    [
        # A U-label with no A-label form (IDNA 2008) names no reachable domain.
        ("MAIL FROM:<a@b\u00fc_cher.example>", Catalogue.BAD_SENDER),
        ("MAIL FROM:<a@\u00fc..example>", Catalogue.BAD_SENDER),
        ("RCPT TO:<a@\u00fc\u2044x.example>", Catalogue.BAD_RECIPIENT),
        # A full-width @ maps to "@" (UTS #46): still never a second @ of a routed address.
        ("MAIL FROM:<ceo@example.org\uff20b\u00fc.example>", Catalogue.BAD_SENDER),
        ("MAIL FROM:<a@b@c\u00e9.example>", Catalogue.BAD_SENDER),
        ("RCPT TO:<@r\u00e9lay.example:bob@example.net>", Catalogue.BAD_RECIPIENT),
        ("MAIL FROM:<j\u00f6rg@example.com> SMTPUTF8=\u00e9", Catalogue.BAD_PARAMETER_SYNTAX),
        # RFC 5321 4.5.3.1.3: 256 octets, not characters.
        ("MAIL FROM:<" + "\u00e9" * 121 + "@b\u00fccher.example> SMTPUTF8", Catalogue.BAD_SENDER),
    ],
)
def test_utf8_addresses_refused(line: str, reply: Reply) -> None:
    assert refused(line.encode("utf-8")) == reply


@pytest.mark.parametrize("character", ["\u202e", "\u200b", "\u0085", "\u00a0", "\u2028"])
def test_invisible_characters_in_addresses(character: str) -> None:
    # Bidi overrides, zero widths, C1 controls and other spaces would disguise an address in a log.
    assert code(refused(f"MAIL FROM:<a{character}b@example.com> SMTPUTF8".encode("utf-8"))) == (501, "5.5.2")


@pytest.mark.parametrize("line", [b"NOOP\x00", b"EHLO \x1b[31mred", b"NOOP\tx", b"\x7f", b"MAIL FROM:<a@b.example>\x00"])
def test_control_characters(line: bytes) -> None:
    assert code(refused(line)) == (501, "5.5.2")
