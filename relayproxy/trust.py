"""The CA certificates an outgoing TLS connection trusts: a PEM file of them, or the system's store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import ssl


def trust_root(ca_file: Path | None) -> Any:
    """A trustRoot for optionsForClientTLS and BrowserLikePolicyForHTTPS; None: the system's store."""
    if ca_file is None:
        return None
    marker = b"-----END CERTIFICATE-----"
    pem = ca_file.read_bytes()
    certificates = [ssl.Certificate.loadPEM(part + marker) for part in pem.split(marker) if b"-----BEGIN" in part]
    return ssl.trustRootFromCertificates(certificates)  # type: ignore[no-untyped-call]
