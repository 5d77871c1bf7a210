"""`relayproxy check`: prove every upstream works with the central credentials, send no mail;
with --offline, only that the configuration and the users file can be used."""

from __future__ import annotations

import base64
import datetime
import json
import re
from collections.abc import Callable
from typing import Any

from relayproxy.config import Config, UpstreamConfig
from relayproxy.errors import UpstreamError
from relayproxy.explain import upstream_failure_hint
from relayproxy.oauth import TokenError, TokenSource
from relayproxy.upstream.connector import Connector
from relayproxy.usersfile import read_users_file


async def check_upstreams(config: Config, reactor: Any, say: Callable[[str], None]) -> int:
    """One line per upstream; the number of upstreams that failed."""
    failed = 0
    for name, upstream in config.upstreams.items():
        if upstream.kind == "graph":
            failed += not await _check_graph(upstream, reactor, say)
            continue
        where = f"{upstream.host}:{upstream.port} ({upstream.tls})"
        try:
            connection = await Connector(reactor, upstream, config.server.hostname).open()
        except UpstreamError as e:
            failed += 1
            say(f"FAIL upstream {name} {where}: {e.detail}")
            say(f"     hint: {upstream_failure_hint(e, name, upstream.host)}")
            continue
        authenticated = "authenticated as " + upstream.username if upstream.username else "no credentials sent"
        say(f"ok   upstream {name} {where}: {connection.tls_description()}; {authenticated}")
        connection.close()
    return failed


async def _check_graph(upstream: UpstreamConfig, reactor: Any, say: Callable[[str], None]) -> bool:
    """A Graph upstream works when its app gets a token that carries the application permission
    Mail.Send (its roles claim); nothing is sent, so an application access policy that leaves the
    mailbox out shows only on the first message (a 403 that names it)."""
    where = f"graph {upstream.graph_url} as {upstream.username}"
    tokens = TokenSource(reactor, upstream)
    try:
        token = await tokens.token()
    except TokenError as e:
        say(f"FAIL upstream {upstream.name} {where}: {e.detail}")
        say(f"     hint: {token_failure_hint(e.detail)}")
        return False
    assert upstream.oauth is not None
    claims = token_claims(token)
    expires = claims.get("exp") if claims is not None else None
    if not isinstance(expires, int | float) or isinstance(expires, bool):
        expires = tokens.expires_at  # no exp claim to read: the lifetime the token endpoint gave
    expiry = "expiry unknown" if expires is None else _expiry(float(expires), reactor.seconds())
    got = f"access token from {upstream.oauth.token_url}"
    if claims is None:
        say(
            f"ok   upstream {upstream.name} {where}: {got}, {expiry}; its roles cannot be read (the token is not a JWT), "
            "so only a message shows whether the app may send (Mail.Send)"
        )
        return True
    roles = claims.get("roles")
    roles = [r for r in roles if isinstance(r, str)] if isinstance(roles, list) else []
    if MAIL_SEND not in roles:
        held = f"its roles are {', '.join(roles)}" if roles else "it carries no roles (no application permission)"
        say(f"FAIL upstream {upstream.name} {where}: the {got} lacks {MAIL_SEND}: {held}; {expiry}")
        say(f"     hint: {NO_MAIL_SEND_HINT}")
        return False
    shown = ", ".join([MAIL_SEND] + sorted(set(roles) - {MAIL_SEND}))
    if not upstream.save_to_sent and MAIL_READ_WRITE not in roles:
        # Every message goes as a draft then: without the permission none could be sent.
        needs = "which save_to_sent = false needs for every message"
        say(f"FAIL upstream {upstream.name} {where}: the {got} lacks {MAIL_READ_WRITE}, {needs}; roles: {shown}; {expiry}")
        say(f"     hint: {NO_MAIL_READ_WRITE_HINT}")
        return False
    # Mail.ReadWrite only matters for a message too large for one sendMail request.
    drafts = "" if MAIL_READ_WRITE in roles else f"; without {MAIL_READ_WRITE}, a message over about 3 MB (sent as a draft) is refused"
    say(f"ok   upstream {upstream.name} {where}: {got}, roles: {shown}, {expiry}; no mail sent{drafts}")
    return True


