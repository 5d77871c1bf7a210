"""Signed JWT assertions (RFC 7523), with which an application signs in without a shared secret.

``client_assertion``: Microsoft's identity platform takes a JWT signed with the key of a
certificate registered with the app in place of its client secret (RFC 7523 2.2, a client
credentials request). ``service_account_assertion``: Google takes a JWT signed with a service
account's key as the grant itself (RFC 7523 2.1), naming the user of the domain it acts for.

The keys were read and checked by load_config; nothing here reads a file or logs.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from relayproxy.config import ClientCertificate, ServiceAccount

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
"""client_assertion_type of a client assertion (RFC 7523 2.2)."""
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
"""grant_type of the JWT bearer grant (RFC 7523 2.1)."""

CLIENT_ASSERTION_LIFETIME = 300
"""Seconds a client assertion is valid: it is sent at once, and Microsoft allows clock skew itself."""
SERVICE_ACCOUNT_LIFETIME = 3600
"""Google refuses an assertion valid for more than an hour."""


def client_assertion(certificate: ClientCertificate, *, client_id: str, audience: str, now: float) -> str:
    """The assertion for one token request of application ``client_id`` to the token URL ``audience``.

    PS256 with the certificate's SHA-256 thumbprint (x5t#S256) is what Microsoft's identity
    platform documents and MSAL sends; the SHA-1 x5t it calls legacy. A fresh jti each time: the
    platform refuses an assertion it has seen.
    """
    issued = int(now)
    header = {"alg": "PS256", "typ": "JWT", "x5t#S256": certificate.sha256_thumbprint}
    claims = {
        "aud": audience,
        "iss": client_id,
        "sub": client_id,
        "jti": str(uuid.uuid4()),
        "nbf": issued,
        "iat": issued,
        "exp": issued + CLIENT_ASSERTION_LIFETIME,
    }
    # RFC 7518 3.5: PSS with MGF1 and a salt as long as the hash.
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
    return _signed(header, claims, certificate.key, pss)


def service_account_assertion(account: ServiceAccount, *, subject: str, scope: str, now: float) -> str:
    """The grant for a token that acts as the user ``subject`` (domain-wide delegation), for ``scope``."""
    issued = int(now)
    # kid names the key among the account's keys, as Google's own libraries send it.
    header = {"alg": "RS256", "typ": "JWT", "kid": account.private_key_id}
    claims = {
        "iss": account.client_email,
        "sub": subject,
        "scope": scope,
        "aud": account.token_uri,
        "iat": issued,
        "exp": issued + SERVICE_ACCOUNT_LIFETIME,
    }
    return _signed(header, claims, account.key, padding.PKCS1v15())


def _signed(header: dict[str, Any], claims: dict[str, Any], key: rsa.RSAPrivateKey, pad: padding.AsymmetricPadding) -> str:
    """A compact JWS (RFC 7515 7.1) of ``claims`` with SHA-256 and ``pad``."""
    signing_input = f"{_b64url(_json(header))}.{_b64url(_json(claims))}".encode("ascii")
    return signing_input.decode("ascii") + "." + _b64url(key.sign(signing_input, pad, hashes.SHA256()))


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
