"""What a message sent through Microsoft Graph needs that SMTP did not: no dot-stuffing, exactly the
envelope's recipients in the header, and Graph's answers as SMTP replies.

Graph's sendMail takes the message as MIME and delivers to the recipients its To, Cc and Bcc
fields name, not to an envelope; the proxy promises that exactly the recipients the client gave in
RCPT TO receive the message, so the header is made to say just that.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from email.utils import getaddresses

from relayproxy.smtp.headers import header_fields
from relayproxy.smtp.reply import Catalogue, Reply

_END_OF_HEADER = b"\r\n\r\n"
_RECIPIENT_FIELDS = re.compile(rb"^(to|cc|bcc)[ \t]*:", re.IGNORECASE)


class Unstuffer:
    """Undoes SMTP dot-stuffing (RFC 5321 4.5.2) of the wire form, chunk by chunk."""

    def __init__(self) -> None:
        self._line_start = True

    def feed(self, data: bytes) -> bytes:
        if not data:
            return data
        if self._line_start and data.startswith(b".."):
            data = data[1:]
        self._line_start = data.endswith(b"\r\n")
        return data.replace(b"\r\n..", b"\r\n.")


def fit_recipients(message: bytes, envelope: Sequence[str]) -> bytes:
    """``message`` with To and Cc naming only envelope recipients and a Bcc for the rest of them.

    A To or Cc address the client did not give in RCPT TO is taken out (a field left empty goes);
    an envelope recipient that To and Cc do not name is added to Bcc, which Graph delivers to and
    does not show; any Bcc the client wrote is replaced, as an SMTP server would never show it.
    """
    end = message.find(_END_OF_HEADER)
    header, rest = (message[: end + 2], message[end + 2 :]) if end >= 0 else (message, b"")
    wanted = {address.lower() for address in envelope}
    shown: set[str] = set()
    out: list[bytes] = []
    for field in header_fields(header):
        match = _RECIPIENT_FIELDS.match(field)
        if match is None:
            out.append(field)
            continue
        if match.group(1).lower() == b"bcc":
            continue
        name = field[: field.index(b":")]
        value = field[field.index(b":") + 1 :].replace(b"\r\n", b"").decode("utf-8", "replace")
        kept = [(display, address) for display, address in getaddresses([value]) if address.lower() in wanted]
        shown.update(address.lower() for _, address in kept)
        if kept:
            out.append(name + b": " + ", ".join(_mailbox(display, address) for display, address in kept).encode("utf-8"))
    hidden = [address for address in dict.fromkeys(envelope) if address.lower() not in shown]
    if hidden:
        out.append(b"Bcc: " + ", ".join(hidden).encode("utf-8"))
    return b"".join(field + b"\r\n" for field in out) + rest


def _mailbox(display: str, address: str) -> str:
    if not display:
        return address
    quoted = display.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{quoted}" <{address}>'


def verdict(status: int, headers: Mapping[str, str], body: bytes, upstream: str) -> Reply:
    """Graph's answer to sendMail (or to a draft's send) as the client's reply (Graph's error
    responses: an HTTP status and a JSON {"error": {"code", "message"}})."""
    request_id = headers.get("request-id", "-")
    if status == 202:
        return Catalogue.graph_accepted(request_id)
    code = _error_code(body)
    retry = _retry_after(headers)
    if status == 429:
        return Catalogue.graph_throttled(upstream, retry)
    if status in (503, 504):
        return Catalogue.graph_unavailable(upstream, status, retry)
    if code == "ErrorSendAsDenied":
        return Catalogue.graph_send_as_denied(upstream)
    if code == "ErrorAccessDenied" or status == 403:
        return Catalogue.graph_access_denied(upstream)
    if code == "ErrorInvalidRecipients":
        return Catalogue.GRAPH_INVALID_RECIPIENTS
    if status == 413 or code in ("ErrorMessageSizeExceeded", "RequestEntityTooLarge"):
        return Catalogue.MESSAGE_TOO_BIG
    if 500 <= status:
        return Catalogue.graph_unavailable(upstream, status, retry)
    return Catalogue.graph_refused(upstream, status, code or "-")


def _error_code(body: bytes) -> str | None:
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) and code.isascii() and code.isprintable() else None


def _retry_after(headers: Mapping[str, str]) -> int | None:
    value = headers.get("retry-after", "").strip()
    return min(int(value), 86400) if value.isdigit() else None