MAIL_SEND = "Mail.Send"
MAIL_READ_WRITE = "Mail.ReadWrite"
NO_MAIL_READ_WRITE_HINT = (
    "grant the app the application permission Mail.ReadWrite with admin consent as for Mail.Send (or its Exchange "
    "RBAC for Applications role), or remove save_to_sent = false to send by sendMail and keep a copy in Sent Items"
)
NO_MAIL_SEND_HINT = (
    "grant the app the application permission Mail.Send with admin consent: Entra admin center, App registrations, "
    "the app, API permissions, Add a permission, Microsoft Graph, Application permissions, Mail.Send, then Grant admin "
    "consent (a delegated Mail.Send does not count); limit it to the mailbox with an application access policy. "
    'Where Exchange Online grants it instead (RBAC for Applications, role "Application Mail.Send"), no token shows '
    "it: test that with Test-ServicePrincipalAuthorization"
)

# The identity platform's AADSTS numbers that point at one fix (error_description starts with them).
_AADSTS_HINTS = {
    "7000215": "the client secret is wrong: copy the secret's Value (not its Secret ID) from the app registration's "
               "Certificates & secrets into the file client_secret_file names",
    "7000222": "the client secret has expired: add a new one under the app registration's Certificates & secrets "
               "and put its Value in the file client_secret_file names",
    "700016": "no application with this client_id in the tenant: client_id is the app registration's Application "
              "(client) ID, and token_url must name the tenant the app is registered in",
    "90002": "the tenant in token_url does not exist: use the Directory (tenant) ID from the app registration's Overview",
    "900023": "the tenant in token_url is not valid: use the Directory (tenant) ID from the app registration's Overview",
    "70011": 'the scope is not valid: remove scope from the upstream (the default is "https://graph.microsoft.com/.default")',
    "7000218": "the request carried no client credential: set client_secret_file (or client_secret_credential)",
    "700027": "the signed client assertion was refused: upload the certificate (its public part) to the app "
              "registration's Certificates & secrets and check that the key belongs to it",
}


def token_failure_hint(detail: str) -> str:
    """What to fix when the app got no token, from what the token endpoint said."""
    code = re.search(r"AADSTS(\d+)", detail)
    if code is not None and code.group(1) in _AADSTS_HINTS:
        return _AADSTS_HINTS[code.group(1)]
    if ": refused (HTTP " not in detail:
        return "the token endpoint could not be reached or did not answer: check token_url, this host's route to it, and ca_file if one is set"
    return "check token_url (the tenant), client_id and the client secret of the app registration (and that it is not expired)"


def token_claims(token: str) -> dict[str, Any] | None:
    """The claims of a JWT access token (RFC 7519), read without verifying it, or None for an opaque token.

    The proxy holds the token for Graph, it is not its audience: what the claims say is for the
    operator to see (the signature is Graph's to check), and nothing else relies on them.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except ValueError:
        return None
    return claims if isinstance(claims, dict) else None


def _expiry(expires: float, now: float) -> str:
    when = datetime.datetime.fromtimestamp(expires, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    left = expires - now
    if left <= 0:
        return f"expired {when}"
    return f"expires {when} (in {round(left / 60)} min)"


def check_users(config: Config, say: Callable[[str], None]) -> None:
    """Warnings only: the config loader already refused what cannot work."""
    users = read_users_file(config.auth.users_file)
    for name in sorted(set(config.users) - set(users)):
        say(f"warn user {name}: has a [users.{name}] section but no entry in {config.auth.users_file}, so cannot log in")
    routed = {name: config.user(name).upstream for name in users}
    unused = sorted(set(config.upstreams) - set(routed.values()))
    for name in unused:
        say(f"warn upstream {name}: no user is routed to it")
    say(f"ok   users file {config.auth.users_file}: {len(users)} user(s)")


def summary(config: Config) -> str:
    """What an offline check found usable; load_config has checked everything a file can say."""
    return (
        f"ok   configuration {config.path}: {len(config.listeners)} listener(s), {len(config.upstreams)} upstream(s) "
        f"({', '.join(config.upstreams)}), {len(config.users)} [users] section(s); no connection made (--offline)"
    )
