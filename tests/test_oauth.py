"""relayproxy.oauth against a real HTTPS token endpoint (twisted.web, trustme certificate).

The reactor runs in the harness's background thread; each test drives it with
blockingCallFromThread, as the end-to-end tests do.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import secrets
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from graph_standin import ClientCertificate as StandinCertificate
from graph_standin import make_client_certificate
from harness import PKI, ensure_reactor, reactor, write_config
from twisted.internet import defer, ssl
from twisted.internet.task import Clock
from twisted.internet.threads import blockingCallFromThread
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from relayproxy.config import ClientCertificate, OAuthConfig, ServiceAccount, UpstreamConfig
from relayproxy.oauth import DevicePrompt, TokenError, TokenSource, device_flow
from relayproxy.smtp.sasl import xoauth2_initial_response

REPO = Path(__file__).resolve().parent.parent
CLIENT_SECRET = "client-secret-value"
REFRESH_TOKEN = "refresh-token-1"
HOLD = object()
"""An answer that never comes."""

Answer = tuple[int, Any]


class Provider(Resource):
    """A token endpoint at /token and a device authorization endpoint at /device.

    ``answers[path]`` is a queue; its last answer repeats. Every request's form is recorded.

    A JWT bearer grant (RFC 7523 2.1) is verified first as Google's endpoint does for a service
    account (``register``): RS256 by the key ``kid`` names, iss its client_email, aud this token
    URL, a lifetime of at most an hour around now, a sub, and a scope delegated to the account in
    Google Admin (``delegated``). A refusal is Google's answer; a verified grant gets the queue's.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[str, list[Answer]] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.port: Any = None
        self.service_accounts: dict[str, ServiceAccountKey] = {}
        """private_key_id -> the key file's contents."""
        self.delegated: dict[str, set[str]] = {}
        """client_id -> the scopes of its domain-wide delegation."""
        self.assertions: list[dict[str, Any]] = []
        """Each verified grant: ``{"header": {...}, "claims": {...}}``."""
        self.headers: dict[str, str] = {}
        """Sent with every answer."""
        self.cookies: list[str | None] = []
        """The Cookie header of each request."""

    def register(self, account: ServiceAccountKey, scopes: set[str] | None = None) -> None:
        self.service_accounts[account.private_key_id] = account
        self.delegated[account.client_id] = {GOOGLE_MAIL_SCOPE} if scopes is None else scopes

    def render_POST(self, request: Request) -> bytes | int:
        path = request.path.decode()
        assert request.args is not None
        form = {k.decode(): v[0].decode() for k, v in request.args.items()}
        self.requests.append((path, form))
        cookie = request.getHeader("cookie")
        self.cookies.append(cookie)
        for name, value in self.headers.items():
            request.setHeader(name, value)
        refusal = self._verify_grant(form["assertion"]) if form.get("grant_type") == JWT_BEARER_GRANT else None
        queue = self.answers[path]
        status, body = refusal or (queue.pop(0) if len(queue) > 1 else queue[0])
        if body is HOLD:
            return NOT_DONE_YET
        request.setResponseCode(status)
        if isinstance(body, bytes):
            request.setHeader("content-type", "text/html")
            return body
        request.setHeader("content-type", "application/json")
        return json.dumps(body).encode()

    def _verify_grant(self, assertion: str) -> Answer | None:
        def invalid_grant(description: str) -> Answer:
            return 400, {"error": "invalid_grant", "error_description": description}

        try:
            head, body, signature = assertion.split(".")
            header, claims = json.loads(unb64url(head)), json.loads(unb64url(body))
            assert isinstance(header, dict) and isinstance(claims, dict)
        except (ValueError, AssertionError):
            return invalid_grant("Invalid JWT: malformed.")
        account = self.service_accounts.get(header.get("kid", ""))
        if header.get("alg") != "RS256" or account is None:
            return invalid_grant("Invalid JWT Signature.")
        try:
            account.private_key.public_key().verify(
                unb64url(signature), f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
        except InvalidSignature:
            return invalid_grant("Invalid JWT Signature.")
        if claims.get("iss") != account.client_email or claims.get("aud") != self.url("/token"):
            return invalid_grant("Invalid JWT: the issuer or the audience is wrong.")
        now, iat, exp = time.time(), claims.get("iat"), claims.get("exp")
        if not (isinstance(iat, int) and isinstance(exp, int) and iat <= now + 60 and exp > now and exp - iat <= 3600):
            return invalid_grant(
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. "
                "Check your iat and exp values in the JWT claim."
            )
        if not claims.get("sub"):
            return invalid_grant("Invalid email or User ID")
        if claims.get("scope") not in self.delegated.get(account.client_id, set()):
            return 401, {
                "error": "unauthorized_client",
                "error_description": "Client is unauthorized to retrieve access tokens using this method, or client not "
                "authorized for any of the scopes requested.",
            }
        self.assertions.append({"header": header, "claims": claims})
        return None

    def url(self, path: str) -> str:
        return f"https://localhost:{self.port.getHost().port}{path}"

    def forms(self, path: str = "/token") -> list[dict[str, str]]:
        return [form for p, form in self.requests if p == path]


@pytest.fixture
def provider(pki: PKI) -> Iterator[Provider]:
    ensure_reactor()
    cert, key = pki.issue("token-endpoint", "localhost")
    # pyOpenSSL takes cryptography's objects (its own X509/PKey are deprecated).
    options = ssl.CertificateOptions(
        privateKey=serialization.load_pem_private_key(key.read_bytes(), password=None),
        certificate=x509.load_pem_x509_certificate(cert.read_bytes()),
    )
    site = Site(Provider())
    site.noisy = False
    resource: Provider = site.resource
    resource.port = blockingCallFromThread(reactor, reactor.listenSSL, 0, site, options, interface="127.0.0.1")
    yield resource
    blockingCallFromThread(reactor, resource.port.stopListening)


GOOGLE_MAIL_SCOPE = "https://mail.google.com/"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def decode_jwt(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """Header, claims, signing input and signature of a compact JWS."""
    head, body, signature = token.split(".")
    return json.loads(unb64url(head)), json.loads(unb64url(body)), f"{head}.{body}".encode(), unb64url(signature)


@dataclass(frozen=True)
class ServiceAccountKey:
    """A Google service account's JSON key file, as the Cloud console downloads it."""

    path: Path
    client_email: str
    client_id: str
    private_key_id: str
    private_key: rsa.RSAPrivateKey
    private_key_pem: str


def make_service_account(directory: Path, token_uri: str | None, name: str = "relay-sender", **overrides: Any) -> ServiceAccountKey:
    """A key file with every field Google writes; ``overrides`` replace (None: remove) fields."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    email = f"{name}@example-project.iam.gserviceaccount.com"
    client_id = str(100000000000000000000 + len(name))
    key_id = secrets.token_hex(20)
    info: dict[str, Any] = {
        "type": "service_account",
        "project_id": "example-project",
        "private_key_id": key_id,
        "private_key": pem,
        "client_email": email,
        "client_id": client_id,
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": f"https://www.googleapis.com/robot/v1/metadata/x509/{email}",
        "universe_domain": "googleapis.com",
    }
    if token_uri is None:
        del info["token_uri"]
    for field_name, value in overrides.items():
        if value is None:
            info.pop(field_name, None)
        else:
            info[field_name] = value
    path = directory / f"{name}.json"
    path.write_text(json.dumps(info, indent=2) + "\n")
    path.chmod(0o600)
    return ServiceAccountKey(path, email, client_id, key_id, key, pem)


def token_answer(token: str = "access-1", expires_in: int = 3600, **extra: Any) -> Answer:
    return 200, {"access_token": token, "token_type": "Bearer", "expires_in": expires_in, **extra}


@pytest.fixture
def upstream(provider: Provider, pki: PKI, tmp_path: Path) -> UpstreamConfig:
    refresh_file = tmp_path / "state" / "m365.refresh-token"
    refresh_file.parent.mkdir()
    refresh_file.write_text(REFRESH_TOKEN + "\n")
    return UpstreamConfig(
        name="m365",
        host="smtp.office365.com",
        port=587,
        tls="starttls",
        username="alerts@example.org",
        auth="xoauth2",
        oauth=OAuthConfig(
            token_url=provider.url("/token"),
            client_id="client-1",
            client_secret=CLIENT_SECRET,
            refresh_token_file=refresh_file,
            scope="https://outlook.office365.com/SMTP.Send offline_access",
            device_authorization_url=provider.url("/device"),
            token_ca_file=pki.ca_path,
        ),
    )


def with_oauth(upstream: UpstreamConfig, **changes: Any) -> UpstreamConfig:
    assert upstream.oauth is not None
    return replace(upstream, oauth=replace(upstream.oauth, **changes))


def on_reactor(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run f on the reactor thread; a coroutine it returns is awaited there."""

    def call() -> Any:
        result = f(*args, **kwargs)
        return defer.Deferred.fromCoroutine(result) if hasattr(result, "__await__") else result

    return blockingCallFromThread(reactor, call)


def source(upstream: UpstreamConfig, **kwargs: Any) -> TokenSource:
    return on_reactor(TokenSource, reactor, upstream, **kwargs)


def test_xoauth2_initial_response() -> None:
    blob = xoauth2_initial_response("alerts@example.org", "tok")
    assert base64.b64decode(blob) == b"user=alerts@example.org\x01auth=Bearer tok\x01\x01"


def test_refresh_grant_token_is_cached(provider: Provider, upstream: UpstreamConfig) -> None:
    provider.answers["/token"] = [token_answer("access-1")]
    tokens = source(upstream)
    assert on_reactor(tokens.token) == "access-1"
    assert on_reactor(tokens.token) == "access-1"
    assert provider.forms() == [
        {
            "grant_type": "refresh_token",
            "client_id": "client-1",
            "refresh_token": REFRESH_TOKEN,
            "client_secret": CLIENT_SECRET,
            "scope": "https://outlook.office365.com/SMTP.Send offline_access",
        }
    ]
    assert CLIENT_SECRET not in repr(tokens) and CLIENT_SECRET not in repr(upstream)


def test_refreshed_when_about_to_expire(provider: Provider, upstream: UpstreamConfig) -> None:
    provider.answers["/token"] = [token_answer("access-1", expires_in=3600), token_answer("access-2")]
    clock = Clock()
    tokens = source(upstream, clock=clock)
    assert on_reactor(tokens.token) == "access-1"
    on_reactor(clock.advance, 3600 - 61)
    assert on_reactor(tokens.token) == "access-1"
    # Within the last minute the token is no longer handed out.
    on_reactor(clock.advance, 2)
    assert on_reactor(tokens.token) == "access-2"
    assert len(provider.forms()) == 2


def test_invalidate_forces_a_refresh(provider: Provider, upstream: UpstreamConfig) -> None:
    provider.answers["/token"] = [token_answer("access-1"), token_answer("access-2")]
    tokens = source(upstream)
    assert on_reactor(tokens.token) == "access-1"
    on_reactor(tokens.invalidate, "some-older-token")
    assert on_reactor(tokens.token) == "access-1"
    on_reactor(tokens.invalidate, "access-1")
    assert on_reactor(tokens.token) == "access-2"


def test_concurrent_callers_share_one_request(provider: Provider, upstream: UpstreamConfig) -> None:
    provider.answers["/token"] = [token_answer("access-1")]
    tokens = source(upstream)

    def many() -> defer.Deferred[list[str]]:
        return defer.gatherResults([defer.Deferred.fromCoroutine(tokens.token()) for _ in range(5)])

    assert blockingCallFromThread(reactor, many) == ["access-1"] * 5
    assert len(provider.forms()) == 1


def test_concurrent_callers_share_one_failure(provider: Provider, upstream: UpstreamConfig) -> None:
    provider.answers["/token"] = [(400, {"error": "invalid_client"}), token_answer("access-1")]
    tokens = source(upstream)

    def many() -> defer.Deferred[Any]:
        calls = [defer.Deferred.fromCoroutine(tokens.token()) for _ in range(3)]
        return defer.DeferredList(calls, consumeErrors=True)

    results = blockingCallFromThread(reactor, many)
    assert [ok for ok, _ in results] == [False] * 3
    assert all(f.check(TokenError) for _, f in results)
    assert len(provider.forms()) == 1
    # A failure is not cached: the next call tries again.
    assert on_reactor(tokens.token) == "access-1"


def test_rotated_refresh_token_is_stored_and_used(provider: Provider, upstream: UpstreamConfig) -> None:
    provider.answers["/token"] = [token_answer("access-1", refresh_token="refresh-token-2"), token_answer("access-2")]
    tokens = source(upstream)
    assert on_reactor(tokens.token) == "access-1"
    assert upstream.oauth is not None and upstream.oauth.refresh_token_file is not None
    path = upstream.oauth.refresh_token_file
    assert path.read_text() == "refresh-token-2\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary file left behind"
    on_reactor(tokens.invalidate, "access-1")
    assert on_reactor(tokens.token) == "access-2"
    assert [form["refresh_token"] for form in provider.forms()] == [REFRESH_TOKEN, "refresh-token-2"]


def test_client_credentials_grant(provider: Provider, upstream: UpstreamConfig) -> None:
    provider.answers["/token"] = [token_answer("app-token", expires_in="3599")]
    app = with_oauth(
        upstream,
        grant="client_credentials",
        scope="https://outlook.office365.com/.default",
        refresh_token_file=None,
        device_authorization_url=None,
    )
    assert on_reactor(source(app).token) == "app-token"
    assert provider.forms() == [
        {
            "grant_type": "client_credentials",
            "client_id": "client-1",
            "client_secret": CLIENT_SECRET,
            "scope": "https://outlook.office365.com/.default",
        }
    ]


def app_certificate(directory: Path, **kwargs: Any) -> tuple[StandinCertificate, ClientCertificate]:
    """A certificate made as for an app registration, and what load_config makes of its files."""
    made = make_client_certificate(directory, **kwargs)
    loaded = ClientCertificate(
        path=made.certificate_file,
        sha256_thumbprint=made.x5t_s256,
        sha1_thumbprint=made.certificate.fingerprint(hashes.SHA1()).hex().upper(),
        not_after=made.certificate.not_valid_after_utc,
        key=made.private_key,
    )
    return made, loaded


def app_only(upstream: UpstreamConfig, **changes: Any) -> UpstreamConfig:
    return with_oauth(
        upstream, grant="client_credentials", scope="https://outlook.office365.com/.default", refresh_token_file=None,
        device_authorization_url=None, **changes,
    )


def test_client_credentials_with_a_certificate(provider: Provider, upstream: UpstreamConfig, tmp_path: Path) -> None:
    provider.answers["/token"] = [token_answer("app-token-1"), token_answer("app-token-2")]
    made, certificate = app_certificate(tmp_path)
    app = app_only(upstream, client_secret=None, client_certificate=certificate)
    tokens = source(app)
    before = int(time.time())
    assert on_reactor(tokens.token) == "app-token-1"
    on_reactor(tokens.invalidate, "app-token-1")
    assert on_reactor(tokens.token) == "app-token-2"
    first, second = provider.forms()
    for form in (first, second):
        assert form.keys() == {"grant_type", "client_id", "client_assertion_type", "client_assertion", "scope"}
        assert form["grant_type"] == "client_credentials" and form["client_id"] == "client-1"
        assert form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    header, claims, signed, signature = decode_jwt(first["client_assertion"])
    # What Microsoft's identity platform documents: PS256 and the certificate's SHA-256 thumbprint.
    assert header == {"alg": "PS256", "typ": "JWT", "x5t#S256": made.x5t_s256}
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    public_key = made.certificate.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    public_key.verify(signature, signed, pss, hashes.SHA256())
    assert claims["aud"] == provider.url("/token")
    assert claims["iss"] == claims["sub"] == "client-1"
    assert before <= claims["nbf"] == claims["iat"] <= int(time.time())
    assert claims["exp"] - claims["iat"] == 300
    # A fresh jti each time: the platform refuses an assertion it has seen.
    assert claims["jti"] != decode_jwt(second["client_assertion"])[1]["jti"]


def test_refused_certificate_names_its_thumbprint(provider: Provider, upstream: UpstreamConfig, tmp_path: Path) -> None:
    provider.answers["/token"] = [(401, {"error": "invalid_client", "error_description": "AADSTS700027: Client assertion failed signature validation."})]
    made, certificate = app_certificate(tmp_path)
    with pytest.raises(TokenError) as info:
        on_reactor(source(app_only(upstream, client_secret=None, client_certificate=certificate)).token)
    detail = info.value.detail
    assert "invalid_client: AADSTS700027" in detail
    assert f"lists the certificate in {made.certificate_file} (thumbprint {certificate.sha1_thumbprint})" in detail
    assert provider.forms()[0]["client_assertion"] not in detail


def test_refused_expired_certificate_says_so(provider: Provider, upstream: UpstreamConfig, tmp_path: Path) -> None:
    provider.answers["/token"] = [(401, {"error": "invalid_client", "error_description": "AADSTS700027: The key used is expired."})]
    ended = datetime.datetime(2024, 3, 1, 12, 0, tzinfo=datetime.UTC)
    made, certificate = app_certificate(tmp_path, not_before=ended - datetime.timedelta(days=365), not_after=ended)
    with pytest.raises(TokenError, match=f"the certificate in {made.certificate_file} expired on 2024-03-01 12:00 UTC"):
        on_reactor(source(app_only(upstream, client_secret=None, client_certificate=certificate)).token)


def service_account_upstream(upstream: UpstreamConfig, account: ServiceAccountKey, provider: Provider) -> UpstreamConfig:
    loaded = ServiceAccount(
        path=account.path,
        client_email=account.client_email,
        private_key_id=account.private_key_id,
        token_uri=provider.url("/token"),
        client_id=account.client_id,
        key=account.private_key,
    )
    return with_oauth(
        replace(upstream, host="smtp.gmail.com", port=465, tls="implicit"),
        grant="service_account", token_url=loaded.token_uri, client_id=account.client_id, client_secret=None,
        scope=GOOGLE_MAIL_SCOPE, refresh_token_file=None, device_authorization_url=None, service_account=loaded,
    )


def test_service_account_grant(provider: Provider, upstream: UpstreamConfig, tmp_path: Path) -> None:
    account = make_service_account(tmp_path, provider.url("/token"))
    provider.register(account)
    provider.answers["/token"] = [token_answer("ya29.service-account-token", expires_in=3599)]
    app = service_account_upstream(upstream, account, provider)
    before = int(time.time())
    assert on_reactor(source(app).token) == "ya29.service-account-token"
    [form] = provider.forms()
    # RFC 7523 2.1: the assertion is the grant; no client id, no secret.
    assert form.keys() == {"grant_type", "assertion"}
    assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    [verified] = provider.assertions
    assert verified["header"] == {"alg": "RS256", "typ": "JWT", "kid": account.private_key_id}
    claims = verified["claims"]
    assert claims == {
        "iss": account.client_email, "sub": "alerts@example.org", "scope": "https://mail.google.com/",
        "aud": provider.url("/token"), "iat": claims["iat"], "exp": claims["iat"] + 3600,
    }
    assert before <= claims["iat"] <= int(time.time())
    assert account.private_key_pem not in repr(app)


def test_service_account_without_delegation(provider: Provider, upstream: UpstreamConfig, tmp_path: Path) -> None:
    account = make_service_account(tmp_path, provider.url("/token"))
    provider.register(account, scopes={"https://www.googleapis.com/auth/gmail.send"})
    provider.answers["/token"] = [token_answer("never")]
    with pytest.raises(TokenError) as info:
        on_reactor(source(service_account_upstream(upstream, account, provider)).token)
    detail = info.value.detail
    assert "refused (HTTP 401): unauthorized_client: Client is unauthorized" in detail
    assert f"Domain-wide delegation) add client ID {account.client_id} with the scope https://mail.google.com/" in detail
    assert provider.forms()[0]["assertion"] not in detail


def test_service_account_key_not_known_to_google(provider: Provider, upstream: UpstreamConfig, tmp_path: Path) -> None:
    # A key deleted in the Cloud console: Google no longer knows its kid.
    account = make_service_account(tmp_path, provider.url("/token"))
    provider.answers["/token"] = [token_answer("never")]
    with pytest.raises(TokenError) as info:
        on_reactor(source(service_account_upstream(upstream, account, provider)).token)
    assert "invalid_grant: Invalid JWT Signature." in info.value.detail
    assert f"key {account.private_key_id} of {account.client_email} is not deleted or disabled" in info.value.detail


def test_provider_error_is_reported_without_secrets(provider: Provider, upstream: UpstreamConfig) -> None:
    provider.answers["/token"] = [
        (400, {"error": "invalid_grant", "error_description": "AADSTS70000: The grant has expired.\r\nTrace ID: 1"})
    ]
    with pytest.raises(TokenError) as info:
        on_reactor(source(upstream).token)
    detail = info.value.detail
    assert detail == str(info.value)
    assert "upstream m365" in detail and "HTTP 400" in detail
    assert "invalid_grant: AADSTS70000: The grant has expired.  Trace ID: 1" in detail
    assert "relayproxy oauth m365" in detail
    for secret in (CLIENT_SECRET, REFRESH_TOKEN):
        assert secret not in detail and secret not in repr(info.value)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ((502, b"<html>Bad Gateway</html>"), "answered HTTP 502 with a body that is no JSON object"),
        ((200, {"token_type": "Bearer"}), "answered without a usable access_token"),
        ((200, {"access_token": "x", "token_type": "mac"}), "issued a mac token, not a Bearer token"),
    ],
)
def test_unusable_answers(provider: Provider, upstream: UpstreamConfig, answer: Answer, expected: str) -> None:
    provider.answers["/token"] = [answer]
    with pytest.raises(TokenError, match=expected):
        on_reactor(source(upstream).token)


