"""A stand-in for Microsoft Graph's mail API and the Microsoft identity platform's token endpoint.

One twisted.web server over TLS (a trustme certificate for ``localhost`` from the session's PKI),
run on the harness's reactor thread like the proxy itself. Tests stay synchronous: they start it,
point a Graph upstream at ``base_url`` / ``token_url`` with ``ca_file``, and read what it received.

What it serves, and what it checks (the Microsoft page each behaviour follows is named in brackets):

- ``POST /{tenant}/oauth2/v2.0/token``: the client credentials grant [identity platform: "OAuth 2.0
  client credentials flow"]. The tenant, ``grant_type=client_credentials``, ``client_id`` and
  ``scope=https://graph.microsoft.com/.default`` must be right; the client proves itself either with
  ``client_secret`` (in the form or as HTTP Basic) or with ``client_assertion_type`` =
  ``urn:ietf:params:oauth:client-assertion-type:jwt-bearer`` and a ``client_assertion`` JWT
  [identity platform: "certificate credentials"; RFC 7523]: alg RS256 or PS256 (PSS with a
  32-byte salt, RFC 7518), an ``x5t`` (SHA-1) or ``x5t#S256`` (SHA-256) thumbprint of a
  registered certificate, a signature by that certificate's key, ``aud`` = this token URL,
  ``iss`` = ``sub`` = client id, a ``jti`` never seen before, ``nbf`` not in the future and
  ``exp`` not past (``leeway`` seconds either way), a registered certificate not expired.
  Success gives ``{"token_type": "Bearer", "expires_in": ..., "access_token": ...}`` with an
  opaque token (or a JWT carrying ``roles`` with ``jwt_tokens = True``, for ``relayproxy check``);
  failures give the platform's error shape (``error``, ``error_description`` starting
  ``AADSTSnnnn:`` and ending with trace/correlation ids, ``error_codes``, ``timestamp``,
  ``trace_id``, ``correlation_id``), ``invalid_client`` with HTTP 401, the others with 400.
  The AADSTS numbers it is sure of: 7000215 (wrong secret), 700016 (unknown client id), 70011
  (scope), 900144 (missing parameter), 7000218 (no credential), 90002 (tenant), 700024 (time
  range), 700027 (certificate/signature); the others are plausible, not verified.
- Graph routes, each behind ``Authorization: Bearer`` with a token this stand-in issued, not
  revoked and not expired (401 ``InvalidAuthenticationToken`` otherwise), for a mailbox it knows
  (404 ``ErrorInvalidUser``), with the application role the route needs (403 ``ErrorAccessDenied``:
  ``Mail.Send`` to send, ``Mail.ReadWrite`` for drafts and attachments) [user-sendmail,
  user-post-messages, attachment-createuploadsession, message-send permission tables]; ``/me``
  answers 400, as Graph does for an app-only token ["Send Outlook messages from another user":
  app tokens send through the user's own mailbox]:

  - ``POST /v1.0/users/{id}/sendMail``: ``text/plain`` with the MIME message base64-encoded
    (line breaks allowed, as in Microsoft's example), or ``application/json`` with
    ``{"message": ..., "saveToSentItems": ...}`` [user-sendmail]. Bad base64 gives 400
    ``ErrorMimeContentInvalidBase64String`` [user-sendmail]; a request over ``max_request_bytes``
    (4 MB) gives 413 ``RequestEntityTooLarge`` [Graph errors: 413; the 4 MB request limit];
    no recipient or a malformed one gives 400 ``ErrorInvalidRecipients``; a From (or Sender)
    other than the mailbox, without a ``send_as`` grant, gives 403 ``ErrorSendAsDenied``
    ["Send Outlook messages from another user": Send As / Send on Behalf]. Success is 202 with
    ``request-id`` and ``client-request-id`` headers and no body; the message is recorded as a
    ``Delivery`` whose recipients are its To, Cc and Bcc, Bcc removed from what they see.
  - The large-message path [user-post-messages, "Attach large files to Outlook messages",
    attachment-createuploadsession, uploadSession resource, message-send]: ``POST .../messages``
    (base64 MIME as ``text/plain``, or JSON) creates a draft (201, a message resource with its
    ``id``); ``POST .../messages/{mid}/attachments`` adds a small file attachment (201);
    ``POST .../messages/{mid}/attachments/createUploadSession`` with ``{"AttachmentItem":
    {"attachmentType": "file", "name", "size"}}`` answers 201 with ``uploadUrl`` (on this
    stand-in, shaped like Outlook's, pre-authenticated by an ``authtoken``),
    ``expirationDateTime`` and ``nextExpectedRanges: ["0-"]``; a size under 3 MB gives 400
    ``ErrorAttachmentSizeShouldNotBeLessThanMinimumSize``. ``PUT uploadUrl`` takes
    ``Content-Type: application/octet-stream``, ``Content-Range: bytes a-b/total`` and no
    ``Authorization`` header; ranges must be in order and contiguous (416 ``invalidRange``
    otherwise [Graph errors: invalidRange, fragmentOverlap, fragmentOutOfOrder]), each at most
    4 MB, each but the last a multiple of 320 KiB (the rule Microsoft documents for upload
    sessions in driveItem-createuploadsession and the SDKs' LargeFileUploadTask; the Outlook
    pages themselves only say "up to 4 MB each time"). Intermediate answers are 200 with
    ``nextExpectedRanges: ["<next byte>"]``, the last one 201 with a ``Location``; ``DELETE
    uploadUrl`` cancels (204). ``POST .../messages/{mid}/send`` sends the draft (202) and records
    the assembled message (the draft's MIME with the attachments added as parts);
    ``DELETE .../messages/{mid}`` removes a draft (204).
  - ``PATCH .../messages/{mid}`` with ``{"singleValueExtendedProperties": [{"id", "value"}]}``
    [singlevaluelegacyextendedproperty-post-singlevalueextendedproperties: ``Mail.ReadWrite``,
    200 with the message]: each id and value must be a string (400 ``ErrorInvalidProperty``
    otherwise); they are recorded on the draft (``Draft.extended``). A draft whose
    PidTagDeleteAfterSubmit (``DELETE_AFTER_SUBMIT``, the documented proptag form) is ``"true"``
    is sent without a copy in Sent Items: its ``Delivery`` has ``save_to_sent`` False.

- Scripted answers, per route, in a queue: ``graph.script("sendMail", throttled(7), drop())``.
  Each request to the route takes the next one (after its token was checked; before anything
  else). Builders: ``throttled`` (429 + Retry-After) [Graph throttling guidance],
  ``unavailable`` (503 + Retry-After) and ``gateway_timeout`` (504) [Graph errors],
  ``access_denied``, ``send_as_denied``, ``invalid_recipients``, ``message_too_large``,
  ``request_too_large``, ``unauthorized``, ``server_error``, ``graph_error`` (any), ``hang``
  (never answers), ``drop`` (closes the connection unanswered), ``slow`` (answers normally, late),
  ``token_error`` (the token endpoint's shape). Graph errors have Graph's body,
  ``{"error": {"code", "message", "innerError": {"date", "request-id", "client-request-id"}}}``
  [Graph errors: error resource type].

Every request is recorded (``requests``), answered or not; ``deliveries`` holds what was sent
(``messages()`` the parsed MIME, ``recipients()`` who receives each), ``drafts`` what is still
unsent, ``client_assertions`` each decoded assertion.
"""

from __future__ import annotations

import base64
import binascii
import copy
import datetime
import email
import email.policy
import email.utils
import json
import re
import secrets
import time
import uuid
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from harness import PKI, ensure_reactor, reactor
from twisted.internet import ssl
from twisted.internet.threads import blockingCallFromThread
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

