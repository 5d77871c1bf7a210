"""load_config: the file read table by table, and the rules that span keys.

What one key must be is declared in sections.py and checked by schema.Table; here is what no single
key can say: which listeners need the TLS material and whether it serves, where secrets come from,
what each OAuth grant needs, that every user reaches an upstream, and limits that bound each other.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from OpenSSL import SSL

from relayproxy.config.schema import Invalid, Setting, Source, Table, fix_of, key_names, settings
from relayproxy.config.sections import (
    DEFAULT_UPSTREAM, HOSTS, TABLES, AuthConfig, ClientCertificate, Config, LimitsConfig, ListenerConfig, LogConfig, MetricsConfig, Network,
    OAuthConfig, ServerConfig, ServiceAccount, SpoolConfig, TLSConfig, TLSKey, UpstreamConfig, UserConfig, _https_url, endpoint_fields,
)
from relayproxy.errors import ConfigError
from relayproxy.usersfile import UsersFileError, read_users_file

T = TypeVar("T")


def load_config(path: Path, environ: Mapping[str, str] | None = None, *, for_oauth_setup: bool = False) -> Config:
    """Read and check the configuration at ``path``.

    ``environ`` supplies the variables named by ``password_env`` and CREDENTIALS_DIRECTORY for
    ``*_credential`` (default: ``os.environ``). ``for_oauth_setup`` accepts a missing
    ``refresh_token_file``, which ``relayproxy oauth`` is about to create.
    Raises ConfigError listing every problem found, not just the first.
    """
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the configuration: {e.strerror}; check the path or pass --config"]) from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML: {e}; correct the syntax there"]) from e
    source = Source(path, os.environ if environ is None else environ)
    top = Table(source, "", data)
    top.check_known([name.partition(".")[0] for name in TABLES])
    server = _plain(top, "server", ServerConfig)
    listeners = _listeners(top)
    tls = _tls(top.table("tls"), listeners)
    auth = _plain(top, "auth", AuthConfig)
    user_names = _user_names(top.table("auth"), auth.users_file)
    upstreams = _upstreams(top, for_oauth_setup)
    users = _users(top.table("users"), upstreams, user_names)
    limits = _limits(top.table("limits"))
    log = _plain(top, "log", LogConfig)
    metrics = _plain(top, "metrics", MetricsConfig)
    spool = _spool(top.table("spool"), users, source.environ)
    source.raise_problems()
    return Config(path, server, tls, listeners, auth, upstreams, users, limits, log, metrics, spool)


def _plain(top: Table, name: str, cls: type[T]) -> T:
    """A table with no rule beyond the declarations of its keys."""
    table = top.table(name)
    table.check_known(key_names(*TABLES[name]))
    return table.read(cls)


def _listeners(top: Table) -> tuple[ListenerConfig, ...]:
    tables = top.array_of_tables("listener")
    if not top.data.get("listener"):
        top.problem("listener", "missing: nothing would accept connections", 'add a [[listener]] section with endpoint = "tcp:587"')
    listeners = []
    for table in tables:
        table.check_known(key_names(ListenerConfig))
        listener = table.read(ListenerConfig)
        if listener.tls == "none" and table.ok("endpoint") and not listener.allow_plaintext_auth and not _binds_locally(listener.endpoint):
            table.problem(
                "tls",
                '"none" would let passwords cross the network in the clear',
                'use "starttls" or "implicit", bind a loopback interface such as '
                '"tcp:2525:interface=127.0.0.1", or set allow_plaintext_auth = true',
            )
        _listener_tls(table, listener)
        listeners.append(listener)
    return tuple(listeners)


_TLS_KEYS = ("tls_min_version", "tls_ciphers")


def _listener_tls(table: Table, listener: ListenerConfig) -> None:
    """A listener's own TLS policy: only with TLS, ciphers OpenSSL knows, and an old version only
    where no stranger can use it."""
    if listener.tls == "none":
        for key in _TLS_KEYS:
            if key in table.data:
                table.problem(key, 'only used with tls = "starttls" or "implicit"', "remove it, or give the listener TLS")
        return
    if listener.tls_ciphers is not None:
        try:
            SSL.Context(SSL.TLS_SERVER_METHOD).set_cipher_list(listener.tls_ciphers.encode("ascii", "replace"))
        except SSL.Error:
            openssl = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
            what = f"{openssl} knows no cipher in {json.dumps(listener.tls_ciphers)}"
            table.problem("tls_ciphers", what, fix_of(settings(ListenerConfig)["tls_ciphers"]))
    if (
        listener.tls_min_version in ("TLSv1", "TLSv1.1") and not listener.allowed_networks
        and table.ok("endpoint") and _binds_publicly(listener.endpoint)
    ):
        table.problem(
            "tls_min_version",
            f'"{listener.tls_min_version}" on an interface the Internet may reach (no interface, 0.0.0.0, ::, a host '
            "name or a global address) would offer broken TLS to anyone",
            'bind a private or loopback interface such as "tcp:587:interface=192.168.10.1", or set allowed_networks '
            'to the old devices\' networks, such as ["192.168.10.0/24"]',
        )


def _binds_publicly(endpoint: str) -> bool:
    """Might clients from the Internet reach ``endpoint``? Only a Unix socket, or an interface that
    is a loopback, private (RFC 1918, ULA), link-local or otherwise non-global address, says no."""
    fields = endpoint_fields(endpoint)
    kind = fields[0].lower()
    if kind == "haproxy":
        # Its clients are whoever HAProxy's frontend accepts, wherever the socket itself listens.
        return True
    if kind == "unix":
        return False
    interfaces = [f.removeprefix("interface=") for f in fields[1:] if f.startswith("interface=")]
    if not interfaces:
        # Twisted listens on every interface; a systemd socket's binding is not in the string.
        return True
    host = interfaces[0].replace("\\:", ":")
    if host.lower() == "localhost":
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return True
    return ip.is_unspecified or ip.is_global


def _binds_locally(endpoint: str) -> bool:
    """Can only clients on this host connect to ``endpoint``?"""
    fields = endpoint_fields(endpoint)
    if fields[0].lower() == "unix":
        # A Unix socket never leaves the host, like a loopback interface.
        return True
    interfaces = [f.removeprefix("interface=") for f in fields[1:] if f.startswith("interface=")]
    return bool(interfaces) and _is_loopback_host(interfaces[0].replace("\\:", ":"))


def _is_loopback_host(host: str) -> bool:
    try:
        return host.lower() == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tls(table: Table, listeners: tuple[ListenerConfig, ...]) -> TLSConfig:
    """The certificate chain and key, read and checked here once: the listeners serve with them."""
    table.check_known(key_names(TLSConfig))
    tls = table.read(TLSConfig)
    certificate, key = tls.certificate, tls.key
    if certificate is None and key is None:
        needing = [(n, listener.tls) for n, listener in enumerate(listeners, 1) if listener.tls != "none"]
        if needing:
            number, kind = needing[0]
            table.problem("certificate", f'missing, but listener[{number}] has tls = "{kind}"', "set [tls] certificate and key to PEM files")
        return tls
    if certificate is None or key is None:
        missing, present = ("certificate", "key") if certificate is None else ("key", "certificate")
        table.problem(missing, f"missing, but {present} is set", "set both or neither")
        return tls
    cert_pem, key_pem = table.read_file("certificate", certificate), table.read_file("key", key)
    if cert_pem is None or key_pem is None:
        return tls
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        table.problem("certificate", f"{certificate} holds no PEM certificate", "point it at a PEM certificate file")
        return tls
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        # TypeError: the key is encrypted; the daemon has no one to ask for a passphrase.
        table.problem("key", f"{key} holds no usable PEM private key ({e})", "point it at an unencrypted PEM private key file")
        return tls
    if not isinstance(private_key, TLSKey):
        table.problem("key", f"{key} holds a {type(private_key).__name__}, which cannot serve TLS", "use an RSA, ECDSA or EdDSA key")
        return tls
    # Ask OpenSSL itself, the library that will serve with this pair.
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    try:
        context.use_certificate(chain[0])
        context.use_privatekey(private_key)
        context.check_privatekey()
    except SSL.Error:
        table.problem("key", f"key does not match certificate {certificate}", "point key at the private key the certificate was issued for")
        return tls
    return replace(tls, chain=tuple(chain), private_key=private_key)


def _user_names(table: Table, path: Path) -> frozenset[str]:
    if not table.ok("users_file"):
        return frozenset()
    try:
        return frozenset(read_users_file(path))
    except OSError as e:
        fix = "create it with: relayproxy passwd add NAME, or let the relayproxy user read it"
        table.problem("users_file", f"cannot read {path}: {e.strerror}", fix)
    except UsersFileError as e:
        # Each problem names its line and carries its own fix.
        table.source.problems.extend(f"{table.source.file}: {table.key_of('users_file')}: {p}" for p in e.problems)
    return frozenset()


def _upstreams(top: Table, for_oauth_setup: bool) -> dict[str, UpstreamConfig]:
    tables = top.table("upstream").subtables()
    if not top.data.get("upstream"):
        top.problem(
            "upstream", "missing: there is nowhere to relay mail to", 'add an [upstream.default] section with host = "smtp.example.com"'
        )
    return {name: _upstream(name, table, for_oauth_setup) for name, table in tables}


_PASSWORD = settings(UpstreamConfig)["password"]
_CLIENT_SECRET = settings(OAuthConfig)["client_secret"]


def _upstream(name: str, table: Table, for_oauth_setup: bool) -> UpstreamConfig:
    table.check_known(key_names(*TABLES["upstream.NAME"]))
    upstream = table.read(UpstreamConfig, name=name)
    if upstream.kind == "graph":
        return _graph(table, upstream)
    for key in ("graph_url", "save_to_sent"):
        if key in table.data:
            table.problem(key, 'only used with kind = "graph"', 'set kind = "graph" or remove it')
    default_port = {"implicit": 465, "starttls": 587, "none": 25}[upstream.tls]
    if "hosts" in table.data:
        for key in ("host", "port"):
            if key in table.data:
                table.problem(key, "set together with hosts", f"list every host in hosts and remove {key}")
        targets = _hosts(table, default_port)
    else:
        if "host" not in table.data:
            table.problem("host", "missing", fix_of(settings(UpstreamConfig)["host"]))
        targets = [(upstream.host, upstream.port if table.ok("port") else default_port)]
    # Judged by presence, not by validity: a bad value has been reported already.
    has_username = "username" in table.data
    has_password = any(key in table.data for key in _PASSWORD.names)
    password = oauth = None
    if upstream.auth == "password":
        for key in key_names(OAuthConfig):
            if key in table.data:
                table.problem(key, 'only used with auth = "xoauth2"', 'set auth = "xoauth2" or remove it')
        password = _secret(table, _PASSWORD)
        if has_username and not has_password:
            table.problem("username", "set without a password", "set password_file, password_env or password_credential too")
        if has_password and not has_username:
            table.problem("username", "missing, but a password is set", "set username too")
    else:
        for key in _PASSWORD.names:
            if key in table.data:
                what = 'not used with auth = "xoauth2", which logs in with an access token'
                table.problem(key, what, 'remove it, or set auth = "password"')
        if not has_username:
            what = 'missing: auth = "xoauth2" needs the mailbox to log in as'
            table.problem("username", what, 'set username to the mailbox, such as "alerts@example.org"')
        oauth = _oauth(name, table, for_oauth_setup)
    if upstream.tls == "none" and targets and targets[0][0]:
        remote = [host for host, _ in targets if not _is_loopback_host(host)]
        for host in remote:
            table.problem("tls", f'"none" is only allowed for a loopback host, not {json.dumps(host)}', 'use "implicit" or "starttls"')
        if not remote and (has_username or has_password or oauth is not None):
            table.problem(
                "tls",
                '"none" with credentials configured: relayproxy never sends credentials in the clear',
                'use "implicit" or "starttls", or remove username and password',
            )
    host, port = targets[0] if targets else ("", default_port)
    return replace(upstream, host=host, port=port, fallbacks=tuple(targets[1:]), password=password, oauth=oauth)


_GRAPH_SCOPE = "https://graph.microsoft.com/.default"
_NOT_FOR_GRAPH = (
    "host", "hosts", "port", "tls", "helo_name", "auth", "envelope_from", "header_from", "pool_size", "pool_idle_timeout",
    "connect_timeout", "reply_timeout", "grant", "refresh_token_file", "device_authorization_url", "token_ca_file",
    "service_account_file", "max_messages_per_session", *_PASSWORD.names,
)


def _graph(table: Table, upstream: UpstreamConfig) -> UpstreamConfig:
    """kind = "graph": app-only sign-in (client credentials) for the mailbox that sends."""
    for key in _NOT_FOR_GRAPH:
        if key in table.data:
            table.problem(key, 'not used with kind = "graph"', 'remove it (Graph sends as the mailbox in username, over HTTPS)')
    if "username" not in table.data:
        table.problem("username", 'missing: kind = "graph" sends as a mailbox', 'set username to the mailbox, such as "alerts@example.org"')
    _require(table, "token_url", "client_id")
    oauth = _app_credential(table, table.read(OAuthConfig), 'kind = "graph"')
    # ca_file serves both Graph and the token endpoint: one provider, one trust.
    oauth = replace(oauth, grant="client_credentials", scope=oauth.scope or _GRAPH_SCOPE, token_ca_file=upstream.ca_file)
    return replace(upstream, host="", port=443, tls="implicit", auth="xoauth2", oauth=oauth, pool_size=0)


_HOST_PORT = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\s:\[\]]+))(?::(?P<port>\d{1,5}))?")


def _hosts(table: Table, default_port: int) -> list[tuple[str, int]]:
    entries = table.value(HOSTS)
    if not entries and table.ok("hosts"):
        table.problem("hosts", "is empty", fix_of(HOSTS))
    targets = []
    for entry in entries:
        m = _HOST_PORT.fullmatch(entry)
        port = int(m.group("port") or default_port) if m else 0
        if m is None or not 1 <= port <= 65535:
            table.problem("hosts", f"{json.dumps(entry)} is not HOST or HOST:PORT", fix_of(HOSTS))
        else:
            targets.append((m.group("v6") or m.group("host"), port))
    return targets


def _oauth(name: str, table: Table, for_oauth_setup: bool) -> OAuthConfig:
    oauth = table.read(OAuthConfig)
    if oauth.grant == "service_account":
        return _service_account(table, oauth)
    _require(table, "token_url", "client_id")
    if "service_account_file" in table.data:
        table.problem("service_account_file", 'only used with grant = "service_account"', 'set grant = "service_account" or remove it')
    if oauth.grant == "refresh_token":
        for key in _CERTIFICATE_KEYS:
            if key in table.data:
                # Acting for a user, the refresh token is the credential; the app's own is for app-only.
                what = 'only used with grant = "client_credentials" (the application signing in as itself)'
                table.problem(key, what, 'remove it, or set grant = "client_credentials"')
        oauth = replace(oauth, client_secret=_secret(table, _CLIENT_SECRET))
        if "refresh_token_file" not in table.data:
            table.problem(
                "refresh_token_file",
                'missing: grant = "refresh_token" needs a file to keep the refresh token in',
                'set it, such as "/var/lib/relayproxy/NAME.refresh-token", and sign in with: relayproxy oauth NAME',
            )
        elif oauth.refresh_token_file is not None:
            _check_refresh_token_file(name, table, oauth.refresh_token_file, for_oauth_setup)
        return oauth
    oauth = _app_credential(table, oauth, 'grant = "client_credentials"')
    if "scope" not in table.data:
        what = 'missing: grant = "client_credentials" needs the resource\'s scope'
        table.problem("scope", what, 'for Microsoft 365 write scope = "https://outlook.office365.com/.default"')
    for key in ("refresh_token_file", "device_authorization_url"):
        if key in table.data:
            table.problem(key, 'not used with grant = "client_credentials"', 'remove it, or set grant = "refresh_token"')
    return replace(oauth, refresh_token_file=None, device_authorization_url=None)


_OAUTH = settings(OAuthConfig)
_CERTIFICATE_KEYS = ("client_certificate_file", "client_key_file")


def _require(table: Table, *names: str) -> None:
    """Keys of OAuthConfig that every sign-in but a service account's needs (its key file has them)."""
    for name in names:
        if name not in table.data:
            table.problem(name, "missing", fix_of(_OAUTH[name]))