def test_untrusted_certificate_is_refused(provider: Provider, upstream: UpstreamConfig) -> None:
    provider.answers["/token"] = [token_answer()]
    # The system's trust store does not know the test CA.
    with pytest.raises(TokenError, match="certificate verify failed"):
        on_reactor(source(with_oauth(upstream, token_ca_file=None)).token)
    assert provider.forms() == [], "nothing was sent over the unverified connection"


def test_timeout(provider: Provider, upstream: UpstreamConfig) -> None:
    provider.answers["/token"] = [(200, HOLD)]
    with pytest.raises(TokenError, match="no answer within 0.5 s"):
        on_reactor(source(upstream, timeout=0.5).token)


def test_oversized_answer_is_cut(provider: Provider, upstream: UpstreamConfig) -> None:
    provider.answers["/token"] = [(200, b"x" * (2 << 20))]
    with pytest.raises(TokenError, match="the answer is larger than 1048576 bytes"):
        on_reactor(source(upstream).token)


def test_redirect_is_not_followed(provider: Provider, upstream: UpstreamConfig) -> None:
    # A followed redirect would carry the form, and its secret, to another place.
    provider.headers["Location"] = provider.url("/elsewhere")
    provider.answers["/token"] = [(307, b"moved")]
    provider.answers["/elsewhere"] = [token_answer()]
    with pytest.raises(TokenError, match="answered HTTP 307 with a body that is no JSON object"):
        on_reactor(source(upstream).token)
    assert [path for path, _ in provider.requests] == ["/token"]


