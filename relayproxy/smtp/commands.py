"""Strict parsing of client command lines (RFC 5321 4.1), with UTF-8 addresses (RFC 6531 3.3)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from relayproxy.errors import ProtocolError
from relayproxy.smtp.addresses import ascii_domain
from relayproxy.smtp.envelope import Mail
from relayproxy.smtp.reply import Catalogue, Reply

MAX_COMMAND_LINE = 512
"""RFC 5321 4.5.3.1.4: a command line is at most 512 octets, CRLF included."""


# RFC 6531 3.3: atext and qtextSMTP take any non-ASCII character too (the line was checked printable).
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010ffff-]+"
_DOT_STRING = rf"{_ATOM}(?:\.{_ATOM})*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
_LITERAL = r"\[(?:\d{1,3}(?:\.\d{1,3}){3}|IPv6:[0-9A-Fa-f:.]+)\]"
# Source routes (@a,@b:user@c), bang paths and a second @ do not match: they are how open-relay
# probes try to make a relay forward mail somewhere the envelope does not show. The domain is
# checked apart (_valid_mailbox): a U-label is valid when it has an A-label.
_MAILBOX = re.compile(rf"^(?:{_DOT_STRING}|{_QUOTED})@(?:({_LITERAL})|([^@\[\]]+))$")
_PARAM = re.compile(r"^([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?$")
_PATH = re.compile(r"^<([^<>]*)>(?: (.*))?$")


@dataclass(frozen=True)
class Command:
    """A parsed command: the upper-cased verb and its argument text (already validated as ASCII)."""

    verb: str
    argument: str = ""


@dataclass(frozen=True)
class PathCommand:
    """MAIL FROM or RCPT TO: the address between the angle brackets and the ESMTP parameters."""

    verb: str
    address: str
    parameters: tuple[tuple[str, str | None], ...] = ()

    def parameter(self, key: str) -> str | None:
        for k, v in self.parameters:
            if k == key:
                return v
        return None

    def has(self, key: str) -> bool:
        return any(k == key for k, _ in self.parameters)


def parse_command(line: bytes) -> Command | PathCommand:
    """Parse one command line given without its CRLF; raise ProtocolError with the client's reply."""
    if b"\r" in line or b"\n" in line:
        # A bare CR or LF would let one "line" hold two commands for a peer that splits differently.
        raise ProtocolError(Catalogue.BARE_LINE_END)
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(Catalogue.SYNTAX) from None
    # Printable excludes C1 controls and format characters (bidi overrides) as well: none belongs
    # in an address, and they would disguise one in a log line.
    if not text.isprintable():
        raise ProtocolError(Catalogue.SYNTAX)
    verb, _, argument = text.partition(" ")
    if not verb.isascii():
        raise ProtocolError(Catalogue.SYNTAX)
    verb = verb.upper()
    if verb == "MAIL":
        return _parse_path(verb, argument, "FROM:", Catalogue.BAD_SENDER, allow_null=True)
    if verb == "RCPT":
        return _parse_path(verb, argument, "TO:", Catalogue.BAD_RECIPIENT, allow_null=False)
    if not argument.isascii():
        # RFC 6531 widens addresses only: EHLO names, AUTH data and the rest stay ASCII.
        raise ProtocolError(Catalogue.SYNTAX)
    return Command(verb, argument.strip())


def _parse_path(verb: str, argument: str, keyword: str, bad: Reply, allow_null: bool) -> PathCommand:
    written = argument[: len(keyword)]
    # isascii: str.upper maps some non-ASCII letters to ASCII ones ("\u017f" to "S").
    if not written.isascii() or written.upper() != keyword:
        raise ProtocolError(Catalogue.SYNTAX)
    # Many clients write "MAIL FROM: <a@b>"; the space is harmless, so accept it.
    m = _PATH.match(argument[len(keyword) :].lstrip(" "))
    if m is None:
        raise ProtocolError(bad)
    address, rest = m.group(1), m.group(2) or ""
    if address == "":
        if not allow_null:
            raise ProtocolError(bad)
    elif not (_valid_mailbox(address) or (verb == "RCPT" and address.lower() == "postmaster")):
        raise ProtocolError(bad)
    # RFC 5321 4.5.3.1.3 counts octets, and so does RFC 6531 for UTF-8.
    if len(address.encode("utf-8")) > 256:
        raise ProtocolError(bad)
    parameters: list[tuple[str, str | None]] = []
    for item in rest.split(" ") if rest else []:
        pm = _PARAM.match(item)
        if pm is None:
            raise ProtocolError(Catalogue.BAD_PARAMETER_SYNTAX)
        parameters.append((pm.group(1).upper(), pm.group(2)))
    return PathCommand(verb, address, tuple(parameters))


def _valid_mailbox(address: str) -> bool:
    m = _MAILBOX.match(address)
    if m is None:
        return False
    domain = m.group(2)
    if domain is None:
        return True
    if domain.isascii():
        return _DOMAIN.match(domain) is not None
    # RFC 6531 3.3: sub-domain =/ U-label; one without an A-label is no domain anyone can reach.
    normal = ascii_domain(domain)
    return normal is not None and _DOMAIN.match(normal) is not None


def mail_of(command: PathCommand, max_message_size: int) -> Mail:
    """MAIL FROM's parameters checked (RFC 1870 SIZE, RFC 6152 BODY, RFC 6531 SMTPUTF8); raise
    ProtocolError with the client's reply."""
    size = command.parameter("SIZE")
    if command.has("SIZE"):
        if size is None or not size.isdigit():
            raise ProtocolError(Catalogue.BAD_SIZE)
        if int(size) > max_message_size:
            raise ProtocolError(Catalogue.MESSAGE_TOO_BIG)
    body = command.parameter("BODY")
    if command.has("BODY") and (body or "").upper() not in ("7BIT", "8BITMIME"):
        raise ProtocolError(Catalogue.BAD_BODY)
    smtputf8 = command.has("SMTPUTF8")
    if smtputf8 and command.parameter("SMTPUTF8") is not None:
        # RFC 6531 3.4: the parameter has no value.
        raise ProtocolError(Catalogue.BAD_PARAMETER_SYNTAX)
    # AUTH= names the client's identity to the next hop; the upstream must only ever see ours.
    if any(key not in ("SIZE", "BODY", "AUTH", "SMTPUTF8") for key, _ in command.parameters):
        raise ProtocolError(Catalogue.BAD_PARAMETERS)
    if not (smtputf8 or command.address.isascii()):
        raise ProtocolError(Catalogue.NEEDS_SMTPUTF8)
    return Mail(command.address, int(size) if size is not None else None, (body or "").upper() == "8BITMIME", smtputf8)
