"""A small stand-in for Microsoft Graph, for ``relayproxy demo --graph``; not for tests or production.

Two routes, as a Graph upstream uses them (one app, one mailbox, one tenant):

- ``POST /{tenant}/oauth2/v2.0/token``, the identity platform's client credentials grant: the
  demo's client id and secret (in the form or as HTTP Basic) and the Graph scope give an access
  token shaped like Microsoft's, a JWT whose ``roles`` claim holds ``Mail.Send``, so that
  ``relayproxy check`` has something to read (signed with a throwaway key; nobody verifies it).
- ``POST /v1.0/users/{mailbox}/sendMail`` with ``Content-Type: text/plain``: the MIME message,
  base64-encoded, behind ``Authorization: Bearer`` with a token issued here. Each message is handed
  to ``on_message`` and answered 202 with a ``request-id`` header, as Graph does.

The app holds Mail.Send only, so the draft routes (``/users/{mailbox}/messages...``, how the proxy
sends a message over about 3 MB) answer 403 ``ErrorAccessDenied``, as Graph does without
Mail.ReadWrite.

Failures have Graph's shapes (``{"error": {"code", "message"}}``, the identity platform's
``error``/``error_description`` with an AADSTS number), so the proxy's replies to them are the ones
a real tenant would get.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import hashlib
import hmac
import json
import re
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import getaddresses
from urllib.parse import parse_qs, unquote

from twisted.web.resource import Resource
from twisted.web.server import Request

GRAPH_SCOPE = "https://graph.microsoft.com/.default"
TOKEN_LIFETIME = 3599
MAX_REQUEST = 4 * 1024 * 1024
"""Graph's limit on one request."""


@dataclass(frozen=True)
class SentMessage:
    """What the stand-in "sent": the MIME message as the proxy handed it over."""

    number: int
    request_id: str
    mailbox: str
    recipients: list[str]
    mime: bytes