def test_cookies_are_not_kept(provider: Provider, upstream: UpstreamConfig) -> None:
    provider.headers["Set-Cookie"] = "fpc=abc; Path=/; Secure; HttpOnly"
    provider.answers["/token"] = [token_answer("access-1"), token_answer("access-2")]
    tokens = source(upstream)
    assert on_reactor(tokens.token) == "access-1"
    on_reactor(tokens.invalidate, "access-1")
    assert on_reactor(tokens.token) == "access-2"
    assert provider.cookies == [None, None]


def test_missing_refresh_token_file(upstream: UpstreamConfig) -> None:
    assert upstream.oauth is not None and upstream.oauth.refresh_token_file is not None
    upstream.oauth.refresh_token_file.unlink()
    with pytest.raises(TokenError, match="cannot read the refresh token .*relayproxy oauth m365"):
        on_reactor(source(upstream).token)


# -- device authorization grant -----------------------------------------------------------------


@dataclass
class FastClock:
    """Paces polling without waiting: each delay is recorded and passes at once."""

    now: float = 0.0
    delays: list[float] = field(default_factory=list)

    def seconds(self) -> float:
        return self.now

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.delays.append(delay)
        self.now += delay
        return reactor.callLater(0, f, *args, **kwargs)


def device_answer(interval: float = 5, expires_in: int = 900) -> Answer:
    return 200, {
        "device_code": "device-code-1",
        "user_code": "ABCD-EFGH",
        "verification_uri": "https://microsoft.com/devicelogin",
        "expires_in": expires_in,
        "interval": interval,
    }


