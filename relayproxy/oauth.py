"""OAuth 2.0 access tokens for upstreams with auth = "xoauth2".

``TokenSource`` keeps one upstream's access token fresh: the refresh-token grant, the client
credentials grant (RFC 6749) with a client secret or a certificate's signed client assertion
(RFC 7523 2.2), or a Google service account's JWT bearer grant (RFC 7523 2.1). ``device_flow`` is
the one-time sign-in of ``relayproxy oauth`` (RFC 8628) that stores the first refresh token. Every
request goes through relayproxy.https (treq) with the certificate verified, and no secret,
assertion or token ever enters a log line, an exception or a repr.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from relayproxy import https
from relayproxy.assertion import CLIENT_ASSERTION_TYPE, JWT_BEARER_GRANT, client_assertion, service_account_assertion
from relayproxy.config import OAuthConfig, UpstreamConfig
from relayproxy.errors import RelayProxyError
from relayproxy.files import write_private_file
from relayproxy.logs import EventLog

log = EventLog("relayproxy.oauth")

HTTP_TIMEOUT = 30.0
"""Seconds for one request to a token endpoint, from connecting to the last byte of the answer."""

REFRESH_MARGIN = 60.0
"""A token that expires within this many seconds is refreshed first, so it cannot lapse mid-session."""

# RFC 6749 5.1 only recommends expires_in; when a provider leaves it out, assume a short life
# rather than keep a dead token for long.
_DEFAULT_LIFETIME = 300.0
# RFC 8628 3.2 and 3.5: the default polling interval, and how much slow_down adds to it.
_DEFAULT_INTERVAL = 5.0
_SLOW_DOWN = 5.0
# Token answers are a few kilobytes; the bound keeps a broken endpoint from filling memory.
_MAX_BODY = 1 << 20

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


class TokenError(RelayProxyError):
    """No access token; ``detail`` names the upstream and what failed, never a secret."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def write_secret_file(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` and a newline atomically, mode 0600, durable on return."""
    write_private_file(path, (text + "\n").encode("utf-8"), _owner_for(path))


def _owner_for(path: Path) -> tuple[int, int] | None:
    """The owner a rewritten ``path`` should keep, if not the writer's.

    When root runs ``relayproxy oauth``, the file must still be the daemon's: keep the owner of an
    existing file, or give a new one the owner of its directory (such as /var/lib/relayproxy).
    """
    if os.geteuid() != 0:
        return None  # only root can give a file away; anyone else writes their own
    try:
        existing = os.stat(path)
    except FileNotFoundError:
        existing = os.stat(path.parent)
    owner = (existing.st_uid, existing.st_gid)
    return None if owner == (os.getuid(), os.getgid()) else owner


@dataclass(frozen=True)
class DevicePrompt:
    """What the person signing in must do: open ``verification_uri`` and enter ``user_code``."""

    verification_uri: str
    user_code: str
    # The same URI with the code filled in, when the provider offers one.
    verification_uri_complete: str | None
    expires_in: float


_clean = https.one_line


