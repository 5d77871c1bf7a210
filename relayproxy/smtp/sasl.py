"""SASL PLAIN (RFC 4616) and LOGIN: strict decoding of what clients send, encoding of what we send."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from relayproxy.errors import ProtocolError
from relayproxy.smtp.reply import Catalogue

MECHANISMS = ("PLAIN", "LOGIN")


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    authzid: str = ""


def decode_response(text: str) -> bytes:
    """One client response to a 334 challenge (or an initial response), RFC 4954 4."""
    if text == "*":
        raise ProtocolError(Catalogue.AUTH_CANCELLED)
    if text == "=":
        return b""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ProtocolError(Catalogue.AUTH_BAD_BASE64) from None


def _text(raw: bytes) -> str:
    try:
        value = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(Catalogue.AUTH_MALFORMED) from None
    if "\x00" in value or not value:
        raise ProtocolError(Catalogue.AUTH_MALFORMED)
    return value


def parse_plain(message: bytes) -> Credentials:
    """authzid NUL authcid NUL passwd (RFC 4616 2); the caller decides what an authzid may be."""
    parts = message.split(b"\x00")
    if len(parts) != 3:
        raise ProtocolError(Catalogue.AUTH_MALFORMED)
    authzid, authcid, password = parts
    return Credentials(_text(authcid), _text(password), _text(authzid) if authzid else "")


def parse_login_field(message: bytes) -> str:
    return _text(message)


def encode_plain(username: str, password: str) -> str:
    return base64.b64encode(b"\x00" + username.encode() + b"\x00" + password.encode()).decode("ascii")


def xoauth2_initial_response(username: str, token: str) -> str:
    """The base64 SASL XOAUTH2 response (Google's and Microsoft's format) for ``AUTH XOAUTH2``."""
    raw = f"user={username}\x01auth=Bearer {token}\x01\x01"
    return base64.b64encode(raw.encode("utf-8")).decode("ascii")


def encode(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


USERNAME_CHALLENGE = encode("Username:")
PASSWORD_CHALLENGE = encode("Password:")


class Exchange:
    """One AUTH exchange (RFC 4954 4): the challenges to send, and the credentials at its end.

    ``start`` and ``respond`` return the next challenge's text (for a 334) or the credentials, and
    raise ProtocolError with the client's reply for anything malformed or cancelled.
    """

    def __init__(self, mechanism: str, initial: str) -> None:
        self._mechanism = mechanism
        self._initial = initial
        self._username: str | None = None

    @classmethod
    def begin(cls, argument: str) -> Exchange:
        """The exchange AUTH's argument (MECHANISM [initial-response]) asks for."""
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper()
        if not mechanism:
            raise ProtocolError(Catalogue.AUTH_NO_MECHANISM)
        if mechanism not in MECHANISMS:
            raise ProtocolError(Catalogue.AUTH_UNKNOWN_MECHANISM)
        return cls(mechanism, initial)

    def start(self) -> str | Credentials:
        if self._initial:
            return self.respond(self._initial)
        return "" if self._mechanism == "PLAIN" else USERNAME_CHALLENGE

    def respond(self, line: str) -> str | Credentials:
        message = decode_response(line)
        if self._mechanism == "PLAIN":
            return parse_plain(message)
        if self._username is None:
            self._username = parse_login_field(message)
            return PASSWORD_CHALLENGE
        return Credentials(self._username, parse_login_field(message))