def _app_credential(table: Table, oauth: OAuthConfig, where: str) -> OAuthConfig:
    """The application's one credential (client credentials): its client secret, or a certificate and key."""
    secret_keys = [key for key in _CLIENT_SECRET.names if key in table.data]
    certificate_keys = [key for key in _CERTIFICATE_KEYS if key in table.data]
    if secret_keys and certificate_keys:
        # Which one would be used must not depend on a rule the reader has to know.
        table.problem(
            certificate_keys[0],
            f"set together with {secret_keys[0]}: the application signs in with one credential",
            f"remove {secret_keys[0]} to sign in with the certificate, or {' and '.join(certificate_keys)} to use the secret",
        )
        return oauth
    if certificate_keys:
        return replace(oauth, client_certificate=_client_certificate(table, oauth))
    if not secret_keys:
        table.problem(
            "client_secret_file",
            f"missing: {where} signs in as the application, with its client secret or a certificate",
            "set client_secret_file or client_secret_credential, or client_certificate_file and client_key_file "
            "(a certificate registered with the application)",
        )
        return oauth
    return replace(oauth, client_secret=_secret(table, _CLIENT_SECRET))


def _client_certificate(table: Table, oauth: OAuthConfig) -> ClientCertificate | None:
    """The certificate and key, read and checked here once, so a mistake shows at load, not at the first message."""
    certificate, key = oauth.client_certificate_file, oauth.client_key_file
    if "client_certificate_file" not in table.data:
        table.problem("client_certificate_file", "missing, but client_key_file is set", fix_of(_OAUTH["client_certificate_file"]))
        return None
    if "client_key_file" not in table.data:
        table.problem("client_key_file", "missing, but client_certificate_file is set", fix_of(_OAUTH["client_key_file"]))
        return None
    if certificate is None or key is None or not (table.ok("client_certificate_file") and table.ok("client_key_file")):
        return None
    cert_data, key_data = table.read_file("client_certificate_file", certificate), table.read_file("client_key_file", key)
    if cert_data is None or key_data is None:
        return None
    try:
        # The first certificate of a PEM file (a chain may follow), else a DER one (.cer from Windows).
        parsed = x509.load_pem_x509_certificates(cert_data)[0] if b"-----BEGIN" in cert_data else x509.load_der_x509_certificate(cert_data)
    except ValueError:
        fix = "point it at the certificate (PEM or DER) uploaded to the app registration's Certificates & secrets"
        table.problem("client_certificate_file", f"{certificate} holds no certificate", fix)
        return None
    unencrypted = "write it without a passphrase: openssl pkey -in KEY -out KEY.plain (mode 0600)"
    try:
        private_key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        # The daemon has no one to ask for a passphrase.
        table.problem("client_key_file", f"{key} holds an encrypted private key", unencrypted)
        return None
    except (ValueError, UnsupportedAlgorithm):
        fix = "point it at the certificate's private key in PEM (from a .pfx: openssl pkcs12 -in app.pfx -nodes -nocerts -out app.key)"
        table.problem("client_key_file", f"{key} holds no PEM private key", fix)
        return None
    if not isinstance(private_key, rsa.RSAPrivateKey) or not isinstance(parsed.public_key(), rsa.RSAPublicKey):
        # Microsoft's identity platform verifies client assertions with RSA keys only (RS256, PS256).
        what = f"{key} holds a {type(private_key).__name__}, and the application's certificate must be RSA"
        table.problem("client_key_file", what, "make an RSA certificate of 2048 bits or more, register it with the app and use its key")
        return None
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if private_key.public_key().public_bytes(der, spki) != parsed.public_key().public_bytes(der, spki):
        what = f"{key} does not match the certificate in {certificate}"
        table.problem("client_key_file", what, "point client_key_file at the private key the certificate was made with")
        return None
    return ClientCertificate(
        path=certificate,
        sha256_thumbprint=base64.urlsafe_b64encode(parsed.fingerprint(hashes.SHA256())).rstrip(b"=").decode("ascii"),
        sha1_thumbprint=parsed.fingerprint(hashes.SHA1()).hex().upper(),
        not_after=parsed.not_valid_after_utc,
        key=private_key,
    )