class _Endpoints:
    """HTTPS form POSTs to one upstream's OAuth endpoints, each failure a TokenError."""

    def __init__(self, reactor: Any, upstream: UpstreamConfig, timeout: float) -> None:
        if upstream.oauth is None:
            raise ValueError(f'upstream {upstream.name} does not have auth = "xoauth2"')
        self.upstream = upstream.name
        self.oauth: OAuthConfig = upstream.oauth
        self._reactor = reactor
        self._timeout = timeout
        # A new connection per request (no pool kept): tokens are fetched about once an hour.
        self._http = https.client(reactor, self.oauth.token_ca_file)

    async def post(self, url: str, form: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
        """The status and JSON object the endpoint answered ``form`` with."""
        try:
            status, _, body = await https.fetch(
                self._reactor, self._http, "POST", url, timeout=self._timeout, limit=_MAX_BODY,
                headers={"Accept": ["application/json"]}, data=list(form.items()),
            )
        except https.RequestFailed as e:
            raise self.error(url, e.what) from None
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise self.error(url, f"answered HTTP {status} with a body that is no JSON object")
        return status, answer

    def error(self, url: str, what: str) -> TokenError:
        return TokenError(f"upstream {self.upstream}: {url}: {what}")

    def refused(self, url: str, status: int, answer: Mapping[str, Any], hint: str = "") -> TokenError:
        """The provider's own ``error`` and ``error_description``, as far as they are text."""
        error = answer.get("error")
        description = answer.get("error_description")
        text = _clean(error) if isinstance(error, str) else "no error code"
        if isinstance(description, str) and description:
            text += f": {_clean(description)}"
        return self.error(url, f"refused (HTTP {status}): {text}{hint}")


def _number(value: object, default: float) -> float:
    """A positive number of seconds from JSON; some providers send it as a string."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return default
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < float("inf"):
        return float(value)
    return default


def _access_token(endpoints: _Endpoints, url: str, answer: Mapping[str, Any]) -> tuple[str, float]:
    """The access token of a successful token response and its lifetime in seconds."""
    token = answer.get("access_token")
    if not isinstance(token, str) or not token or not token.isascii() or not token.isprintable():
        raise endpoints.error(url, "answered without a usable access_token")
    token_type = answer.get("token_type")
    # XOAUTH2 sends the token as "Bearer"; any other kind would be refused by the mail server.
    if isinstance(token_type, str) and token_type.lower() != "bearer":
        raise endpoints.error(url, f"issued a {_clean(token_type)} token, not a Bearer token")
    return token, _number(answer.get("expires_in"), _DEFAULT_LIFETIME)


class TokenSource:
    """One upstream's access token, cached until it nearly expires.

    Make one per upstream and share it between sessions: concurrent callers then wait for the
    same refresh, and a rotated refresh token is written back once.

    ``reactor`` does the HTTPS requests and their timeouts; ``clock`` (default: the reactor)
    measures token lifetimes, so tests can expire tokens with a ``task.Clock``.
    """

    def __init__(
        self,
        reactor: Any,
        upstream: UpstreamConfig,
        *,
        clock: IReactorTime | None = None,
        timeout: float = HTTP_TIMEOUT,
    ) -> None:
        self._endpoints = _Endpoints(reactor, upstream, timeout)
        self._oauth = self._endpoints.oauth
        self._name = upstream.name
        # The mailbox: a service account's assertion acts as this user.
        self._username = upstream.username or ""
        self._clock: IReactorTime = reactor if clock is None else clock
        self._access: str | None = None
        self._expires_at = 0.0
        self._waiters: list[defer.Deferred[str]] = []

    def __repr__(self) -> str:
        return f"<TokenSource upstream={self._name}>"

    async def token(self) -> str:
        """A valid access token; raises TokenError if none can be had."""
        if self._access is not None and self._clock.seconds() < self._expires_at - REFRESH_MARGIN:
            return self._access
        # Every caller gets its own Deferred: one Deferred awaited twice would hand the
        # second caller None, and cancelling one caller must not cancel the shared refresh.
        waiter: defer.Deferred[str] = defer.Deferred()
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            defer.Deferred.fromCoroutine(self._refresh_for_waiters())
        return await waiter

    def invalidate(self, token: str) -> None:
        """Forget ``token`` (the mail server refused it) so that the next ``token()`` refreshes."""
        if token == self._access:
            self._access = None

    @property
    def expires_at(self) -> float | None:
        """When the access token held expires, in the clock's seconds (None: no token held)."""
        return self._expires_at if self._access is not None else None

    async def _refresh_for_waiters(self) -> None:
        outcome: str | Failure
        try:
            outcome = await self._refresh()
        except Exception:
            # Any failure, a bug included, must reach the waiters rather than leave them hanging.
            outcome = Failure()  # type: ignore[no-untyped-call]
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if waiter.called:
                continue  # cancelled by its caller
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)

    async def _refresh(self) -> str:
        oauth = self._oauth
        refresh_token = None
        if oauth.grant == "refresh_token":
            # Read each time: the file is the one place the current refresh token lives, so a
            # new sign-in with ``relayproxy oauth`` takes effect without a restart.
            refresh_token = self._read_refresh_token()
        form = self._form(refresh_token)
        # Lifetimes count from the request, not the answer: the token may be that much older.
        started = self._clock.seconds()
        url = oauth.token_url
        status, answer = await self._endpoints.post(url, form)
        if status != 200 or "error" in answer:
            raise self._endpoints.refused(url, status, answer, self._hint(answer.get("error")))
        token, lifetime = _access_token(self._endpoints, url, answer)
        self._access, self._expires_at = token, started + lifetime
        log.info("new access token", upstream=self._name, valid_seconds=round(lifetime))
        rotated = answer.get("refresh_token")
        if refresh_token is not None and isinstance(rotated, str) and rotated and rotated != refresh_token:
            self._store_rotated(rotated)
        return token

    def _form(self, refresh_token: str | None) -> dict[str, str]:
        """The token request: the grant and the client's credential (load_config allowed exactly one)."""
        oauth = self._oauth
        # Signed assertions carry their own time: the wall clock, whatever measures lifetimes.
        now = time.time()
        if oauth.service_account is not None:
            # RFC 7523 2.1: the signed assertion is the whole grant; no client id, no secret.
            assertion = service_account_assertion(oauth.service_account, subject=self._username, scope=oauth.scope or "", now=now)
            return {"grant_type": JWT_BEARER_GRANT, "assertion": assertion}
        form = {"grant_type": oauth.grant, "client_id": oauth.client_id}
        if refresh_token is not None:
            form["refresh_token"] = refresh_token
        if oauth.client_certificate is not None:
            # RFC 7523 2.2, as Microsoft's identity platform takes it: a new assertion each time.
            form["client_assertion_type"] = CLIENT_ASSERTION_TYPE
            form["client_assertion"] = client_assertion(
                oauth.client_certificate, client_id=oauth.client_id, audience=oauth.token_url, now=now
            )
        elif oauth.client_secret is not None:
            form["client_secret"] = oauth.client_secret
        if oauth.scope is not None:
            form["scope"] = oauth.scope
        return form

    def _hint(self, error: object) -> str:
        """What to do about a refusal, where the credential makes the likely cause plain."""
        oauth = self._oauth
        if error == "invalid_grant" and oauth.grant == "refresh_token":
            return f"; the sign-in is no longer valid: run relayproxy oauth {self._name}"
        certificate = oauth.client_certificate
        if certificate is not None and error == "invalid_client":
            if certificate.not_after <= datetime.datetime.now(datetime.UTC):
                expired = certificate.not_after.strftime("%Y-%m-%d %H:%M UTC")
                return f"; the certificate in {certificate.path} expired on {expired}: register a new one with the app and point client_certificate_file at it"
            return (
                f"; check that the app registration's Certificates & secrets lists the certificate in {certificate.path} "
                f"(thumbprint {certificate.sha1_thumbprint})"
            )
        account = oauth.service_account
        if account is not None and error == "unauthorized_client":
            client = account.client_id or account.client_email
            return (
                f"; in Google Admin (Security > Access and data control > API controls > Domain-wide delegation) "
                f"add client ID {client} with the scope {oauth.scope}"
            )
        if account is not None and error == "invalid_grant":
            return (
                f"; check that {self._username} is a user of the Workspace domain and that key {account.private_key_id} "
                f"of {account.client_email} is not deleted or disabled, and that this host's clock is right"
            )
        return ""

    def _read_refresh_token(self) -> str:
        path = self._oauth.refresh_token_file
        assert path is not None, "load_config sets refresh_token_file for the refresh_token grant"
        sign_in = f"sign in with: relayproxy oauth {self._name}"
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise TokenError(f"upstream {self._name}: cannot read the refresh token from {path}: {reason}; {sign_in}") from None
        if not text:
            raise TokenError(f"upstream {self._name}: {path} holds no refresh token; {sign_in}")
        return text

    def _store_rotated(self, refresh_token: str) -> None:
        path = self._oauth.refresh_token_file
        assert path is not None
        # A small synchronous write in the reactor thread: rare (once per refresh at most)
        # and it must be on disk before the old token is forgotten.
        try:
            write_secret_file(path, refresh_token)
        except OSError as e:
            # The access token just issued is good; providers that rotate (Microsoft) keep the
            # old refresh token valid for a while, so carry on and let the next refresh retry.
            log.error("cannot store the rotated refresh token", upstream=self._name, path=str(path), reason=e.strerror)
            return
        log.info("stored the rotated refresh token", upstream=self._name, path=str(path))