TENANT = "11111111-2222-3333-4444-555555555555"
CLIENT_ID = "00000000-0000-0000-0000-00000000c1d0"
CLIENT_SECRET = "graph-client-secret~value"
MAILBOX = "alerts@example.org"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

MAX_REQUEST_BYTES = 4 * 1024 * 1024
"""Graph's limit on one request (sendMail with MIME, a draft, one uploaded range)."""
TENANT_MESSAGE_LIMIT = 35 * 1024 * 1024
"""Exchange Online's default maximum message size (a tenant can raise it to 150 MB)."""
MIN_UPLOAD_SESSION_BYTES = 3 * 1024 * 1024
"""createUploadSession refuses smaller attachments: those go in one POST."""
CHUNK_MULTIPLE = 320 * 1024
"""Each uploaded range but the last is a multiple of 320 KiB."""
DELETE_AFTER_SUBMIT = "Boolean 0x0E01000B"
"""PidTagDeleteAfterSubmit in the id format "{type} {proptag}" (the whole property tag: id 0x0E01,
PT_BOOLEAN 0x000B), as Microsoft's "Outlook extended properties overview" writes proptags."""

Route = Literal[
    "token",
    "sendMail",
    "createDraft",
    "addAttachment",
    "createUploadSession",
    "upload",
    "cancelUpload",
    "send",
    "deleteDraft",
    "updateMessage",
    "graph",
]
"""A route for ``script``; ``"graph"`` is any Graph route without a queue of its own."""

GRAPH_ROUTES = frozenset({"sendMail", "createDraft", "addAttachment", "createUploadSession", "send", "deleteDraft", "updateMessage"})
ROLE_FOR = {
    "sendMail": "Mail.Send",
    "send": "Mail.Send",
    "createDraft": "Mail.ReadWrite",
    "addAttachment": "Mail.ReadWrite",
    "createUploadSession": "Mail.ReadWrite",
    "deleteDraft": "Mail.ReadWrite",
    "updateMessage": "Mail.ReadWrite",
}
ODATA_JSON = "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8"

POLICY = email.policy.default


# -- scripted answers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One scripted answer. ``action``: ``reply`` (status, error code and message, headers),
    ``hang`` (never answers), ``drop`` (closes the connection), ``pass`` (answers as if
    unscripted). ``delay`` seconds pass first, whatever the action."""

    action: Literal["reply", "hang", "drop", "pass"] = "reply"
    status: int = 500
    code: str = ""
    message: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0
    aadsts: int | None = None
    """For the token endpoint: the AADSTS number in ``error_description`` and ``error_codes``."""
    body: bytes | None = None
    """Raw bytes instead of an error body (with ``content_type``)."""
    content_type: str = "text/html"


def graph_error(status: int, code: str, message: str, *, retry_after: float | None = None, delay: float = 0.0) -> Answer:
    headers = (("Retry-After", _number(retry_after)),) if retry_after is not None else ()
    return Answer("reply", status, code, message, headers, delay)


def throttled(retry_after: float = 5, *, code: str = "ApplicationThrottled") -> Answer:
    """429, as Graph throttles mail (the Outlook limits answer ``ApplicationThrottled``)."""
    return graph_error(429, code, "Application is over its MailboxConcurrency limit.", retry_after=retry_after)


def unavailable(retry_after: float | None = 10) -> Answer:
    return graph_error(503, "ServiceUnavailable", "The service is temporarily unavailable. Retry later.", retry_after=retry_after)


def gateway_timeout() -> Answer:
    return graph_error(504, "GatewayTimeout", "The gateway did not receive a timely response from the upstream server.")


def server_error() -> Answer:
    return graph_error(500, "InternalServerError", "An internal server error occurred while processing the request.")


def access_denied() -> Answer:
    return graph_error(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")


SEND_AS_DENIED_MESSAGE = (
    "The user account which was used to submit this request does not have the right to send mail on behalf of the "
    "specified sending account., Cannot submit message."
)


def send_as_denied() -> Answer:
    return graph_error(403, "ErrorSendAsDenied", SEND_AS_DENIED_MESSAGE)


def invalid_recipients(message: str = "At least one recipient is not valid.") -> Answer:
    return graph_error(400, "ErrorInvalidRecipients", message)


def message_too_large() -> Answer:
    """413 from the tenant's message size limit (the request itself was within 4 MB)."""
    return graph_error(413, "ErrorMessageSizeExceeded", "The message exceeds the maximum supported size.")


def request_too_large() -> Answer:
    """413 from Graph's 4 MB request limit."""
    return graph_error(413, "RequestEntityTooLarge", "The maximum request length supported is 4MB.")


def unauthorized(message: str = "Lifetime validation failed, the token is expired.") -> Answer:
    """401 for a token that was good a moment ago (the client should fetch a new one)."""
    return Answer("reply", 401, "InvalidAuthenticationToken", message, (("WWW-Authenticate", _WWW_AUTHENTICATE),))


def token_error(status: int = 400, error: str = "invalid_request", aadsts: int = 90000, description: str = "Scripted failure.") -> Answer:
    """An error of the token endpoint: ``{"error": error, "error_description": "AADSTS<n>: ..."}``."""
    return Answer("reply", status, error, description, aadsts=aadsts)


def raw(status: int, body: bytes, content_type: str = "text/html", *, headers: Iterable[tuple[str, str]] = ()) -> Answer:
    """Any status with these bytes (a proxy's HTML error page, say)."""
    return Answer("reply", status, headers=tuple(headers), body=body, content_type=content_type)


def hang() -> Answer:
    """The request is read and never answered (the client's timeout decides)."""
    return Answer("hang")


def drop(delay: float = 0.0) -> Answer:
    """The connection is closed without an answer."""
    return Answer("drop", delay=delay)


def slow(seconds: float) -> Answer:
    """The normal answer, ``seconds`` late."""
    return Answer("pass", delay=seconds)


# -- certificates and client assertions --------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class ClientCertificate:
    """An application's certificate credential: the files a Graph upstream is configured with."""

    certificate_file: Path
    key_file: Path
    certificate: x509.Certificate
    private_key: rsa.RSAPrivateKey

    @property
    def x5t(self) -> str:
        """Base64url SHA-1 thumbprint of the DER certificate."""
        return b64url(self.certificate.fingerprint(hashes.SHA1()))

    @property
    def x5t_s256(self) -> str:
        """Base64url SHA-256 thumbprint of the DER certificate."""
        return b64url(self.certificate.fingerprint(hashes.SHA256()))


def make_client_certificate(
    directory: Path,
    name: str = "graph-app",
    *,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    key_size: int = 2048,
) -> ClientCertificate:
    """A self-signed RSA certificate and its key (PEM; the key PKCS#8, unencrypted), as an app
    registration takes one; written to ``directory/name.crt`` and ``directory/name.key``."""
    now = datetime.datetime.now(datetime.UTC)
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - datetime.timedelta(days=1))
        .not_valid_after(not_after or now + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / f"{name}.crt", directory / f"{name}.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_file.chmod(0o600)
    return ClientCertificate(cert_file, key_file, certificate, key)


def _pss() -> padding.PSS:
    # RFC 7518 3.5: the salt is as long as the hash output.
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)


