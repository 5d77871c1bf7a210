"""relayproxy.smtp.addresses: one spelling per domain, for allowed-sender rules."""

from __future__ import annotations

import pytest

from relayproxy.smtp.addresses import ascii_domain, comparable


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("Example.ORG", "example.org"),
        ("xn--BCHER-kva.example", "xn--bcher-kva.example"),
        ("b\u00fccher.example", "xn--bcher-kva.example"),
        ("B\u00dcCHER.Example", "xn--bcher-kva.example"),
        # UTS #46 maps full-width forms and the ideographic full stop.
        ("\uff45xample\u3002org", "example.org"),
        ("stra\u00dfe.de", "xn--strae-oqa.de"),  # IDNA 2008: the sharp s is kept, not mapped to "ss"
        ("[192.0.2.1]", "[192.0.2.1]"),
        ("b\u00fc_cher.example", None),
        ("\u00fc..example", None),
        ("\u00fc" * 64 + ".example", None),
    ],
)
def test_ascii_domain(domain: str, expected: str | None) -> None:
    assert ascii_domain(domain) == expected


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("Anna@B\u00fccher.example", "anna@xn--bcher-kva.example"),
        ("J\u00d6RG@example.org", "j\u00f6rg@example.org"),
        ('"a@b"@B\u00fccher.example', '"a@b"@xn--bcher-kva.example'),
        ("@B\u00fccher.example", "@xn--bcher-kva.example"),
        ("", ""),
        ("Postmaster", "postmaster"),
        ("a@b\u00fc_cher.example", None),
    ],
)
def test_comparable(address: str, expected: str | None) -> None:
    assert comparable(address) == expected