async def device_flow(
    reactor: Any,
    upstream: UpstreamConfig,
    show: Callable[[DevicePrompt], None],
    *,
    clock: IReactorTime | None = None,
    timeout: float = HTTP_TIMEOUT,
) -> None:
    """Sign in with the device authorization grant (RFC 8628); store the refresh token.

    ``show`` tells the person what to open and enter. Polls until they approve, deny or the code
    expires, then writes the refresh token to ``refresh_token_file`` (atomically, mode 0600).
    Raises TokenError on denial, expiry or any failure. ``clock`` (default: the reactor) paces
    the polling.
    """
    endpoints = _Endpoints(reactor, upstream, timeout)
    oauth = endpoints.oauth
    if oauth.device_authorization_url is None or oauth.refresh_token_file is None:
        raise ValueError(f"upstream {upstream.name} needs device_authorization_url and refresh_token_file")
    clock = reactor if clock is None else clock
    client: dict[str, str] = {"client_id": oauth.client_id}
    if oauth.scope is not None:
        client["scope"] = oauth.scope

    url = oauth.device_authorization_url
    status, answer = await endpoints.post(url, client)
    if status != 200 or "error" in answer:
        raise endpoints.refused(url, status, answer)
    device_code = answer.get("device_code")
    user_code = answer.get("user_code")
    # Google calls it verification_url.
    uri = answer.get("verification_uri") or answer.get("verification_url")
    complete = answer.get("verification_uri_complete")
    if not all(isinstance(v, str) and v for v in (device_code, user_code, uri)):
        raise endpoints.error(url, "answered without device_code, user_code and verification_uri")
    assert isinstance(device_code, str) and isinstance(user_code, str) and isinstance(uri, str)
    expires_in = _number(answer.get("expires_in"), 600.0)
    show(DevicePrompt(_clean(uri), _clean(user_code), _clean(complete) if isinstance(complete, str) else None, expires_in))

    interval = _number(answer.get("interval"), _DEFAULT_INTERVAL)
    deadline = clock.seconds() + expires_in
    expired = "the code expired before the sign-in was approved; run relayproxy oauth again"
    poll = {"grant_type": DEVICE_CODE_GRANT, "device_code": device_code, "client_id": oauth.client_id}
    if oauth.client_secret is not None:
        # Google's device flow wants the client secret too; Microsoft's ignores it for public clients.
        poll["client_secret"] = oauth.client_secret
    while True:
        await task.deferLater(clock, interval, lambda: None)
        if clock.seconds() >= deadline:
            raise endpoints.error(oauth.token_url, f"expired_token: {expired}")
        status, answer = await endpoints.post(oauth.token_url, poll)
        error = answer.get("error")
        if status == 200 and error is None:
            break
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            interval += _SLOW_DOWN
            continue
        if error == "access_denied":
            raise endpoints.error(oauth.token_url, "access_denied: the sign-in was declined")
        if error == "expired_token":
            raise endpoints.error(oauth.token_url, f"expired_token: {expired}")
        raise endpoints.refused(oauth.token_url, status, answer)
    # Only the refresh token is kept, but an answer without a usable access token is no success.
    _access_token(endpoints, oauth.token_url, answer)
    refresh_token = answer.get("refresh_token")
    if not isinstance(refresh_token, str) or not refresh_token:
        raise endpoints.error(
            oauth.token_url,
            "issued no refresh token; add the scope that grants one (Microsoft: offline_access)",
        )
    try:
        write_secret_file(oauth.refresh_token_file, refresh_token)
    except OSError as e:
        raise TokenError(
            f"upstream {upstream.name}: cannot write {oauth.refresh_token_file}: {e.strerror}"
        ) from None