def sign_jwt(header: dict[str, Any], claims: dict[str, Any], key: rsa.RSAPrivateKey) -> str:
    """A compact JWS; ``header["alg"]`` is RS256 or PS256 (anything else gets an RS256 signature)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}".encode("ascii")
    pad: padding.AsymmetricPadding = _pss() if header.get("alg") == "PS256" else padding.PKCS1v15()
    return signing_input.decode("ascii") + "." + b64url(key.sign(signing_input, pad, hashes.SHA256()))


def sign_client_assertion(
    certificate: ClientCertificate,
    *,
    client_id: str,
    audience: str,
    alg: str = "PS256",
    thumbprint: Literal["x5t#S256", "x5t", "both"] = "x5t#S256",
    lifetime: float = 600,
    claims: dict[str, Any] | None = None,
    header: dict[str, Any] | None = None,
    key: rsa.RSAPrivateKey | None = None,
) -> str:
    """A client assertion as Microsoft's identity platform takes it; ``claims``/``header`` override
    or add fields (a value of ``None`` removes one), ``key`` signs instead of the certificate's."""
    now = int(time.time())
    head: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if thumbprint in ("x5t#S256", "both"):
        head["x5t#S256"] = certificate.x5t_s256
    if thumbprint in ("x5t", "both"):
        head["x5t"] = certificate.x5t
    body: dict[str, Any] = {
        "aud": audience,
        "iss": client_id,
        "sub": client_id,
        "jti": str(uuid.uuid4()),
        "nbf": now,
        "iat": now,
        "exp": now + int(lifetime),
    }
    for target, changes in ((head, header), (body, claims)):
        for name, value in (changes or {}).items():
            if value is None:
                target.pop(name, None)
            else:
                target[name] = value
    return sign_jwt(head, body, key or certificate.private_key)


# -- what was received --------------------------------------------------------------------------


@dataclass
class Seen:
    """One request as it arrived, and how it was answered."""

    method: str
    uri: str
    """Path and query, as sent."""
    route: str
    headers: dict[str, str]
    """Lower-cased names; the last value of each."""
    body: bytes
    request_id: str
    client_request_id: str
    status: int | None = None
    """None while unanswered, and for ``hang`` and ``drop``."""
    outcome: str = ""
    """``answered``, ``scripted``, ``hung``, ``dropped``."""

    @property
    def path(self) -> str:
        return urlsplit(self.uri).path

    @property
    def form(self) -> dict[str, str]:
        """The body as a form (the token endpoint's requests)."""
        return {k: v[-1] for k, v in parse_qs(self.body.decode("latin-1"), keep_blank_values=True).items()}

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Attachment:
    name: str
    content_type: str
    data: bytes
    is_inline: bool = False
    content_id: str | None = None
    via: Literal["post", "upload"] = "post"


@dataclass
class Delivery:
    """One message Graph accepted (202): what it would deliver, and to whom."""

    mailbox: str
    via: Literal["sendMail", "sendMail-json", "draft"]
    request_id: str
    to: list[str]
    cc: list[str]
    bcc: list[str]
    save_to_sent: bool
    raw: bytes | None = None
    """The MIME message as decoded from the request (for a draft: assembled with its attachments)."""
    message: EmailMessage | None = None
    json: dict[str, Any] | None = None
    """The JSON message, for the JSON forms."""
    attachments: list[Attachment] = field(default_factory=list)
    """For a draft: the attachments added to it, in order."""

    @property
    def recipients(self) -> list[str]:
        """Everyone who receives it: To, Cc, then Bcc, each address once."""
        seen: set[str] = set()
        out: list[str] = []
        for address in self.to + self.cc + self.bcc:
            if address.lower() not in seen:
                seen.add(address.lower())
                out.append(address)
        return out

    @property
    def visible(self) -> EmailMessage | None:
        """The message as its recipients see it: without the Bcc header."""
        if self.message is None:
            return None
        shown = copy.deepcopy(self.message)
        del shown["Bcc"]
        return shown


@dataclass
class UploadSession:
    id: str
    mailbox: str
    draft_id: str
    name: str
    size: int
    content_type: str
    is_inline: bool
    content_id: str | None
    authtoken: str
    expires: float
    received: bytearray = field(default_factory=bytearray)
    ranges: list[tuple[int, int]] = field(default_factory=list)
    """Each accepted ``Content-Range`` (first, last byte)."""


@dataclass
class Draft:
    id: str
    mailbox: str
    raw: bytes | None
    message: EmailMessage | None
    json: dict[str, Any] | None
    attachments: list[Attachment] = field(default_factory=list)
    extended: dict[str, str] = field(default_factory=dict)
    """Its single-value extended properties, by id as sent (PATCH .../messages/{mid})."""

    @property
    def delete_after_submit(self) -> bool:
        # Only the documented form counts (hex digits in either case): a short "Boolean 0x0E01"
        # would be recorded and not honoured, so a test sees which form the proxy sends.
        return any(key.lower() == DELETE_AFTER_SUBMIT.lower() and value.strip().lower() == "true" for key, value in self.extended.items())


@dataclass
class IssuedToken:
    value: str
    client_id: str
    credential: Literal["secret", "certificate"]
    roles: list[str]
    expires: float
    revoked: bool = False


@dataclass
class _Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


_WWW_AUTHENTICATE = 'Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize", error="invalid_token"'
_UPLOAD_PATH = re.compile(r"^/api/v2\.0/Users\('([^']*)'\)/Messages\('([^']*)'\)/AttachmentSessions\('([^']*)'\)$")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _graph_time(when: datetime.datetime) -> str:
    """As Graph writes expirationDateTime: seven fractional digits and a Z."""
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond:06d}0Z"


def _item_id() -> str:
    return "AAMkAD" + b64url(secrets.token_bytes(24)) + "AAA="


def _addresses(values: list[Any]) -> list[str] | None:
    """The addresses in some address headers; None when one is malformed."""
    out: list[str] = []
    for name, address in email.utils.getaddresses([str(v) for v in values]):
        if not name and not address:
            continue
        if not re.fullmatch(r"[^@\s<>]+@[^@\s<>]+", address):
            return None
        out.append(address)
    return out


def _json_addresses(value: Any) -> list[str] | None:
    if value is None:
        return []
    if not isinstance(value, list):
        return None
    out: list[str] = []
    for item in value:
        address = item.get("emailAddress", {}).get("address") if isinstance(item, dict) else None
        if not isinstance(address, str) or not re.fullmatch(r"[^@\s<>]+@[^@\s<>]+", address):
            return None
        out.append(address)
    return out


def _is_true(value: Any, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, str):
        return value.strip().lower() != "false"
    return bool(value)