PENDING: Answer = (400, {"error": "authorization_pending"})


def run_device_flow(upstream: UpstreamConfig, clock: FastClock) -> list[DevicePrompt]:
    prompts: list[DevicePrompt] = []
    on_reactor(device_flow, reactor, upstream, prompts.append, clock=clock)
    return prompts


def test_device_flow_pending_then_success(provider: Provider, upstream: UpstreamConfig) -> None:
    assert upstream.oauth is not None and upstream.oauth.refresh_token_file is not None
    path = upstream.oauth.refresh_token_file
    path.unlink()
    provider.answers["/device"] = [device_answer()]
    provider.answers["/token"] = [PENDING, PENDING, token_answer(refresh_token="new-refresh-token")]
    clock = FastClock()
    [prompt] = run_device_flow(upstream, clock)
    assert prompt == DevicePrompt("https://microsoft.com/devicelogin", "ABCD-EFGH", None, 900.0)
    assert clock.delays == [5, 5, 5]
    assert provider.forms("/device") == [
        {"client_id": "client-1", "scope": "https://outlook.office365.com/SMTP.Send offline_access"}
    ]
    assert provider.forms() == [
        {
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
            "device_code": "device-code-1",
            "client_id": "client-1",
            "client_secret": CLIENT_SECRET,
        }
    ] * 3
    assert path.read_text() == "new-refresh-token\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_device_flow_slow_down(provider: Provider, upstream: UpstreamConfig) -> None:
    provider.answers["/device"] = [device_answer(interval=5)]
    provider.answers["/token"] = [(400, {"error": "slow_down"}), PENDING, token_answer(refresh_token="r")]
    clock = FastClock()
    run_device_flow(upstream, clock)
    assert clock.delays == [5, 10, 10]