class DemoGraph(Resource):
    """The token endpoint and sendMail for one app and one mailbox."""

    isLeaf = True

    def __init__(
        self, tenant: str, client_id: str, client_secret: str, mailbox: str, on_message: Callable[[SentMessage], None]
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.tenant = tenant
        self.client_id = client_id
        self.client_secret = client_secret
        self.mailbox = mailbox
        self.on_message = on_message
        self.sent = 0
        self._tokens: dict[str, float] = {}
        self._key = secrets.token_bytes(32)

    def render_POST(self, request: Request) -> bytes:
        path = unquote((request.path or b"").decode("latin-1"))
        if path == f"/{self.tenant}/oauth2/v2.0/token":
            return self._token(request)
        match = re.fullmatch(r"/v1\.0/users/([^/]+)/sendMail", path)
        if match is not None:
            return self._send_mail(request, match.group(1))
        if re.fullmatch(r"/v1\.0/users/[^/]+/messages(/.*)?", path):
            # Drafts (how a message over about 3 MB goes) need Mail.ReadWrite, which this app lacks.
            return _graph_error(request, 403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")
        return _graph_error(request, 400, "BadRequest", f"Resource not found for the segment '{path.rsplit('/', 1)[-1]}'.")

    def render_GET(self, request: Request) -> bytes:
        return _graph_error(request, 405, "Request_BadRequest", "This demo Graph answers POST to the token endpoint and sendMail only.")

    # The identity platform: OAuth 2.0 client credentials (RFC 6749 4.4).

    def _token(self, request: Request) -> bytes:
        form = {key: values[-1] for key, values in parse_qs(_body(request).decode("latin-1")).items()}
        client_id, secret = form.get("client_id"), form.get("client_secret")
        basic = (request.getHeader("authorization") or "").split(" ", 1)
        if len(basic) == 2 and basic[0].lower() == "basic":
            try:
                client_id, _, secret = base64.b64decode(basic[1]).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                pass
        if form.get("grant_type") != "client_credentials":
            return _token_error(request, 400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
        if client_id != self.client_id:
            return _token_error(request, 400, "unauthorized_client", 700016, f"Application with identifier '{client_id}' was not found in the directory.")
        if form.get("scope") != GRAPH_SCOPE:
            return _token_error(request, 400, "invalid_scope", 70011, f"The provided value for scope is not valid; client credentials take {GRAPH_SCOPE}.")
        if secret is None or not hmac.compare_digest(secret.encode(), self.client_secret.encode()):
            return _token_error(request, 401, "invalid_client", 7000215, "Invalid client secret provided.")
        now = time.time()
        token = self._access_token(now)
        self._tokens[token] = now + TOKEN_LIFETIME
        body = {"token_type": "Bearer", "expires_in": TOKEN_LIFETIME, "ext_expires_in": TOKEN_LIFETIME, "access_token": token}
        return _json(request, 200, body)

    def _access_token(self, now: float) -> str:
        """An app-only token with the claims Microsoft's carry that matter here."""
        header = {"typ": "JWT", "alg": "HS256"}
        claims = {
            "aud": "https://graph.microsoft.com",
            "iss": f"https://sts.windows.net/{self.tenant}/",
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now) + TOKEN_LIFETIME,
            "appid": self.client_id,
            "idtyp": "app",
            "roles": ["Mail.Send"],
            "tid": self.tenant,
            "uti": secrets.token_urlsafe(16),
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = hmac.new(self._key, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{_b64url(signature)}"

    # Graph: POST /users/{id}/sendMail with the MIME message in base64.

    def _send_mail(self, request: Request, user: str) -> bytes:
        scheme, _, token = (request.getHeader("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or self._tokens.get(token, 0) < time.time():
            return _graph_error(request, 401, "InvalidAuthenticationToken", "Access token is empty, unknown or expired.")
        if user.lower() != self.mailbox.lower():
            return _graph_error(request, 404, "ErrorInvalidUser", f"The requested user '{user}' is invalid.")
        content = _body(request)
        if len(content) > MAX_REQUEST:
            return _graph_error(request, 413, "RequestEntityTooLarge", "The request is larger than 4 MB.")
        if (request.getHeader("content-type") or "").split(";")[0].strip().lower() != "text/plain":
            return _graph_error(request, 415, "UnsupportedMediaType", "Send the MIME message as text/plain, base64-encoded.")
        try:
            mime = base64.b64decode(re.sub(rb"\s+", b"", content), validate=True)
        except binascii.Error:
            mime = b""
        if not mime:
            return _graph_error(request, 400, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content.")
        message = email.message_from_bytes(mime, policy=email.policy.default)
        recipients = [address for _, address in getaddresses([str(v) for h in ("To", "Cc", "Bcc") for v in message.get_all(h, [])]) if address]
        if not recipients:
            return _graph_error(request, 400, "ErrorInvalidRecipients", "At least one recipient isn't valid., A message can't be sent because it contains no recipients.")
        senders = [address for _, address in getaddresses([str(v) for h in ("From", "Sender") for v in message.get_all(h, [])])]
        if any(address.lower() != self.mailbox.lower() for address in senders):
            return _graph_error(
                request, 403, "ErrorSendAsDenied",
                "The user account which was used to submit this request does not have the right to send mail on behalf of the specified sending account.",
            )
        self.sent += 1
        request_id = str(uuid.uuid4())
        _header(request, "request-id", request_id)
        _header(request, "client-request-id", request_id)
        self.on_message(SentMessage(self.sent, request_id, self.mailbox, recipients, mime))
        request.setResponseCode(202)
        return b""


def _body(request: Request) -> bytes:
    assert request.content is not None
    request.content.seek(0)
    body: bytes = request.content.read(MAX_REQUEST + 1)
    return body


def _header(request: Request, name: str, value: str) -> None:
    request.responseHeaders.setRawHeaders(name.encode("ascii"), [value.encode("latin-1")])


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json(request: Request, status: int, body: object) -> bytes:
    request.setResponseCode(status)
    _header(request, "content-type", "application/json; charset=utf-8")
    return json.dumps(body).encode("utf-8")


def _graph_error(request: Request, status: int, code: str, message: str) -> bytes:
    request_id = str(uuid.uuid4())
    _header(request, "request-id", request_id)
    return _json(request, status, {"error": {"code": code, "message": message, "innerError": {"request-id": request_id}}})


def _token_error(request: Request, status: int, error: str, aadsts: int, description: str) -> bytes:
    trace = str(uuid.uuid4())
    text = f"AADSTS{aadsts}: {description} Trace ID: {trace} Correlation ID: {uuid.uuid4()} Timestamp: {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime())}"
    return _json(request, status, {"error": error, "error_description": text, "error_codes": [aadsts], "trace_id": trace})