_GOOGLE_SCOPE = "https://mail.google.com/"
_GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
_NOT_FOR_SERVICE_ACCOUNT = (
    "token_url", "client_id", *_CLIENT_SECRET.names, *_CERTIFICATE_KEYS, "refresh_token_file", "device_authorization_url",
)
_KEY_FILE_FIX = (
    "point it at the service account's JSON key (Google Cloud console: IAM & Admin > Service accounts > the account > "
    "Keys > Add key > JSON)"
)


def _service_account(table: Table, oauth: OAuthConfig) -> OAuthConfig:
    """grant = "service_account": Google's JWT bearer grant, acting as username by domain-wide delegation."""
    for key in _NOT_FOR_SERVICE_ACCOUNT:
        if key in table.data:
            what = 'not used with grant = "service_account"'
            table.problem(key, what, "remove it: the service account's key file names the account, its key and its token endpoint")
    if "service_account_file" not in table.data:
        what = 'missing: grant = "service_account" signs in with the key of a service account'
        table.problem("service_account_file", what, "set it to the JSON key file of a service account with domain-wide delegation")
        return oauth
    path = oauth.service_account_file
    account = _read_service_account(table, path) if path is not None and table.ok("service_account_file") else None
    if account is None:
        return oauth
    return replace(
        oauth,
        token_url=account.token_uri,
        client_id=account.client_id or account.client_email,
        scope=oauth.scope or _GOOGLE_SCOPE,
        service_account=account,
        refresh_token_file=None,
        device_authorization_url=None,
    )


