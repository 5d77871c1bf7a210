"""Mail addresses as the proxy compares them: one spelling of each domain, whether a client wrote its
U-labels (an SMTPUTF8 address, RFC 6531) or their A-labels (RFC 5890).

Allowed-sender rules compare addresses so: "@bücher.example" covers a@xn--bcher-kva.example too,
and the other way round.
"""

from __future__ import annotations

import idna


def ascii_domain(domain: str) -> str | None:
    """``domain`` lower-cased, its non-ASCII labels as A-labels; None when it has no such form.

    UTS #46 mapping (case folding, full-width forms) before IDNA 2008: what a user types or a
    mail client writes is the same domain as its canonical U-labels.
    """
    if domain.isascii():
        # Already A-labels or plain LDH labels (or an address literal): their case is all that varies.
        return domain.lower()
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except idna.IDNAError:
        return None


def comparable(address: str) -> str | None:
    """``address`` lower-cased with its domain as ``ascii_domain`` gives it; None when the domain has no
    A-label form (then it names no domain an allowed sender can)."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address.lower()
    normal = ascii_domain(domain)
    return None if normal is None else f"{local.lower()}@{normal}"
