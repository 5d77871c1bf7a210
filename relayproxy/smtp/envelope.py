"""The envelope commands a client's transaction hands to an upstream, after the proxy checked them.

They carry meaning, not wire text: an SMTP upstream writes its own lines (its own parameters, the
account's envelope sender), an HTTP API or a spool keeps the addresses.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mail:
    sender: str
    """The client's reverse-path, "" for the null sender."""
    size: int | None = None
    """The client's SIZE declaration (RFC 1870)."""
    eight_bit: bool = False
    """BODY=8BITMIME (RFC 6152)."""
    smtputf8: bool = False
    """SMTPUTF8 (RFC 6531): the addresses and the header may hold UTF-8; only an upstream that
    offers SMTPUTF8 may take the message."""


@dataclass(frozen=True)
class Rcpt:
    recipient: str


@dataclass(frozen=True)
class Data:
    pass


EnvelopeCommand = Mail | Rcpt | Data