def _read_service_account(table: Table, path: Path) -> ServiceAccount | None:
    """The key file checked field by field; no problem quotes the private key."""
    key = "service_account_file"
    data = table.read_file(key, path)
    if data is None:
        return None
    try:
        info = json.loads(data)
    except json.JSONDecodeError as e:
        table.problem(key, f"{path} is not JSON ({e.msg} at line {e.lineno} column {e.colno})", _KEY_FILE_FIX)
        return None
    except ValueError:
        table.problem(key, f"{path} is not UTF-8 text", _KEY_FILE_FIX)
        return None
    if not isinstance(info, dict):
        table.problem(key, f"{path} holds no JSON object", _KEY_FILE_FIX)
        return None
    kind = info.get("type")
    if kind != "service_account":
        if "installed" in info or "web" in info:
            what = f"{path} is an OAuth client's secret file, not a service account's key"
        elif isinstance(kind, str):
            what = f'{path} is a key of type {json.dumps(kind[:40])}, not "service_account"'
        else:
            what = f'{path} has no "type": "service_account"'
        table.problem(key, what, _KEY_FILE_FIX)
        return None
    fields = {name: info.get(name) for name in ("client_email", "private_key_id", "private_key")}
    missing = [name for name, value in fields.items() if not isinstance(value, str) or not value]
    if missing:
        table.problem(key, f"{path} has no {', '.join(missing)} (a non-empty string each)", _KEY_FILE_FIX)
        return None
    token_uri = info.get("token_uri", _GOOGLE_TOKEN_URI)
    try:
        token_uri = _https_url(token_uri if isinstance(token_uri, str) else "")
    except Invalid:
        table.problem(key, f"{path}: token_uri is not an https:// URL", f'write "{_GOOGLE_TOKEN_URI}" there, or remove it')
        return None
    try:
        private_key = serialization.load_pem_private_key(str(fields["private_key"]).encode("utf-8"), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        table.problem(key, f"{path}: private_key is no usable unencrypted PEM private key", _KEY_FILE_FIX)
        return None
    if not isinstance(private_key, rsa.RSAPrivateKey):
        # Google signs service accounts' keys as RSA and verifies RS256 only.
        table.problem(key, f"{path}: private_key is a {type(private_key).__name__}, not an RSA key", _KEY_FILE_FIX)
        return None
    client_id = info.get("client_id")
    return ServiceAccount(
        path=path,
        client_email=str(fields["client_email"]),
        private_key_id=str(fields["private_key_id"]),
        token_uri=token_uri,
        client_id=client_id if isinstance(client_id, str) and client_id else None,
        key=private_key,
    )


def _check_refresh_token_file(name: str, table: Table, path: Path, for_oauth_setup: bool) -> None:
    key, directory = "refresh_token_file", path.parent
    # The proxy replaces the file when the provider rotates the token, which needs a writable directory.
    if not directory.is_dir():
        fix = "create it, writable by the relayproxy user (systemd: StateDirectory=relayproxy makes /var/lib/relayproxy)"
        table.problem(key, f"the directory {directory} does not exist", fix)
        return
    if not os.access(directory, os.W_OK):
        what = f"the directory {directory} is not writable, so a rotated refresh token could not be saved"
        table.problem(key, what, "use a directory the relayproxy user may write, such as /var/lib/relayproxy")
    sign_in = f"sign in with: relayproxy oauth {name} --config {table.source.file}"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if not for_oauth_setup:
            table.problem(key, f"{path} does not exist", sign_in)
        return
    except OSError as e:
        table.problem(key, f"cannot read {path}: {e.strerror}", "check that the relayproxy user may read it")
        return
    if not for_oauth_setup:
        _secret_text(table, key, data, str(path), sign_in)


_SOURCE_FIXES = {
    "file": "write the path of a file holding the {what}",
    "env": "write the name of an environment variable",
    "credential": "write the NAME of the unit's LoadCredential=NAME:PATH",
}


def _secret(table: Table, secret: Setting) -> str | None:
    """The secret from whichever one of its sources (``*_file``, ``*_env``, ``*_credential``) is set."""
    present = [key for key in secret.names if key in table.data]
    for key in present[1:]:
        table.problem(key, f"set together with {present[0]}", "set only one of them")
    if len(present) != 1:
        return None
    key, what = present[0], secret.name.replace("_", " ")
    kind = key.removeprefix(secret.name + "_")
    value: str | None = table.value(Setting(key, str | None, default=None, fix=_SOURCE_FIXES[kind].format(what=what)))
    if value is None:
        return None
    if kind == "env":
        if not table.source.environ.get(value):
            table.problem(key, f"the environment variable {value} is not set or empty", "set it in the environment relayproxy starts with")
        return table.source.environ.get(value) or None
    if kind == "file":
        path = table.source.base / value
        data = table.read_file(key, path)
        return None if data is None else _secret_text(table, key, data, str(path), f"write the {what} into it")
    # A systemd credential: the unit's LoadCredential=NAME:PATH puts it in $CREDENTIALS_DIRECTORY/NAME.
    load = f"LoadCredential={value}:/path/to/secret"
    directory = table.source.environ.get("CREDENTIALS_DIRECTORY")
    if "/" in value or value in (".", ".."):
        table.problem(key, f"{json.dumps(value)} is no credential name", "write the NAME of LoadCredential=NAME:PATH")
    elif not directory:
        what_is_wrong = f"CREDENTIALS_DIRECTORY is not set, so there is no systemd credential {json.dumps(value)}"
        table.problem(key, what_is_wrong, f"start relayproxy from a systemd unit with {load}, or use {secret.name}_file")
    elif not (Path(directory) / value).exists():
        table.problem(key, f"there is no credential {json.dumps(value)} in {directory}", f"add {load} to the unit")
    else:
        path = Path(directory) / value
        data = table.read_file(key, path, "check the unit's LoadCredential line")
        return None if data is None else _secret_text(table, key, data, str(path), f"write the {what} into the file of {load}")
    return None


def _secret_text(table: Table, key: str, data: bytes, source: str, fix: str) -> str | None:
    """One line of UTF-8 text, as secrets are stored; the secret itself never enters a problem."""
    try:
        text = data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        table.problem(key, f"{source} is not UTF-8 text", fix)
        return None
    if not text:
        table.problem(key, f"{source} is empty", fix)
    return text or None


def _users(outer: Table, upstreams: Mapping[str, UpstreamConfig], user_names: frozenset[str]) -> dict[str, UserConfig]:
    users = {}
    for name, table in outer.subtables():
        table.check_known(key_names(UserConfig))
        user = users[name] = table.read(UserConfig, name=name)
        if upstreams and user.upstream not in upstreams:
            fix = f"name one of the configured upstreams ({', '.join(upstreams)}) or add that section"
            table.problem("upstream", f"no [upstream.{user.upstream}] section", fix)
    _devices(outer, users)
    if upstreams and DEFAULT_UPSTREAM not in upstreams:
        for name in sorted(user_names - users.keys()):
            outer.problem(
                name,
                f"user {name} from the users file has no [users.{name}] section and there is no "
                f"[upstream.{DEFAULT_UPSTREAM}] to route it to",
                f'add [users.{name}] with upstream = "NAME" or an [upstream.{DEFAULT_UPSTREAM}] section',
            )
    return users


def _devices(outer: Table, users: Mapping[str, UserConfig]) -> None:
    """One address, one user: a device's address must not name two users."""
    claimed: list[tuple[Network, str]] = []
    for name, user in users.items():
        for network in user.devices:
            for other, owner in claimed:
                if owner != name and network.version == other.version and network.overlaps(other):
                    outer.table(name).problem(
                        "devices",
                        f"{network} overlaps {other} of [users.{owner}]: a device there would be both users",
                        "give each device's address to one user only (a /32 per device)",
                    )
                    break
            claimed.append((network, name))


def _spool(table: Table, users: Mapping[str, UserConfig], environ: Mapping[str, str]) -> SpoolConfig:
    table.check_known(key_names(SpoolConfig))
    spool = table.read(SpoolConfig)
    if spool.directory is None:
        # systemd's StateDirectory= names the unit's own directory in $STATE_DIRECTORY (the first of
        # a colon-separated list).
        state = environ.get("STATE_DIRECTORY", "").split(":")[0]
        spool = replace(spool, directory=Path(state or "/var/lib/relayproxy") / "spool")
    if spool.retry_max < spool.retry_initial:
        table.problem("retry_max", f"{spool.retry_max:g} is less than retry_initial ({spool.retry_initial:g})", "make it at least retry_initial")
    spooling = sorted(name for name, user in users.items() if user.delivery != "relay")
    if spooling:
        assert spool.directory is not None
        try:
            # Private: the files hold whole messages and their envelopes.
            spool.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            writable = os.access(spool.directory, os.W_OK | os.X_OK)
        except OSError as e:
            table.problem("directory", f"{spool.directory} cannot be created ({e.strerror})", "create it, owned by the user relayproxy runs as (mode 0700), or name another")
        else:
            if not writable:
                table.problem(
                    "directory", f"{spool.directory} is not writable by this user (needed by [users.{spooling[0]}] delivery)",
                    "make it owned by the user relayproxy runs as (mode 0700), or name another",
                )
    return spool


def _limits(table: Table) -> LimitsConfig:
    table.check_known(key_names(LimitsConfig))
    limits = table.read(LimitsConfig)
    if "max_unauthenticated" not in table.data:
        return replace(limits, max_unauthenticated=max(1, min(limits.max_unauthenticated, limits.max_connections // 2)))
    if limits.max_unauthenticated >= limits.max_connections:
        table.problem(
            "max_unauthenticated",
            f"{limits.max_unauthenticated} leaves no slot of max_connections ({limits.max_connections}) to authenticated sessions",
            "make it smaller than max_connections, so clients that never log in cannot lock out those that do",
        )
    return limits