def test_device_flow_access_denied(provider: Provider, upstream: UpstreamConfig) -> None:
    provider.answers["/device"] = [device_answer()]
    provider.answers["/token"] = [PENDING, (400, {"error": "access_denied"})]
    with pytest.raises(TokenError, match="access_denied: the sign-in was declined"):
        run_device_flow(upstream, FastClock())
    assert upstream.oauth is not None and upstream.oauth.refresh_token_file is not None
    assert upstream.oauth.refresh_token_file.read_text() == REFRESH_TOKEN + "\n", "left as it was"


def test_device_flow_expires(provider: Provider, upstream: UpstreamConfig) -> None:
    provider.answers["/device"] = [device_answer(interval=5, expires_in=12)]
    provider.answers["/token"] = [PENDING]
    clock = FastClock()
    with pytest.raises(TokenError, match="expired_token: the code expired"):
        run_device_flow(upstream, clock)
    # Polled at 5 and 10 s; at 15 s the code had expired, so no third request.
    assert len(provider.forms()) == 2


def test_device_flow_expired_token_from_provider(provider: Provider, upstream: UpstreamConfig) -> None:
    provider.answers["/device"] = [device_answer()]
    provider.answers["/token"] = [(400, {"error": "expired_token"})]
    with pytest.raises(TokenError, match="expired_token"):
        run_device_flow(upstream, FastClock())