class _Site(Site):
    """A Site that remembers its connections, so that ``stop`` can close them."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.noisy = False
        self.connections: weakref.WeakSet[Any] = weakref.WeakSet()

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        self.connections.add(protocol)
        return protocol


class _Root(Resource):
    isLeaf = True

    def __init__(self, standin: GraphStandIn) -> None:
        super().__init__()
        self.standin = standin

    def render(self, request: Request) -> int:  # type: ignore[override]
        return self.standin._serve(request)


# -- the stand-in --------------------------------------------------------------------------------


class GraphStandIn:
    """Microsoft Graph (mail) and the identity platform's token endpoint on one HTTPS port.

    Configure by setting attributes before the client acts; read ``requests``, ``deliveries``,
    ``drafts``, ``client_assertions``, ``tokens``.
    """

    def __init__(
        self,
        pki: PKI,
        *,
        tenant: str = TENANT,
        client_id: str = CLIENT_ID,
        client_secret: str | None = CLIENT_SECRET,
        mailbox: str = MAILBOX,
    ) -> None:
        self.pki = pki
        self.tenant = tenant
        self.client_id = client_id
        self.client_secret = client_secret
        """None: the app has no secret (certificates only)."""
        self.mailbox = mailbox
        self.mailboxes: set[str] = {mailbox}
        self.send_as: dict[str, set[str]] = {}
        """mailbox -> other From/Sender addresses it may send as (Send As / Send on Behalf)."""
        self.roles: list[str] = ["Mail.Send", "Mail.ReadWrite"]
        """The application permissions consented for the app: the token's roles."""
        self.expires_in = 3599
        self.jwt_tokens = False
        """Issue JWT-shaped access tokens (with ``roles``) instead of opaque ones."""
        self.leeway = 60.0
        """Clock skew allowed on an assertion's nbf and exp."""
        self.max_request_bytes = MAX_REQUEST_BYTES
        self.max_message_bytes = TENANT_MESSAGE_LIMIT
        self.min_upload_session_bytes = MIN_UPLOAD_SESSION_BYTES
        self.chunk_multiple: int | None = CHUNK_MULTIPLE
        self.upload_session_lifetime = 15 * 60.0

        self.certificates: list[x509.Certificate] = []
        self.requests: list[Seen] = []
        self.deliveries: list[Delivery] = []
        self.drafts: dict[str, Draft] = {}
        self.sessions: dict[str, UploadSession] = {}
        self.tokens: dict[str, IssuedToken] = {}
        self.client_assertions: list[dict[str, Any]] = []
        """Each assertion that verified: ``{"header": {...}, "claims": {...}}``."""
        self.deleted_drafts: list[str] = []
        self._jtis: set[str] = set()
        self._scripts: dict[str, list[Answer]] = {}
        self._hung: list[Request] = []
        self._port: Any = None
        self._site: _Site | None = None
        self._signing_key: rsa.RSAPrivateKey | None = None

    # -- life ---------------------------------------------------------------------------------

    def start(self) -> GraphStandIn:
        ensure_reactor()
        cert, key = self.pki.issue("graph-standin", "localhost")
        # pyOpenSSL takes cryptography's objects (its own stubs still name X509 and PKey).
        private_key: Any = serialization.load_pem_private_key(key.read_bytes(), password=None)
        certificate: Any = x509.load_pem_x509_certificate(cert.read_bytes())
        options = ssl.CertificateOptions(privateKey=private_key, certificate=certificate)
        self._site = _Site(_Root(self))
        self._port = blockingCallFromThread(reactor, reactor.listenSSL, 0, self._site, options, interface="127.0.0.1")
        return self

    def stop(self) -> None:
        def close() -> Any:
            assert self._site is not None
            for protocol in list(self._site.connections):
                transport = getattr(protocol, "transport", None)
                if transport is not None:
                    transport.abortConnection()
            self._hung.clear()
            return self._port.stopListening()

        blockingCallFromThread(reactor, close)

    @property
    def port(self) -> int:
        return int(self._port.getHost().port)

    @property
    def origin(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def base_url(self) -> str:
        """What ``graph_url`` is for Graph itself: ``https://graph.microsoft.com/v1.0``."""
        return f"{self.origin}/v1.0"

    @property
    def token_url(self) -> str:
        """``https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token``, here."""
        return f"{self.origin}/{self.tenant}/oauth2/v2.0/token"

    @property
    def ca_file(self) -> Path:
        """The CA that signed this server's certificate (PEM)."""
        return self.pki.ca_path

    # -- set-up -------------------------------------------------------------------------------

    def register_certificate(self, certificate: ClientCertificate | x509.Certificate | Path) -> None:
        """Add a certificate credential to the app registration."""
        if isinstance(certificate, ClientCertificate):
            certificate = certificate.certificate
        elif isinstance(certificate, Path):
            certificate = x509.load_pem_x509_certificate(certificate.read_bytes())
        self.certificates.append(certificate)

    def make_certificate(self, directory: Path, name: str = "graph-app", **kwargs: Any) -> ClientCertificate:
        """``make_client_certificate``, registered with the app."""
        made = make_client_certificate(directory, name, **kwargs)
        self.register_certificate(made)
        return made

    def client_assertion(self, certificate: ClientCertificate, **kwargs: Any) -> str:
        """``sign_client_assertion`` for this app and token URL."""
        return sign_client_assertion(certificate, client_id=self.client_id, audience=self.token_url, **kwargs)

    def script(self, route: Route, *answers: Answer) -> None:
        """Queue answers for the next requests to ``route``, one each, in order."""
        self._scripts.setdefault(route, []).extend(answers)

    def revoke_tokens(self) -> None:
        """Every token issued so far is refused from now on (401)."""
        for token in self.tokens.values():
            token.revoked = True

    def expire_tokens(self) -> None:
        """Every token issued so far has expired."""
        for token in self.tokens.values():
            token.expires = min(token.expires, time.time() - 1)

    def upstream_toml(
        self,
        directory: Path,
        name: str = "m365",
        *,
        certificate: ClientCertificate | None = None,
        extra: str = "",
    ) -> str:
        """An ``[upstream.NAME]`` table with issue 14's keys for this stand-in; with a certificate
        (registered here) instead of the secret, which is otherwise written to a 0600 file."""
        lines = [
            f"[upstream.{name}]",
            'kind = "graph"',
            f'username = "{self.mailbox}"',
            f'token_url = "{self.token_url}"',
            f'client_id = "{self.client_id}"',
            f'graph_url = "{self.base_url}"',
            f'ca_file = "{self.ca_file}"',
        ]
        if certificate is not None:
            if certificate.certificate not in self.certificates:
                self.register_certificate(certificate)
            lines += [
                f'client_certificate_file = "{certificate.certificate_file}"',
                f'client_key_file = "{certificate.key_file}"',
            ]
        else:
            assert self.client_secret is not None, "the app has no secret"
            secret_file = directory / f"{name}-client-secret"
            secret_file.write_text(self.client_secret + "\n")
            secret_file.chmod(0o600)
            lines.append(f'client_secret_file = "{secret_file}"')
        return "\n".join(lines) + "\n" + (extra.strip() + "\n" if extra else "")

    # -- reading what arrived ---------------------------------------------------------------

    def requests_to(self, route: str) -> list[Seen]:
        return [seen for seen in list(self.requests) if seen.route == route]

    def token_requests(self) -> list[dict[str, str]]:
        """The form of every token request, in order."""
        return [seen.form for seen in self.requests_to("token")]

    def messages(self) -> list[EmailMessage]:
        """Each delivered MIME message, parsed (JSON sends have none)."""
        return [d.message for d in list(self.deliveries) if d.message is not None]

    def recipients(self) -> list[list[str]]:
        """Who received each delivered message."""
        return [d.recipients for d in list(self.deliveries)]

    # -- serving ------------------------------------------------------------------------------

    def _serve(self, request: Request) -> int:
        seen, context = self._record(request)
        # A request refused for its credentials leaves the script for the next one.
        answer = self._next_answer(seen.route) if self._check_credentials(seen, context) is None else None
        scripted = None if answer is None or answer.action == "pass" else answer
        if answer is not None and answer.delay > 0:
            reactor.callLater(answer.delay, self._respond, request, seen, context, scripted)
        else:
            self._respond(request, seen, context, scripted)
        return NOT_DONE_YET

    def _record(self, request: Request) -> tuple[Seen, dict[str, str]]:
        assert request.content is not None
        request.content.seek(0)
        body = request.content.read()
        headers = {
            name.decode("latin-1").lower(): values[-1].decode("latin-1")
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        method = request.method.decode("ascii")
        uri = request.uri.decode("latin-1")
        route, context = self._route(method, urlsplit(uri).path)
        seen = Seen(
            method=method,
            uri=uri,
            route=route,
            headers=headers,
            body=body,
            request_id=str(uuid.uuid4()),
            client_request_id=headers.get("client-request-id") or str(uuid.uuid4()),
        )
        self.requests.append(seen)
        return seen, context

    def _route(self, method: str, path: str) -> tuple[str, dict[str, str]]:
        match = _UPLOAD_PATH.match(unquote(path))
        if match:
            route = {"PUT": "upload", "DELETE": "cancelUpload"}.get(method, "unknown")
            return route, {"mailbox": match[1], "draft": match[2], "session": match[3]}
        parts = [unquote(p) for p in path.split("/")[1:]]
        if len(parts) == 4 and parts[1:] == ["oauth2", "v2.0", "token"]:
            return ("token" if method == "POST" else "unknown"), {"tenant": parts[0]}
        if len(parts) < 2 or parts[0] != "v1.0":
            return "unknown", {"segment": parts[0] if parts else ""}
        if parts[1].lower() == "me":
            return "me", {}
        if parts[1].lower() != "users" or len(parts) < 4:
            return "unknown", {"segment": parts[1]}
        user, rest = parts[2], [p.lower() for p in parts[3:]]
        context = {"user": user}
        if len(rest) >= 2:
            context["draft"] = parts[4]
        if method == "POST" and rest == ["sendmail"]:
            return "sendMail", context
        if method == "POST" and rest == ["messages"]:
            return "createDraft", context
        if method == "DELETE" and len(rest) == 2 and rest[0] == "messages":
            return "deleteDraft", context
        if method == "PATCH" and len(rest) == 2 and rest[0] == "messages":
            return "updateMessage", context
        if method == "POST" and len(rest) == 3 and rest[0] == "messages" and rest[2] == "attachments":
            return "addAttachment", context
        if method == "POST" and len(rest) == 4 and rest[0] == "messages" and rest[2:] == ["attachments", "createuploadsession"]:
            return "createUploadSession", context
        if method == "POST" and len(rest) == 3 and rest[0] == "messages" and rest[2] == "send":
            return "send", context
        return "unknown", {"segment": parts[-1]}

    def _next_answer(self, route: str) -> Answer | None:
        for key in (route, "graph" if route in GRAPH_ROUTES else None):
            queue = self._scripts.get(key) if key else None
            if queue:
                return queue.pop(0)
        return None

    def _respond(self, request: Request, seen: Seen, context: dict[str, str], answer: Answer | None) -> None:
        if getattr(request, "_disconnected", False):
            seen.outcome = "client went away"
            return
        reply = self._check_credentials(seen, context)
        if reply is None and answer is not None:
            if answer.action == "hang":
                seen.outcome = "hung"
                self._hung.append(request)
                return
            if answer.action == "drop":
                seen.outcome = "dropped"
                transport: Any = request.channel.transport if request.channel is not None else None
                if transport is not None:
                    transport.abortConnection()
                return
            reply = self._scripted(seen, answer)
            seen.outcome = "scripted"
        if reply is None:
            reply = self._process(seen, context)
            seen.outcome = "answered"
        seen.status = reply.status
        request.setResponseCode(reply.status)
        for name, value in reply.headers.items():
            request.setHeader(name, value)
        if seen.route != "token":
            request.setHeader("request-id", seen.request_id)
            request.setHeader("client-request-id", seen.client_request_id)
        request.setHeader("content-length", str(len(reply.body)))
        if reply.body:
            request.write(reply.body)
        request.finish()

    def _scripted(self, seen: Seen, answer: Answer) -> _Reply:
        headers = dict(answer.headers)
        if answer.body is not None:
            return _Reply(answer.status, answer.body, {"Content-Type": answer.content_type, **headers})
        if seen.route == "token":
            reply = self._token_error(answer.status, answer.code or "server_error", answer.aadsts or 90000, answer.message)
        else:
            reply = self._graph_error(seen, answer.status, answer.code, answer.message)
        reply.headers.update(headers)
        return reply

    # -- errors ----------------------------------------------------------------------------------

    def _graph_error(self, seen: Seen, status: int, code: str, message: str, **headers: str) -> _Reply:
        body = {
            "error": {
                "code": code,
                "message": message,
                "innerError": {
                    "date": _utcnow().strftime("%Y-%m-%dT%H:%M:%S"),
                    "request-id": seen.request_id,
                    "client-request-id": seen.client_request_id,
                },
            }
        }
        return _Reply(status, json.dumps(body).encode(), {"Content-Type": "application/json", "Cache-Control": "private", **headers})

    def _token_error(self, status: int, error: str, aadsts: int, description: str) -> _Reply:
        trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
        stamp = _utcnow().strftime("%Y-%m-%d %H:%M:%SZ")
        body = {
            "error": error,
            "error_description": "\r\n".join(
                (f"AADSTS{aadsts}: {description}", f"Trace ID: {trace}", f"Correlation ID: {correlation}", f"Timestamp: {stamp}")
            ),
            "error_codes": [aadsts],
            "timestamp": stamp,
            "trace_id": trace,
            "correlation_id": correlation,
            "error_uri": f"https://login.microsoftonline.com/error?code={aadsts}",
        }
        return _Reply(status, json.dumps(body).encode(), self._token_headers(trace))

    @staticmethod
    def _token_headers(trace: str) -> dict[str, str]:
        return {
            "Content-Type": "application/json; charset=utf-8",
            "Cache-Control": "no-store, no-cache",
            "Pragma": "no-cache",
            "x-ms-request-id": trace,
        }

    # -- authentication -----------------------------------------------------------------------

    def _check_credentials(self, seen: Seen, context: dict[str, str]) -> _Reply | None:
        """The bearer token of a Graph request, the authtoken of an upload URL; None when good."""
        if seen.route in ("upload", "cancelUpload"):
            return self._check_upload_url(seen, context)
        if seen.route == "token":
            return None
        header = seen.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        value = value.strip()
        if not header or scheme.lower() != "bearer" or not value:
            return self._unauthorized(seen, "Access token is empty.")
        token = self.tokens.get(value)
        if token is None or token.revoked:
            return self._unauthorized(seen, "Access token validation failure. Invalid audience.")
        if token.expires <= time.time():
            return self._unauthorized(seen, "Lifetime validation failed, the token is expired.")
        return None

    def _unauthorized(self, seen: Seen, message: str) -> _Reply:
        return self._graph_error(seen, 401, "InvalidAuthenticationToken", message, **{"WWW-Authenticate": _WWW_AUTHENTICATE})

    def _check_upload_url(self, seen: Seen, context: dict[str, str]) -> _Reply | None:
        session = self.sessions.get(context["session"])
        if session is None or session.mailbox != context["mailbox"] or session.draft_id != context["draft"]:
            return self._graph_error(seen, 404, "ErrorItemNotFound", "The upload session was not found.")
        query = parse_qs(urlsplit(seen.uri).query)
        if query.get("authtoken", [""])[-1] != session.authtoken:
            return self._graph_error(seen, 401, "InvalidAuthenticationToken", "The authtoken of the upload URL is not valid.")
        if "authorization" in seen.headers:
            # The upload URL is pre-authenticated; a Graph token sent to it is refused.
            return self._graph_error(
                seen, 401, "InvalidAuthenticationToken", "The upload URL is pre-authenticated: send no Authorization header."
            )
        if session.expires <= time.time():
            return self._graph_error(seen, 401, "InvalidAuthenticationToken", "The upload session has expired.")
        return None

    # -- the routes ----------------------------------------------------------------------------

    def _process(self, seen: Seen, context: dict[str, str]) -> _Reply:
        if seen.route == "token":
            return self._token(seen, context["tenant"])
        if seen.route == "upload":
            return self._upload(seen, self.sessions[context["session"]])
        if seen.route == "cancelUpload":
            del self.sessions[context["session"]]
            return _Reply(204)
        if seen.route == "me":
            return self._graph_error(seen, 400, "BadRequest", "/me request is only valid with delegated authentication flow.")
        if seen.route == "unknown":
            return self._graph_error(seen, 400, "BadRequest", f"Resource not found for the segment '{context.get('segment', '')}'.")
        mailbox = self._mailbox(context["user"])
        if mailbox is None:
            return self._graph_error(seen, 404, "ErrorInvalidUser", f"The requested user '{context['user']}' is invalid.")
        token = self.tokens[seen.headers["authorization"].partition(" ")[2].strip()]
        if ROLE_FOR[seen.route] not in token.roles:
            return self._graph_error(seen, 403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")
        if seen.route in ("createDraft", "sendMail", "addAttachment") and len(seen.body) > self.max_request_bytes:
            return self._graph_error(seen, 413, "RequestEntityTooLarge", "The maximum request length supported is 4MB.")
        if seen.route == "sendMail":
            return self._send_mail(seen, mailbox)
        if seen.route == "createDraft":
            return self._create_draft(seen, mailbox)
        draft = self.drafts.get(context["draft"])
        if draft is None or draft.mailbox != mailbox:
            return self._graph_error(seen, 404, "ErrorItemNotFound", "The specified object was not found in the store.")
        if seen.route == "addAttachment":
            return self._add_attachment(seen, draft)
        if seen.route == "createUploadSession":
            return self._create_upload_session(seen, draft)
        if seen.route == "deleteDraft":
            del self.drafts[draft.id]
            self.deleted_drafts.append(draft.id)
            return _Reply(204)
        if seen.route == "updateMessage":
            return self._update_message(seen, draft)
        return self._send_draft(seen, draft)

    def _mailbox(self, user: str) -> str | None:
        for mailbox in self.mailboxes:
            if mailbox.lower() == user.lower():
                return mailbox
        return None

    # token endpoint

    def _token(self, seen: Seen, tenant: str) -> _Reply:
        if tenant.lower() != self.tenant.lower():
            return self._token_error(400, "invalid_request", 90002, f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID.")
        content_type = seen.headers.get("content-type", "").split(";")[0].strip().lower()
        form = seen.form if content_type == "application/x-www-form-urlencoded" else {}
        basic_id, basic_secret = self._basic_credentials(seen)
        client_id = form.get("client_id") or basic_id
        for name, value in (("grant_type", form.get("grant_type")), ("client_id", client_id), ("scope", form.get("scope"))):
            if not value:
                return self._token_error(400, "invalid_request", 900144, f"The request body must contain the following parameter: '{name}'.")
        if form["grant_type"] != "client_credentials":
            return self._token_error(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
        if client_id != self.client_id:
            return self._token_error(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory '{self.tenant}'.",
            )
        if form["scope"] != GRAPH_SCOPE:
            return self._token_error(
                400, "invalid_scope", 70011, f"The provided value for the input parameter 'scope' is not valid. The scope {form['scope']} is not valid."
            )
        secret = form.get("client_secret") or basic_secret
        assertion = form.get("client_assertion")
        if secret and assertion:
            return self._token_error(400, "invalid_request", 90015, "Send either client_secret or client_assertion, not both.")
        if secret is not None and secret != "":
            if self.client_secret is None or not secrets.compare_digest(secret, self.client_secret):
                return self._token_error(
                    401,
                    "invalid_client",
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, "
                    f"not the client secret ID, for a secret added to app '{self.client_id}'.",
                )
            return self._issue(client_id, "secret")
        if assertion:
            if form.get("client_assertion_type") != JWT_BEARER:
                return self._token_error(
                    400, "invalid_request", 50027, f"client_assertion_type must be '{JWT_BEARER}'."
                )
            refusal = self._verify_assertion(assertion)
            if refusal is not None:
                return refusal
            return self._issue(client_id, "certificate")
        return self._token_error(
            401, "invalid_client", 7000218, "The request body must contain the following parameter: 'client_assertion' or 'client_secret'."
        )

    @staticmethod
    def _basic_credentials(seen: Seen) -> tuple[str | None, str | None]:
        scheme, _, value = seen.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return None, None
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None, None
        name, _, password = decoded.partition(":")
        # RFC 6749 2.3.1: both are form-urlencoded first.
        return unquote(name.replace("+", " ")), unquote(password.replace("+", " "))

    def _verify_assertion(self, assertion: str) -> _Reply | None:
        def refuse(aadsts: int, description: str) -> _Reply:
            return self._token_error(401, "invalid_client", aadsts, description)

        parts = assertion.split(".")
        try:
            if len(parts) != 3:
                raise ValueError("not three parts")
            header = json.loads(unb64url(parts[0]))
            claims = json.loads(unb64url(parts[1]))
            signature = unb64url(parts[2])
            if not isinstance(header, dict) or not isinstance(claims, dict):
                raise TypeError("not objects")
        except (ValueError, TypeError):
            return refuse(50027, "JWT token is invalid or malformed.")
        alg = header.get("alg")
        if alg not in ("RS256", "PS256"):
            return refuse(50027, f"The client assertion is signed with '{alg}'; RS256 or PS256 is required.")
        thumbprints = {name: header[name] for name in ("x5t", "x5t#S256") if name in header}
        if not thumbprints:
            return refuse(700027, "Client assertion failed signature validation. [Reason - The assertion header has no x5t or x5t#S256.]")
        certificate = self._certificate_for(thumbprints)
        if certificate is None:
            return refuse(
                700027,
                "The certificate with identifier used to sign the client assertion is not registered on application. "
                f"[Reason - The key was not found., Thumbprint of key used by client: '{next(iter(thumbprints.values()))}']",
            )
        if certificate.not_valid_after_utc <= _utcnow() or certificate.not_valid_before_utc > _utcnow():
            return refuse(700027, "Client assertion contains an invalid signature. [Reason - The key used is expired.]")
        key = certificate.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            return refuse(700027, "Client assertion failed signature validation. [Reason - The key is not an RSA key.]")
        pad: padding.AsymmetricPadding = _pss() if alg == "PS256" else padding.PKCS1v15()
        try:
            key.verify(signature, f"{parts[0]}.{parts[1]}".encode("ascii"), pad, hashes.SHA256())
        except InvalidSignature:
            return refuse(700027, "Client assertion failed signature validation.")
        if claims.get("iss") != self.client_id or claims.get("sub") != self.client_id:
            return refuse(700021, "Client assertion application identifier doesn't match 'client_id' parameter.")
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if self.token_url not in audiences:
            return refuse(50012, f"Client assertion audience claim does not match Realm issuer. [aud: {audience!r}]")
        now = time.time()
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if not isinstance(exp, (int, float)) or not isinstance(nbf, (int, float)) or isinstance(exp, bool) or isinstance(nbf, bool):
            return refuse(50027, "The client assertion must carry numeric 'nbf' and 'exp' claims.")
        if exp <= now - self.leeway or nbf > now + self.leeway:
            return refuse(700024, f"Client assertion is not within its valid time range. Current time: {int(now)}, nbf: {nbf}, expiry time of assertion {exp}.")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            return refuse(50027, "The client assertion must carry a 'jti' claim.")
        if jti in self._jtis:
            return refuse(50027, f"The client assertion with jti '{jti}' was already used.")
        self._jtis.add(jti)
        self.client_assertions.append({"header": header, "claims": claims})
        return None

    def _certificate_for(self, thumbprints: dict[str, Any]) -> x509.Certificate | None:
        for certificate in self.certificates:
            expected = {
                "x5t": b64url(certificate.fingerprint(hashes.SHA1())),
                "x5t#S256": b64url(certificate.fingerprint(hashes.SHA256())),
            }
            if all(expected[name] == value for name, value in thumbprints.items()):
                return certificate
        return None

    def _issue(self, client_id: str, credential: Literal["secret", "certificate"]) -> _Reply:
        now = time.time()
        if self.jwt_tokens:
            value = self._jwt_access_token(client_id, now)
        else:
            value = "EwB" + secrets.token_urlsafe(48)
        self.tokens[value] = IssuedToken(value, client_id, credential, list(self.roles), now + self.expires_in)
        body = {"token_type": "Bearer", "expires_in": self.expires_in, "ext_expires_in": self.expires_in, "access_token": value}
        return _Reply(200, json.dumps(body).encode(), self._token_headers(str(uuid.uuid4())))

    def _jwt_access_token(self, client_id: str, now: float) -> str:
        """An app-only token shaped as Graph's are (v1 claims); signed, not meant to be verified."""
        if self._signing_key is None:
            self._signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        claims = {
            "aud": "https://graph.microsoft.com",
            "iss": f"https://sts.windows.net/{self.tenant}/",
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now + self.expires_in),
            "appid": client_id,
            "idtyp": "app",
            "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, client_id)),
            "sub": str(uuid.uuid5(uuid.NAMESPACE_URL, client_id)),
            "tid": self.tenant,
            "roles": list(self.roles),
            "ver": "1.0",
            "uti": b64url(secrets.token_bytes(16)),
        }
        return sign_jwt({"typ": "JWT", "alg": "RS256", "kid": "standin"}, claims, self._signing_key)

    # sendMail

    def _send_mail(self, seen: Seen, mailbox: str) -> _Reply:
        content_type = seen.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "application/json":
            return self._send_mail_json(seen, mailbox)
        if content_type != "text/plain":
            return self._graph_error(seen, 415, "UnsupportedMediaType", f"Content-Type '{content_type}' is not supported: use text/plain for MIME.")
        parsed = self._decode_mime(seen)
        if isinstance(parsed, _Reply):
            return parsed
        raw_mime, message = parsed
        return self._accept(seen, mailbox, "sendMail", raw=raw_mime, message=message, save_to_sent=True)

    def _decode_mime(self, seen: Seen) -> tuple[bytes, EmailMessage] | _Reply:
        text = re.sub(rb"\s+", b"", seen.body)
        try:
            if not text:
                raise binascii.Error("empty")
            raw_mime = base64.b64decode(text, validate=True)
        except binascii.Error:
            return self._graph_error(seen, 400, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content.")
        return raw_mime, email.message_from_bytes(raw_mime, policy=POLICY)

    def _send_mail_json(self, seen: Seen, mailbox: str) -> _Reply:
        try:
            body = json.loads(seen.body)
        except ValueError:
            return self._graph_error(seen, 400, "BadRequest", "Unable to read JSON request payload.")
        message = body.get("message") if isinstance(body, dict) else None
        if not isinstance(message, dict) or not message:
            return self._graph_error(seen, 400, "ErrorInvalidParameter", "The value of the parameter 'Message' is empty.")
        return self._accept(seen, mailbox, "sendMail-json", json_message=message, save_to_sent=_is_true(body.get("saveToSentItems"), True))

    def _accept(
        self,
        seen: Seen,
        mailbox: str,
        via: Literal["sendMail", "sendMail-json", "draft"],
        *,
        raw: bytes | None = None,
        message: EmailMessage | None = None,
        json_message: dict[str, Any] | None = None,
        save_to_sent: bool,
        attachments: list[Attachment] | None = None,
    ) -> _Reply:
        """Checks what Exchange checks on submission; records the delivery and answers 202."""
        if message is not None:
            to, cc, bcc = (_addresses(message.get_all(h, [])) for h in ("To", "Cc", "Bcc"))
            senders = [_addresses(message.get_all(h, [])) for h in ("From", "Sender")]
        else:
            assert json_message is not None
            to, cc, bcc = (_json_addresses(json_message.get(k)) for k in ("toRecipients", "ccRecipients", "bccRecipients"))
            senders = [_json_addresses([json_message[k]] if k in json_message else None) for k in ("from", "sender")]
        if to is None or cc is None or bcc is None:
            return self._graph_error(
                seen, 400, "ErrorInvalidRecipients", "At least one recipient isn't valid., A recipient address is malformed."
            )
        if not to + cc + bcc:
            return self._graph_error(
                seen, 400, "ErrorInvalidRecipients", "At least one recipient isn't valid., A message can't be sent because it contains no recipients."
            )
        allowed = {mailbox.lower()} | {a.lower() for a in self.send_as.get(mailbox, set())}
        for addresses in senders:
            if addresses is None or any(a.lower() not in allowed for a in addresses):
                return self._graph_error(seen, 403, "ErrorSendAsDenied", SEND_AS_DENIED_MESSAGE)
        if raw is not None:
            size = len(raw)
        else:
            size = len(json.dumps(json_message)) + sum(len(a.data) for a in attachments or [])
        if size > self.max_message_bytes:
            return self._graph_error(seen, 413, "ErrorMessageSizeExceeded", "The message exceeds the maximum supported size.")
        self.deliveries.append(
            Delivery(
                mailbox=mailbox,
                via=via,
                request_id=seen.request_id,
                to=to,
                cc=cc,
                bcc=bcc,
                save_to_sent=save_to_sent,
                raw=raw,
                message=message,
                json=json_message,
                attachments=list(attachments or []),
            )
        )
        return _Reply(202)

    # drafts, attachments, upload sessions

    def _create_draft(self, seen: Seen, mailbox: str) -> _Reply:
        content_type = seen.headers.get("content-type", "").split(";")[0].strip().lower()
        raw_mime: bytes | None = None
        message: EmailMessage | None = None
        json_message: dict[str, Any] | None = None
        if content_type == "text/plain":
            parsed = self._decode_mime(seen)
            if isinstance(parsed, _Reply):
                return parsed
            raw_mime, message = parsed
        elif content_type == "application/json":
            try:
                json_message = json.loads(seen.body)
            except ValueError:
                json_message = None
            if not isinstance(json_message, dict):
                return self._graph_error(seen, 400, "BadRequest", "Unable to read JSON request payload.")
        else:
            return self._graph_error(seen, 415, "UnsupportedMediaType", f"Content-Type '{content_type}' is not supported.")
        draft = Draft(_item_id(), mailbox, raw_mime, message, json_message)
        self.drafts[draft.id] = draft
        return _Reply(201, json.dumps(self._message_resource(draft)).encode(), {"Content-Type": ODATA_JSON})

    def _message_resource(self, draft: Draft) -> dict[str, Any]:
        def recipients(addresses: list[str] | None) -> list[dict[str, Any]]:
            return [{"emailAddress": {"address": a}} for a in addresses or []]

        if draft.message is not None:
            lists = [_addresses(draft.message.get_all(h, [])) for h in ("To", "Cc", "Bcc")]
            subject = str(draft.message.get("Subject", ""))
        else:
            assert draft.json is not None
            lists = [_json_addresses(draft.json.get(k)) for k in ("toRecipients", "ccRecipients", "bccRecipients")]
            subject = str(draft.json.get("subject", ""))
        stamp = _utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")
        return {
            "@odata.context": f"{self.base_url}/$metadata#users('{draft.mailbox}')/messages/$entity",
            "id": draft.id,
            "createdDateTime": stamp,
            "lastModifiedDateTime": stamp,
            "subject": subject,
            "isDraft": True,
            "hasAttachments": bool(draft.attachments),
            "toRecipients": recipients(lists[0]),
            "ccRecipients": recipients(lists[1]),
            "bccRecipients": recipients(lists[2]),
        }

    def _json_body(self, seen: Seen) -> dict[str, Any] | _Reply:
        if seen.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return self._graph_error(seen, 415, "UnsupportedMediaType", "Use application/json.")
        try:
            body = json.loads(seen.body)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return self._graph_error(seen, 400, "BadRequest", "Unable to read JSON request payload.")
        return body

    def _add_attachment(self, seen: Seen, draft: Draft) -> _Reply:
        body = self._json_body(seen)
        if isinstance(body, _Reply):
            return body
        if body.get("@odata.type") != "#microsoft.graph.fileAttachment":
            return self._graph_error(seen, 400, "ErrorInvalidRequest", "Only '#microsoft.graph.fileAttachment' is supported here.")
        name, content = body.get("name"), body.get("contentBytes")
        if not isinstance(name, str) or not name or not isinstance(content, str):
            return self._graph_error(seen, 400, "ErrorInvalidParameter", "A file attachment needs 'name' and 'contentBytes'.")
        try:
            data = base64.b64decode(content, validate=True)
        except binascii.Error:
            return self._graph_error(seen, 400, "ErrorInvalidParameter", "The value of 'contentBytes' is not valid base64.")
        attachment = Attachment(
            name,
            str(body.get("contentType") or "application/octet-stream"),
            data,
            bool(body.get("isInline", False)),
            body.get("contentId"),
            "post",
        )
        draft.attachments.append(attachment)
        resource = {
            "@odata.context": f"{self.base_url}/$metadata#users('{draft.mailbox}')/messages('{draft.id}')/attachments/$entity",
            "@odata.type": "#microsoft.graph.fileAttachment",
            "id": _item_id(),
            "name": name,
            "contentType": attachment.content_type,
            "size": len(data),
            "isInline": attachment.is_inline,
        }
        return _Reply(201, json.dumps(resource).encode(), {"Content-Type": ODATA_JSON})

    def _create_upload_session(self, seen: Seen, draft: Draft) -> _Reply:
        body = self._json_body(seen)
        if isinstance(body, _Reply):
            return body
        item = body.get("AttachmentItem", body.get("attachmentItem"))
        if not isinstance(item, dict):
            return self._graph_error(seen, 400, "ErrorInvalidParameter", "The parameter 'AttachmentItem' is missing.")
        size, name = item.get("size"), item.get("name")
        if str(item.get("attachmentType", "")).lower() != "file":
            return self._graph_error(seen, 400, "ErrorInvalidParameter", "AttachmentItem.attachmentType must be 'file'.")
        if not isinstance(name, str) or not name or not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            return self._graph_error(seen, 400, "ErrorInvalidParameter", "AttachmentItem needs a 'name' and a positive 'size'.")
        if size < self.min_upload_session_bytes:
            return self._graph_error(
                seen,
                400,
                "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize",
                "Attachment size must be greater than the minimum size.",
            )
        session = UploadSession(
            id=_item_id(),
            mailbox=draft.mailbox,
            draft_id=draft.id,
            name=name,
            size=size,
            content_type=str(item.get("contentType") or "application/octet-stream"),
            is_inline=bool(item.get("isInline", False)),
            content_id=item.get("contentId"),
            authtoken=b64url(secrets.token_bytes(32)),
            expires=time.time() + self.upload_session_lifetime,
        )
        self.sessions[session.id] = session
        resource = {
            "@odata.context": f"{self.base_url}/$metadata#microsoft.graph.uploadSession",
            "uploadUrl": self._upload_url(session),
            "expirationDateTime": self._expiration(session),
            "nextExpectedRanges": ["0-"],
        }
        return _Reply(201, json.dumps(resource).encode(), {"Content-Type": ODATA_JSON})

    def _upload_url(self, session: UploadSession) -> str:
        return (
            f"{self.origin}/api/v2.0/Users('{session.mailbox}')/Messages('{session.draft_id}')"
            f"/AttachmentSessions('{session.id}')?authtoken={session.authtoken}"
        )

    @staticmethod
    def _expiration(session: UploadSession) -> str:
        return _graph_time(datetime.datetime.fromtimestamp(session.expires, datetime.UTC))

    def _upload(self, seen: Seen, session: UploadSession) -> _Reply:
        content_type = seen.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/octet-stream":
            return self._graph_error(seen, 415, "UnsupportedMediaType", "Content-Type must be application/octet-stream.")
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", seen.headers.get("content-range", "").strip())
        if not match:
            return self._graph_error(seen, 400, "invalidRange", "Content-Range must be 'bytes {start}-{end}/{total}'.")
        start, end, total = (int(g) for g in match.groups())
        chunk = seen.body
        if total != session.size:
            return self._graph_error(seen, 416, "invalidRange", "Declared total size for this fragment is different from that of the upload session.")
        if start < len(session.received):
            return self._graph_error(seen, 416, "invalidRange", "Uploaded fragment overlaps with existing data.")
        if start > len(session.received):
            return self._graph_error(seen, 416, "invalidRange", "Uploaded fragment is out of order.")
        if end < start or end >= total:
            return self._graph_error(seen, 416, "invalidRange", "The Content-Range is outside the file.")
        if len(chunk) != end - start + 1:
            return self._graph_error(seen, 400, "invalidRange", f"The Content-Range names {end - start + 1} bytes; the body has {len(chunk)}.")
        if len(chunk) > self.max_request_bytes:
            return self._graph_error(seen, 413, "RequestEntityTooLarge", "The maximum request length supported is 4MB.")
        last = end + 1 == total
        if not last and self.chunk_multiple and len(chunk) % self.chunk_multiple:
            return self._graph_error(
                seen, 400, "invalidRange", f"Each range but the last must be a multiple of {self.chunk_multiple} bytes; this one has {len(chunk)}."
            )
        session.received += chunk
        session.ranges.append((start, end))
        if not last:
            resource = {
                "@odata.context": f"{self.origin}/api/v2.0/$metadata#Users('{session.mailbox}')/Messages('{session.draft_id}')/AttachmentSessions/$entity",
                "expirationDateTime": self._expiration(session),
                "nextExpectedRanges": [str(end + 1)],
            }
            return _Reply(200, json.dumps(resource).encode(), {"Content-Type": "application/json"})
        del self.sessions[session.id]
        attachment_id = _item_id()
        draft = self.drafts.get(session.draft_id)
        if draft is not None:
            draft.attachments.append(
                Attachment(session.name, session.content_type, bytes(session.received), session.is_inline, session.content_id, "upload")
            )
        location = f"{self.origin}/api/v2.0/Users('{session.mailbox}')/Messages('{session.draft_id}')/Attachments('{attachment_id}')"
        return _Reply(201, b"", {"Location": location})

    def _update_message(self, seen: Seen, draft: Draft) -> _Reply:
        body = self._json_body(seen)
        if isinstance(body, _Reply):
            return body
        properties = body.get("singleValueExtendedProperties", [])
        if not isinstance(properties, list):
            return self._graph_error(seen, 400, "ErrorInvalidProperty", "singleValueExtendedProperties must be a collection.")
        for item in properties:
            key = item.get("id") if isinstance(item, dict) else None
            value = item.get("value") if isinstance(item, dict) else None
            if not isinstance(key, str) or not key or not isinstance(value, str):
                return self._graph_error(seen, 400, "ErrorInvalidProperty", "An extended property needs a string 'id' and 'value'.")
            draft.extended[key] = value
        return _Reply(200, json.dumps(self._message_resource(draft)).encode(), {"Content-Type": ODATA_JSON})

    def _send_draft(self, seen: Seen, draft: Draft) -> _Reply:
        raw_mime: bytes | None = None
        message: EmailMessage | None = None
        if draft.message is not None:
            message = copy.deepcopy(draft.message)
            for attachment in draft.attachments:
                if message.get_content_type() != "multipart/mixed":
                    message.make_mixed()
                maintype, _, subtype = attachment.content_type.partition("/")
                message.add_attachment(
                    attachment.data,
                    maintype=maintype or "application",
                    subtype=subtype or "octet-stream",
                    filename=attachment.name,
                    disposition="inline" if attachment.is_inline else "attachment",
                    cid=f"<{attachment.content_id}>" if attachment.content_id else None,
                )
            raw_mime = message.as_bytes()
        reply = self._accept(
            seen,
            draft.mailbox,
            "draft",
            raw=raw_mime,
            message=message,
            json_message=draft.json,
            # Exchange deletes a message marked PidTagDeleteAfterSubmit once sent (MS-OXOMSG 3.3.5.1.3).
            save_to_sent=not draft.delete_after_submit,
            attachments=draft.attachments,
        )
        if reply.status == 202:
            del self.drafts[draft.id]
        return reply
