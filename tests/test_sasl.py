"""SASL PLAIN and LOGIN decoding (RFC 4954, RFC 4616)."""

from __future__ import annotations

import base64

import pytest

from relayproxy.errors import ProtocolError
from relayproxy.smtp import sasl
from relayproxy.smtp.reply import Catalogue, Reply


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def refused(call: object, *args: object) -> Reply:
    with pytest.raises(ProtocolError) as info:
        call(*args)  # type: ignore[operator]
    return info.value.reply


def codes(reply: Reply) -> tuple[int, str | None]:
    return reply.code, reply.enhanced


# -- decode_response ----------------------------------------------------------------------------


def test_cancel() -> None:
    reply = refused(sasl.decode_response, "*")
    assert reply == Catalogue.AUTH_CANCELLED
    assert codes(reply) == (501, "5.5.2")


def test_empty_response() -> None:
    assert sasl.decode_response("=") == b""


def test_decode() -> None:
    assert sasl.decode_response(b64(b"\x00alice\x00secret")) == b"\x00alice\x00secret"
    assert sasl.decode_response("") == b""


@pytest.mark.parametrize(
    "text",
    ["not base64!", "YW Jj", "YWJjZA", "YWJj\n", "====", "YWJj*", "\u00e9\u00e9\u00e9\u00e9", "**", "= "],
)
def test_bad_base64(text: str) -> None:
    reply = refused(sasl.decode_response, text)
    assert reply == Catalogue.AUTH_BAD_BASE64
    assert codes(reply) == (501, "5.5.2")


# -- PLAIN --------------------------------------------------------------------------------------


def test_plain() -> None:
    credentials = sasl.parse_plain(b"\x00alice\x00secret")
    assert (credentials.username, credentials.password) == ("alice", "secret")


def test_plain_authzid_is_returned() -> None:
    """What an authzid may be is the server's decision (a 535 there, see test_server_dialogue)."""
    credentials = sasl.parse_plain(b"alice\x00alice\x00secret")
    assert (credentials.authzid, credentials.username, credentials.password) == ("alice", "alice", "secret")
    credentials = sasl.parse_plain(b"bob\x00alice\x00secret")
    assert (credentials.authzid, credentials.username) == ("bob", "alice")
    assert sasl.parse_plain(b"\x00alice\x00secret").authzid == ""


def test_plain_bad_authzid() -> None:
    assert codes(refused(sasl.parse_plain, b"\xff\x00alice\x00secret")) == (501, "5.5.2")


@pytest.mark.parametrize(
    "message",
    [
        b"alice\x00secret",
        b"",
        b"\x00\x00alice\x00secret",  # NUL in the username: four fields
        b"\x00al\x00ice\x00secret",
        b"\x00alice\x00sec\x00ret",
        b"\x00alice\x00secret\x00",
    ],
)
def test_plain_wrong_field_count(message: bytes) -> None:
    reply = refused(sasl.parse_plain, message)
    assert reply == Catalogue.AUTH_MALFORMED
    assert codes(reply) == (501, "5.5.2")


@pytest.mark.parametrize("message", [b"\x00alice\x00", b"\x00\x00secret", b"\x00\x00", b"\x00\xff\x00secret", b"\x00alice\x00\xfe"])
def test_plain_empty_or_undecodable_fields(message: bytes) -> None:
    assert codes(refused(sasl.parse_plain, message)) == (501, "5.5.2")


def test_plain_utf8() -> None:
    credentials = sasl.parse_plain("\x00j\u00f6rg\x00p\u00e4ss".encode())
    assert (credentials.username, credentials.password) == ("j\u00f6rg", "p\u00e4ss")


def test_credentials_repr_hides_password() -> None:
    assert "secret" not in repr(sasl.parse_plain(b"\x00alice\x00secret"))


def test_encode_plain_round_trip() -> None:
    encoded = sasl.encode_plain("alice", "s3cret")
    credentials = sasl.parse_plain(sasl.decode_response(encoded))
    assert (credentials.username, credentials.password) == ("alice", "s3cret")


# -- LOGIN --------------------------------------------------------------------------------------


def test_login_fields() -> None:
    assert sasl.parse_login_field(sasl.decode_response(sasl.encode("alice"))) == "alice"
    assert sasl.parse_login_field("p\u00e4ss".encode()) == "p\u00e4ss"


@pytest.mark.parametrize("raw", [b"", b"a\x00b", b"\x00", b"\xff\xfe"])
def test_login_bad_fields(raw: bytes) -> None:
    reply = refused(sasl.parse_login_field, raw)
    assert reply == Catalogue.AUTH_MALFORMED


def test_login_challenges() -> None:
    assert base64.b64decode(sasl.USERNAME_CHALLENGE) == b"Username:"
    assert base64.b64decode(sasl.PASSWORD_CHALLENGE) == b"Password:"
    assert sasl.MECHANISMS == ("PLAIN", "LOGIN")


# -- big payloads -------------------------------------------------------------------------------


def test_12k_payload() -> None:
    password = "p" * 9300
    encoded = sasl.encode_plain("alice", password)
    assert len(encoded) >= 12 * 1024 - 200
    credentials = sasl.parse_plain(sasl.decode_response(encoded))
    assert credentials.password == password
    assert sasl.parse_login_field(sasl.decode_response(sasl.encode("u" * 9000))) == "u" * 9000


def test_12k_garbage() -> None:
    assert refused(sasl.decode_response, "!" * 12288) == Catalogue.AUTH_BAD_BASE64
    assert refused(sasl.parse_plain, b"\x00" * 12288) == Catalogue.AUTH_MALFORMED