# -- relayproxy oauth NAME ------------------------------------------------------------------------


def oauth_config(directory: Path, pki: PKI, provider: Provider) -> Path:
    (directory / "client-secret").write_text(CLIENT_SECRET + "\n")
    path, _ = write_config(
        directory,
        pki,
        f"""
[upstream.workspace]
host = "smtp.gmail.com"
tls = "implicit"
auth = "xoauth2"
username = "alerts@example.org"
token_url = "{provider.url('/token')}"
device_authorization_url = "{provider.url('/device')}"
client_id = "client-1"
client_secret_file = "client-secret"
refresh_token_file = "state/workspace.refresh-token"
scope = "https://mail.google.com/"
token_ca_file = "{pki.ca_path}"
""",
        extra='[users.app1]\nupstream = "workspace"\n',
    )
    (directory / "state").mkdir()
    return path


def relayproxy(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "relayproxy", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_cli_signs_in(provider: Provider, pki: PKI, tmp_path: Path) -> None:
    config = oauth_config(tmp_path, pki, provider)
    provider.answers["/device"] = [device_answer(interval=0.1)]
    provider.answers["/token"] = [PENDING, token_answer(refresh_token="cli-refresh-token")]
    result = relayproxy("oauth", "workspace", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "open https://microsoft.com/devicelogin" in result.stdout
    assert "enter the code ABCD-EFGH" in result.stdout
    stored = tmp_path / "state" / "workspace.refresh-token"
    assert stored.read_text() == "cli-refresh-token\n"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert "cli-refresh-token" not in result.stdout + result.stderr
    assert len(provider.forms()) == 2


def test_cli_sign_in_declined(provider: Provider, pki: PKI, tmp_path: Path) -> None:
    config = oauth_config(tmp_path, pki, provider)
    provider.answers["/device"] = [device_answer(interval=0.1)]
    provider.answers["/token"] = [(400, {"error": "access_denied"})]
    result = relayproxy("oauth", "workspace", "--config", str(config))
    assert result.returncode == 1
    assert "access_denied: the sign-in was declined" in result.stderr
    assert not (tmp_path / "state" / "workspace.refresh-token").exists()


def test_cli_config_errors(provider: Provider, pki: PKI, tmp_path: Path) -> None:
    config = oauth_config(tmp_path, pki, provider)
    result = relayproxy("oauth", "nosuch", "--config", str(config))
    assert result.returncode == 2
    assert "there is no [upstream.nosuch]; name one of: workspace" in result.stderr
    config.write_text(config.read_text().replace('client_id = "client-1"\n', ""))
    result = relayproxy("oauth", "workspace", "--config", str(config))
    assert result.returncode == 2
    assert "upstream.workspace.client_id: missing" in result.stderr
    assert provider.requests == []
