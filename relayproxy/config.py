"""The configuration: one TOML file read into frozen dataclasses.

Every problem is reported as one line naming the file, the key, what is wrong and the fix.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import tomllib
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from OpenSSL import SSL

from relayproxy.usersfile import UsersFileError, read_users_file
from relayproxy.errors import ConfigError
from relayproxy.redis import parse_redis_url

ListenerTLS = Literal["starttls", "implicit", "none"]
UpstreamTLS = Literal["implicit", "starttls", "none"]
UpstreamAuth = Literal["password", "xoauth2"]
OAuthGrant = Literal["refresh_token", "client_credentials"]
_LISTENER_TLS: tuple[ListenerTLS, ...] = ("starttls", "implicit", "none")
_UPSTREAM_TLS: tuple[UpstreamTLS, ...] = ("implicit", "starttls", "none")
_UPSTREAM_AUTH: tuple[UpstreamAuth, ...] = ("password", "xoauth2")
_OAUTH_GRANTS: tuple[OAuthGrant, ...] = ("refresh_token", "client_credentials")

DEFAULT_PATH = Path("/etc/relayproxy/relayproxy.toml")

DEFAULT_UPSTREAM = "default"


@dataclass(frozen=True)
class ServerConfig:
    hostname: str
    max_message_size: int = 35 * 1024 * 1024
    max_recipients: int = 100
    shutdown_grace: float = 30.0


@dataclass(frozen=True)
class TLSConfig:
    certificate: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class ListenerConfig:
    endpoint: str
    tls: ListenerTLS
    allow_plaintext_auth: bool = False


@dataclass(frozen=True)
class OAuthConfig:
    """Where and how an upstream with auth = "xoauth2" gets its access tokens.

    The refresh token is not held here: it rotates, so relayproxy.oauth reads it from
    ``refresh_token_file`` whenever it refreshes, and a reload sees an unchanged upstream.
    """

    token_url: str
    client_id: str
    grant: OAuthGrant = "refresh_token"
    client_secret: str | None = field(default=None, repr=False)
    # Set exactly when grant is "refresh_token".
    refresh_token_file: Path | None = None
    scope: str | None = None
    device_authorization_url: str | None = None
    # PEM CA certificates for the token endpoints; None: the system's trust store.
    token_ca_file: Path | None = None


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    host: str
    port: int
    tls: UpstreamTLS
    ca_file: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    helo_name: str | None = None
    connect_timeout: float = 30.0
    reply_timeout: float = 300.0
    data_timeout: float = 600.0
    auth: UpstreamAuth = "password"
    # Set exactly when auth is "xoauth2"; username is then the mailbox and password None.
    oauth: OAuthConfig | None = None
    fallbacks: tuple[tuple[str, int], ...] = ()
    """Further hosts after ``host``/``port`` (from ``hosts = [...]``), tried in order."""
    envelope_from: str | None = None
    header_from: str | None = None
    pool_size: int = 32
    """Authenticated sessions kept open for the next transaction of any client of this upstream."""
    pool_idle_timeout: float = 30.0


@dataclass(frozen=True)
class UserConfig:
    name: str
    upstream: str = DEFAULT_UPSTREAM
    allowed_senders: tuple[str, ...] = ()
    max_messages_per_hour: int | None = None
    """Messages the upstream accepted for this user in the last hour, at most; None: unlimited."""
    max_recipients_per_day: int | None = None
    """Accepted recipients of those messages in the last 24 hours, at most; None: unlimited."""
    check_header_from: bool = True
    """With allowed_senders: the header From and Sender must be allowed addresses too."""

    def may_send(self, address: str) -> bool:
        """May this user use ``address`` as a sender (MAIL FROM, and the header From and Sender)?"""
        if not self.allowed_senders:
            return True
        address = address.lower()
        # rpartition: a quoted local part may itself contain "@".
        local, at, domain = address.rpartition("@")
        # A quoted local part, a percent hack or a bang path names another mailbox to a server that
        # still honours them ("ceo@example.org"@d, ceo%example.org@d, ceo!example.org@d): a domain
        # entry does not cover them, only an exact one.
        routed = local.startswith('"') or "%" in local or "!" in local
        for allowed in self.allowed_senders:
            allowed = allowed.lower()
            if allowed.startswith("@"):
                if at and allowed == "@" + domain and not routed:
                    return True
            elif allowed == address:
                return True
        # The null sender (bounces) cannot be attributed to anyone, so only an
        # unrestricted user may use it; it never matches an entry above.
        return False


LogFormat = Literal["text", "json"]
_LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")


@dataclass(frozen=True)
class LimitsConfig:
    command_timeout: float = 300.0
    data_timeout: float = 180.0
    session_timeout: float = 3600.0
    greeting_delay: float = 0.0
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    max_auth_failures_per_session: int = 3
    auth_failures_per_ip: int = 10
    auth_failures_per_user: int = 10
    auth_failure_window: float = 600.0
    auth_backoff: float = 60.0
    auth_backoff_max: float = 3600.0
    max_invalid_commands: int = 20
    max_header_size: int = 262144
    unauthenticated_timeout: float = 60.0
    """Longest a session may last before it authenticates."""
    max_unauthenticated: int = 200
    """Concurrent sessions that have not authenticated (the rest of max_connections is theirs who have)."""
    min_data_rate: int = 1024
    """Octets per second a body must average once data_rate_grace has passed (0: no such limit)."""
    data_rate_grace: float = 30.0
    ipv6_prefix: int = 64
    """IPv6 clients are counted per network of this prefix length (per-address limits, AUTH throttle)."""
    store: str = "memory"
    """Where AUTH failures and sending budgets are counted: "memory" or "redis://HOST:PORT/DB"."""


@dataclass(frozen=True)
class Config:
    path: Path
    server: ServerConfig
    tls: TLSConfig
    listeners: tuple[ListenerConfig, ...]
    users_file: Path
    upstreams: dict[str, UpstreamConfig]
    users: dict[str, UserConfig]
    limits: LimitsConfig = LimitsConfig()
    log_format: LogFormat = "text"
    metrics_endpoint: str | None = None
    """Twisted server endpoint string for the Prometheus HTTP server; None: no metrics server."""
    auth_cache_seconds: float = 300.0
    """How long a verified user name and password pair is accepted without bcrypt (0: never)."""

    def user(self, name: str) -> UserConfig:
        """The configuration of user ``name``; users without a section use the defaults."""
        return self.users.get(name, UserConfig(name))


def load_config(
    path: Path, environ: Mapping[str, str] | None = None, *, for_oauth_setup: bool = False
) -> Config:
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
        raise ConfigError(
            [f"{path}: cannot read the configuration: {e.strerror}; check the path or pass --config"]
        ) from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML: {e}; correct the syntax there"]) from e

    report = _Report(str(path))
    # Relative paths in the file are relative to the file, not to wherever the
    # daemon happens to be started; absolute so a later chdir cannot change them.
    base = path.absolute().parent
    top = _Table(report, "", data)
    top.check_known(["server", "tls", "listener", "auth", "upstream", "users", "limits", "log", "metrics"])

    server = _read_server(top.table("server"))
    listeners = _read_listeners(top)
    tls = _read_tls(top.table("tls"), base, listeners)
    auth_table = top.table("auth")
    users_file, user_names = _read_auth(auth_table, base)
    auth_cache_seconds = 0.0 if auth_table.data.get("cache_seconds") == 0 else auth_table.seconds("cache_seconds", Config.auth_cache_seconds)
    upstreams = _read_upstreams(top, base, os.environ if environ is None else environ, for_oauth_setup)
    users = _read_users(top, upstreams, user_names)
    limits = _read_limits(top.table("limits"))
    log_table = top.table("log")
    log_table.check_known(["format"])
    log_format = log_table.choice("format", _LOG_FORMATS, "text")
    metrics_endpoint = _read_metrics(top.table("metrics"))

    if report.problems:
        raise ConfigError(report.problems)
    return Config(
        path=path,
        server=server,
        tls=tls,
        listeners=listeners,
        users_file=users_file,
        auth_cache_seconds=auth_cache_seconds,
        upstreams=upstreams,
        users=users,
        limits=limits,
        log_format=log_format,
        metrics_endpoint=metrics_endpoint,
    )


class _Report:
    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[str] = []

    def add(self, key: str, what: str, fix: str) -> None:
        self.problems.append(f"{self.file}: {key}: {what}; {fix}")


_Choice = TypeVar("_Choice", bound=str)


@dataclass(frozen=True)
class _Table:
    """One TOML table with typed getters.

    A getter that finds a problem reports it and returns the default (or an empty
    placeholder for required keys): the report then stops a Config being built,
    while reading goes on so that every problem is reported at once.
    """

    report: _Report
    key: str
    data: Mapping[str, object]

    def key_of(self, name: str) -> str:
        return _join_key(self.key, name)

    def problem(self, name: str, what: str, fix: str) -> None:
        self.report.add(self.key_of(name), what, fix)

    def wrong_type(self, name: str, expected: str, fix: str) -> None:
        self.problem(name, f"expected {expected}, got {_show(self.data[name])}", fix)

    def check_known(self, known: Sequence[str]) -> None:
        for name in self.data:
            if name not in known:
                self.problem(
                    name,
                    "unknown key",
                    f"remove it or check the spelling (known keys: {', '.join(known)})",
                )

    def table(self, name: str) -> _Table:
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            self.wrong_type(name, "a table", f"write it as a [{self.key_of(name)}] section")
            value = {}
        return _Table(self.report, self.key_of(name), value)

    def subtables(self, name: str) -> list[tuple[str, _Table]]:
        """The named tables inside table ``name``, such as each [upstream.NAME]."""
        outer = self.table(name)
        found = []
        for sub, value in outer.data.items():
            if isinstance(value, dict):
                found.append((sub, _Table(self.report, outer.key_of(sub), value)))
            else:
                outer.wrong_type(sub, "a table", f"write it as a [{outer.key_of(sub)}] section")
        return found

    def array_of_tables(self, name: str) -> list[_Table]:
        value = self.data.get(name, [])
        fix = f"write each entry as a [[{self.key_of(name)}]] section"
        if not isinstance(value, list):
            self.wrong_type(name, "an array of tables", fix)
            return []
        found = []
        # Counted from 1, as a reader counts the [[...]] sections in the file.
        for number, item in enumerate(value, 1):
            key = f"{self.key_of(name)}[{number}]"
            if isinstance(item, dict):
                found.append(_Table(self.report, key, item))
            else:
                self.report.add(key, f"expected a table, got {_show(item)}", fix)
        return found

    def string(self, name: str, fix: str, *, required: bool = False) -> str | None:
        value = self.data.get(name)
        if value is None:
            if required:
                self.problem(name, "missing", fix)
            return None
        if not isinstance(value, str) or not value:
            self.wrong_type(name, "a non-empty string", fix)
            return None
        return value

    def required_string(self, name: str, fix: str) -> str:
        return self.string(name, fix, required=True) or ""

    def integer(self, name: str, default: int, fix: str, *, low: int, high: int) -> int:
        value = self.data.get(name)
        if value is None:
            return default
        # bool is an int subclass in Python but true/false is no number in TOML.
        if not isinstance(value, int) or isinstance(value, bool):
            self.wrong_type(name, "an integer", fix)
            return default
        if not low <= value <= high:
            self.wrong_type(name, f"an integer from {low} to {high}", fix)
            return default
        return value

    def seconds(self, name: str, default: float) -> float:
        value = self.data.get(name)
        if value is None:
            return default
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
            or value <= 0
        ):
            self.wrong_type(
                name, "a number of seconds greater than 0", "write a number such as 30 or 2.5"
            )
            return default
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.wrong_type(name, "true or false", "write true or false without quotes")
            return default
        return value

    def choice(self, name: str, choices: tuple[_Choice, ...], default: _Choice) -> _Choice:
        value = self.data.get(name)
        if value is None:
            return default
        for choice in choices:
            if value == choice:
                return choice
        listed = ", ".join(json.dumps(c) for c in choices)
        self.wrong_type(name, f"one of {listed}", f"write one of {listed}")
        return default

    def string_list(self, name: str, fix: str) -> list[str]:
        value = self.data.get(name)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.wrong_type(name, "an array of strings", fix)
            return []
        return [str(v) for v in value]

    def path(self, name: str, base: Path, fix: str, *, required: bool = False) -> Path | None:
        value = self.string(name, fix, required=required)
        return None if value is None else base / value

    def read_file(self, name: str, path: Path, fix: str) -> bytes | None:
        try:
            return path.read_bytes()
        except OSError as e:
            self.problem(name, f"cannot read {path}: {e.strerror}", fix)
            return None


def _join_key(prefix: str, name: str) -> str:
    # Quoted as TOML would need it, so that the key can be found in the file.
    part = name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)
    return f"{prefix}.{part}" if prefix else part


def _show(value: object) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str | bool | int | float):
        return json.dumps(value)
    # TOML dates and times.
    return f"a {type(value).__name__}"


def _is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_server(table: _Table) -> ServerConfig:
    table.check_known(["hostname", "max_message_size", "max_recipients", "shutdown_grace"])
    return ServerConfig(
        hostname=table.required_string(
            "hostname", "write the name this relay announces, such as \"relay.example.org\""
        ),
        max_message_size=table.integer(
            "max_message_size",
            ServerConfig.max_message_size,
            "write a size in bytes such as 36700160",
            low=1,
            high=2**63 - 1,
        ),
        max_recipients=table.integer(
            "max_recipients",
            ServerConfig.max_recipients,
            "write a number of recipients such as 100",
            low=1,
            high=2**31 - 1,
        ),
        shutdown_grace=table.seconds("shutdown_grace", ServerConfig.shutdown_grace),
    )


# Endpoint types that yield a plain stream for relayproxy to run SMTP (and its
# own TLS) over.  "haproxy" wraps one of the others, so its inner type is checked too.
_ENDPOINT_TYPES = ("tcp", "tcp6", "unix", "systemd")


def _endpoint_problem(endpoint: str) -> tuple[str, str] | None:
    """What is wrong with a Twisted server endpoint string, and the fix, if anything."""
    # Twisted escapes a colon inside a field with a backslash.
    fields = re.split(r"(?<!\\):", endpoint)
    kind = fields[0].lower()
    if kind == "haproxy" and len(fields) > 1:
        kind = fields[1].lower()
    if kind in ("ssl", "tls"):
        return (
            f"relayproxy does its own TLS, so {kind}: endpoints are not used",
            'use a tcp endpoint with tls = "implicit" instead, such as "tcp:465"',
        )
    if kind not in _ENDPOINT_TYPES or len(fields) < 2 or not fields[1]:
        return (
            f"not a server endpoint of a known type ({', '.join(_ENDPOINT_TYPES)}, haproxy)",
            'write one such as "tcp:587:interface=0.0.0.0"',
        )
    return None


def _binds_locally(endpoint: str) -> bool:
    """Can only clients on this host connect to ``endpoint``?"""
    fields = re.split(r"(?<!\\):", endpoint)
    if fields[0].lower() == "unix":
        # A Unix socket never leaves the host, like a loopback interface.
        return True
    for f in fields[1:]:
        name, _, value = f.partition("=")
        if name == "interface":
            return _is_loopback_host(value.replace("\\:", ":"))
    return False


# The metrics server speaks plain HTTP to a scraper: no TLS, no PROXY protocol in front.
_METRICS_ENDPOINT_TYPES = ("tcp", "tcp6", "unix", "systemd")


def _read_metrics(table: _Table) -> str | None:
    table.check_known(["endpoint"])
    example = 'write one such as "tcp:9187:interface=127.0.0.1", or remove it to serve no metrics'
    endpoint = table.string("endpoint", example)
    if endpoint is None:
        return None
    fields = re.split(r"(?<!\\):", endpoint)
    kind = fields[0].lower()
    if kind not in _METRICS_ENDPOINT_TYPES or len(fields) < 2 or not fields[1]:
        table.problem(
            "endpoint",
            f"{json.dumps(endpoint)} is not a server endpoint of a known type ({', '.join(_METRICS_ENDPOINT_TYPES)})",
            example,
        )
        return None
    if kind in ("tcp", "tcp6"):
        # The port is the first field without "=", or "port=N" anywhere.
        ports = [f.removeprefix("port=") for f in fields[1:] if "=" not in f or f.startswith("port=")]
        if not ports or not (ports[0].isdigit() and int(ports[0]) <= 65535):
            table.problem("endpoint", f"{json.dumps(endpoint)} names no port number from 0 to 65535", example)
            return None
    return endpoint


def _read_listeners(top: _Table) -> tuple[ListenerConfig, ...]:
    tables = top.array_of_tables("listener")
    if not top.data.get("listener"):
        top.problem(
            "listener",
            "missing: nothing would accept connections",
            'add a [[listener]] section with endpoint = "tcp:587"',
        )
    listeners = []
    for table in tables:
        table.check_known(["endpoint", "tls", "allow_plaintext_auth"])
        endpoint = table.required_string("endpoint", 'write one such as "tcp:587:interface=0.0.0.0"')
        if endpoint:
            problem = _endpoint_problem(endpoint)
            if problem:
                table.problem("endpoint", *problem)
        tls = table.choice("tls", _LISTENER_TLS, "starttls")
        allow_plaintext_auth = table.boolean("allow_plaintext_auth", False)
        if tls == "none" and endpoint and not allow_plaintext_auth and not _binds_locally(endpoint):
            table.problem(
                "tls",
                "\"none\" would let passwords cross the network in the clear",
                'use "starttls" or "implicit", bind a loopback interface such as '
                '"tcp:2525:interface=127.0.0.1", or set allow_plaintext_auth = true',
            )
        listeners.append(ListenerConfig(endpoint, tls, allow_plaintext_auth))
    return tuple(listeners)


def _read_tls(table: _Table, base: Path, listeners: tuple[ListenerConfig, ...]) -> TLSConfig:
    table.check_known(["certificate", "key"])
    certificate = table.path("certificate", base, "write the path of a PEM certificate file")
    key = table.path("key", base, "write the path of a PEM private key file")
    if certificate is None and key is None:
        for number, listener in enumerate(listeners, 1):
            if listener.tls != "none":
                table.problem(
                    "certificate",
                    f'missing, but listener[{number}] has tls = "{listener.tls}"',
                    "set [tls] certificate and key to PEM files",
                )
                break
        return TLSConfig()
    if certificate is None or key is None:
        missing, present = ("certificate", "key") if certificate is None else ("key", "certificate")
        table.problem(missing, f"missing, but {present} is set", "set both or neither")
        return TLSConfig(certificate, key)

    fix = "check the path and that the relayproxy user may read it"
    cert_pem = table.read_file("certificate", certificate, fix)
    key_pem = table.read_file("key", key, fix)
    if cert_pem is None or key_pem is None:
        return TLSConfig(certificate, key)
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        table.problem(
            "certificate", f"{certificate} holds no PEM certificate", "point it at a PEM certificate file"
        )
        return TLSConfig(certificate, key)
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        # TypeError: the key is encrypted; the daemon has no one to ask for a passphrase.
        table.problem(
            "key",
            f"{key} holds no usable PEM private key ({e})",
            "point it at an unencrypted PEM private key file",
        )
        return TLSConfig(certificate, key)
    if not isinstance(private_key, _TLS_KEY_TYPES):
        table.problem(
            "key",
            f"{key} holds a {type(private_key).__name__}, which cannot serve TLS",
            "use an RSA, ECDSA or EdDSA key",
        )
        return TLSConfig(certificate, key)
    # Ask OpenSSL itself, the library that will serve with this pair.
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    try:
        context.use_certificate(cert)
        context.use_privatekey(private_key)
        context.check_privatekey()
    except SSL.Error:
        table.problem(
            "key",
            f"key does not match certificate {certificate}",
            "point key at the private key the certificate was issued for",
        )
    return TLSConfig(certificate, key)


_TLS_KEY_TYPES = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
    dsa.DSAPrivateKey,
)


def _read_auth(table: _Table, base: Path) -> tuple[Path, frozenset[str]]:
    table.check_known(["users_file", "cache_seconds"])
    fix = "create it with: relayproxy passwd add NAME, or let the relayproxy user read it"
    path = table.path("users_file", base, "write the path of the users file", required=True)
    if path is None:
        return Path(), frozenset()
    try:
        users = read_users_file(path)
    except OSError as e:
        table.problem("users_file", f"cannot read {path}: {e.strerror}", fix)
        return path, frozenset()
    except UsersFileError as e:
        # Each problem names its line and carries its own fix.
        key = table.key_of("users_file")
        table.report.problems.extend(f"{table.report.file}: {key}: {p}" for p in e.problems)
        return path, frozenset()
    return path, frozenset(users)


def _read_upstreams(
    top: _Table, base: Path, environ: Mapping[str, str], for_oauth_setup: bool
) -> dict[str, UpstreamConfig]:
    upstreams = {}
    tables = top.subtables("upstream")
    if not top.data.get("upstream"):
        top.problem(
            "upstream",
            "missing: there is nowhere to relay mail to",
            'add an [upstream.default] section with host = "smtp.example.com"',
        )
    for name, table in tables:
        upstreams[name] = _read_upstream(name, table, base, environ, for_oauth_setup)
    return upstreams


_PASSWORD_KEYS = ("password_file", "password_env", "password_credential")
_CLIENT_SECRET_KEYS = ("client_secret_file", "client_secret_credential")
_OAUTH_KEYS = (
    "token_url",
    "client_id",
    *_CLIENT_SECRET_KEYS,
    "refresh_token_file",
    "scope",
    "grant",
    "device_authorization_url",
    "token_ca_file",
)


def _read_upstream(
    name: str, table: _Table, base: Path, environ: Mapping[str, str], for_oauth_setup: bool
) -> UpstreamConfig:
    table.check_known(
        [
            "host",
            "port",
            "tls",
            "ca_file",
            "auth",
            "username",
            *_PASSWORD_KEYS,
            *_OAUTH_KEYS,
            "helo_name",
            "connect_timeout",
            "reply_timeout",
            "data_timeout",
            "hosts",
            "envelope_from",
            "header_from",
            "pool_size",
            "pool_idle_timeout",
        ]
    )
    tls = table.choice("tls", _UPSTREAM_TLS, "starttls")
    default_port = {"implicit": 465, "starttls": 587, "none": 25}[tls]
    if "hosts" in table.data:
        for key in ("host", "port"):
            if key in table.data:
                table.problem(key, "set together with hosts", f"list every host in hosts and remove {key}")
        targets = _read_hosts(table, default_port)
        host, port = targets[0] if targets else ("", default_port)
        fallbacks = tuple(targets[1:])
    else:
        host = table.required_string("host", 'write the provider\'s SMTP server, such as "smtp.gmail.com"')
        port = table.integer("port", default_port, "write a port number such as 465", low=1, high=65535)
        fallbacks = ()
    ca_file = table.path("ca_file", base, "write the path of a PEM file of CA certificates")
    if ca_file is not None:
        table.read_file("ca_file", ca_file, "check the path and that the relayproxy user may read it")
    auth = table.choice("auth", _UPSTREAM_AUTH, "password")
    username = table.string("username", 'write the login name, such as "relay@example.com"')
    # Judged by presence, not by validity: a bad value has been reported already.
    has_username = "username" in table.data
    password = None
    oauth = None
    if auth == "password":
        for key in _OAUTH_KEYS:
            if key in table.data:
                table.problem(key, 'only used with auth = "xoauth2"', 'set auth = "xoauth2" or remove it')
        password = _read_secret(table, base, environ, _PASSWORD_KEYS, "password")
        has_password = any(key in table.data for key in _PASSWORD_KEYS)
        if has_username and not has_password:
            table.problem(
                "username", "set without a password", "set password_file, password_env or password_credential too"
            )
        if has_password and not has_username:
            table.problem("username", "missing, but a password is set", "set username too")
        has_credentials = has_username or has_password
    else:
        for key in _PASSWORD_KEYS:
            if key in table.data:
                table.problem(
                    key,
                    'not used with auth = "xoauth2", which logs in with an access token',
                    'remove it, or set auth = "password"',
                )
        if not has_username:
            table.problem(
                "username",
                'missing: auth = "xoauth2" needs the mailbox to log in as',
                'set username to the mailbox, such as "alerts@example.org"',
            )
        oauth = _read_oauth(name, table, base, environ, for_oauth_setup)
        has_credentials = True
    if tls == "none" and host:
        remote = [other for other, _ in ((host, port), *fallbacks) if not _is_loopback_host(other)]
        for other in remote:
            table.problem(
                "tls",
                f'"none" is only allowed for a loopback host, not {json.dumps(other)}',
                'use "implicit" or "starttls"',
            )
        if not remote and has_credentials:
            table.problem(
                "tls",
                '"none" with credentials configured: relayproxy never sends credentials in the clear',
                'use "implicit" or "starttls", or remove username and password',
            )
    return UpstreamConfig(
        name=name,
        host=host,
        port=port,
        tls=tls,
        ca_file=ca_file,
        username=username,
        password=password,
        auth=auth,
        oauth=oauth,
        helo_name=table.string("helo_name", 'write a host name such as "relay.example.org"'),
        connect_timeout=table.seconds("connect_timeout", UpstreamConfig.connect_timeout),
        reply_timeout=table.seconds("reply_timeout", UpstreamConfig.reply_timeout),
        data_timeout=table.seconds("data_timeout", UpstreamConfig.data_timeout),
        fallbacks=fallbacks,
        envelope_from=_read_envelope_from(table),
        header_from=_read_header_from(table),
        pool_size=table.integer("pool_size", UpstreamConfig.pool_size, "write a number of sessions such as 32 (0 keeps none)", low=0, high=1000),
        pool_idle_timeout=table.seconds("pool_idle_timeout", UpstreamConfig.pool_idle_timeout),
    )


def _read_hosts(table: _Table, default_port: int) -> list[tuple[str, int]]:
    fix = 'write a list such as ["smtp1.example.org:465", "smtp2.example.org:465"]'
    entries = table.string_list("hosts", fix)
    if not entries and "hosts" in table.data and isinstance(table.data["hosts"], list):
        table.problem("hosts", "is empty", fix)
    targets = []
    for entry in entries:
        m = _HOST_PORT.match(entry)
        port_text = m.group("port") if m else None
        if m is None or (port_text is not None and not 1 <= int(port_text) <= 65535):
            table.problem("hosts", f"{json.dumps(entry)} is not HOST or HOST:PORT", fix)
            continue
        targets.append((m.group("v6") or m.group("host"), int(port_text) if port_text else default_port))
    return targets


_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\s:\[\]]+))(?::(?P<port>\d{1,5}))?$")


_ENVELOPE_ADDRESS = re.compile(r"^[^\s<>@]+@[^\s<>@]+$")


def _read_envelope_from(table: _Table) -> str | None:
    value = table.string("envelope_from", 'write the account\'s address, such as "alerts@example.org"')
    if value is not None and not _ENVELOPE_ADDRESS.match(value):
        table.problem("envelope_from", f"{json.dumps(value)} is not an address", 'write one such as "alerts@example.org"')
        return None
    return value


def _read_header_from(table: _Table) -> str | None:
    value = table.string("header_from", 'write a From such as "Alerts <alerts@example.org>"')
    # The value goes into the message header as it is: one line of printable ASCII (RFC 5322 2.2).
    if value is not None and not (value.isascii() and value.isprintable() and "@" in value):
        table.problem(
            "header_from",
            "must be one line of printable ASCII with an address",
            'write one such as "Alerts <alerts@example.org>" (encode other characters per RFC 2047)',
        )
        return None
    return value


def _read_oauth(
    name: str, table: _Table, base: Path, environ: Mapping[str, str], for_oauth_setup: bool
) -> OAuthConfig:
    token_url = _https_url(
        table,
        "token_url",
        "write the provider's token endpoint, such as "
        '"https://login.microsoftonline.com/TENANT/oauth2/v2.0/token"',
        required=True,
    ) or ""
    client_id = table.required_string(
        "client_id", "write the client ID of the application registered with the provider"
    )
    grant = table.choice("grant", _OAUTH_GRANTS, "refresh_token")
    client_secret = _read_secret(table, base, environ, _CLIENT_SECRET_KEYS, "client secret")
    scope = table.string("scope", 'write the scopes separated by spaces, such as "https://mail.google.com/"')
    device_authorization_url = _https_url(
        table,
        "device_authorization_url",
        "write the provider's device authorization endpoint, such as "
        '"https://login.microsoftonline.com/TENANT/oauth2/v2.0/devicecode"',
    )
    token_ca_file = table.path("token_ca_file", base, "write the path of a PEM file of CA certificates")
    if token_ca_file is not None:
        table.read_file("token_ca_file", token_ca_file, "check the path and that the relayproxy user may read it")
    refresh_token_file = table.path(
        "refresh_token_file", base, "write the path of the file relayproxy keeps the refresh token in"
    )
    if grant == "refresh_token":
        if "refresh_token_file" not in table.data:
            table.problem(
                "refresh_token_file",
                'missing: grant = "refresh_token" needs a file to keep the refresh token in',
                'set it, such as "/var/lib/relayproxy/NAME.refresh-token", and sign in with: relayproxy oauth NAME',
            )
        elif refresh_token_file is not None:
            _check_refresh_token_file(name, table, refresh_token_file, for_oauth_setup)
    else:
        if not any(key in table.data for key in _CLIENT_SECRET_KEYS):
            table.problem(
                "client_secret_file",
                'missing: grant = "client_credentials" authenticates the application with its client secret',
                "set client_secret_file or client_secret_credential",
            )
        if "scope" not in table.data:
            table.problem(
                "scope",
                'missing: grant = "client_credentials" needs the resource\'s scope',
                'for Microsoft 365 write scope = "https://outlook.office365.com/.default"',
            )
        for key in ("refresh_token_file", "device_authorization_url"):
            if key in table.data:
                table.problem(
                    key, 'not used with grant = "client_credentials"', 'remove it, or set grant = "refresh_token"'
                )
    return OAuthConfig(
        token_url=token_url,
        client_id=client_id,
        grant=grant,
        client_secret=client_secret,
        refresh_token_file=refresh_token_file if grant == "refresh_token" else None,
        scope=scope,
        device_authorization_url=device_authorization_url if grant == "refresh_token" else None,
        token_ca_file=token_ca_file,
    )


def _https_url(table: _Table, name: str, fix: str, *, required: bool = False) -> str | None:
    """An https URL, or None when absent or wrong (reported)."""
    url = table.string(name, fix, required=required)
    if url is None:
        return None
    try:
        parts = urllib.parse.urlsplit(url)
        ok = parts.scheme == "https" and bool(parts.hostname) and url.isascii() and not parts.fragment
    except ValueError:
        ok = False
    if not ok:
        # Client secrets and tokens cross this connection: only verified TLS will do.
        table.problem(name, f"{json.dumps(url)} is not an https:// URL", fix)
        return None
    return url


def _check_refresh_token_file(name: str, table: _Table, path: Path, for_oauth_setup: bool) -> None:
    directory = path.parent
    # The proxy replaces the file when the provider rotates the token, which needs a writable directory.
    if not directory.is_dir():
        table.problem(
            "refresh_token_file",
            f"the directory {directory} does not exist",
            "create it, writable by the relayproxy user (systemd: StateDirectory=relayproxy makes /var/lib/relayproxy)",
        )
        return
    if not os.access(directory, os.W_OK):
        table.problem(
            "refresh_token_file",
            f"the directory {directory} is not writable, so a rotated refresh token could not be saved",
            "use a directory the relayproxy user may write, such as /var/lib/relayproxy",
        )
    sign_in = f"sign in with: relayproxy oauth {name} --config {table.report.file}"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if not for_oauth_setup:
            table.problem("refresh_token_file", f"{path} does not exist", sign_in)
        return
    except OSError as e:
        table.problem(
            "refresh_token_file", f"cannot read {path}: {e.strerror}", "check that the relayproxy user may read it"
        )
        return
    if not for_oauth_setup:
        _secret_text(table, "refresh_token_file", data, str(path), sign_in)


def _read_secret(
    table: _Table, base: Path, environ: Mapping[str, str], keys: Sequence[str], what: str
) -> str | None:
    """The secret named by whichever one of ``keys`` (``*_file``, ``*_env``, ``*_credential``) is set."""
    present = [key for key in keys if key in table.data]
    for key in present[1:]:
        table.problem(key, f"set together with {present[0]}", "set only one of them")
    if len(present) != 1:
        return None
    key = present[0]
    write = f"write the {what} into it"
    if key.endswith("_file"):
        path = table.path(key, base, f"write the path of a file holding the {what}")
        if path is None:
            return None
        data = table.read_file(key, path, "check the path and that the relayproxy user may read it")
        return None if data is None else _secret_text(table, key, data, str(path), write)
    if key.endswith("_env"):
        variable = table.string(key, "write the name of an environment variable")
        if variable is None:
            return None
        value = environ.get(variable)
        if not value:
            table.problem(
                key,
                f"the environment variable {variable} is not set or empty",
                "set it in the environment relayproxy starts with",
            )
            return None
        return value
    return _read_credential(table, key, environ, what)


def _read_credential(table: _Table, key: str, environ: Mapping[str, str], what: str) -> str | None:
    """A systemd credential: the unit's LoadCredential=NAME:PATH puts it in $CREDENTIALS_DIRECTORY/NAME."""
    name = table.string(key, "write the NAME of the unit's LoadCredential=NAME:PATH")
    if name is None:
        return None
    load = f"LoadCredential={name}:/path/to/secret"
    if "/" in name or name in (".", ".."):
        table.problem(key, f"{json.dumps(name)} is no credential name", "write the NAME of LoadCredential=NAME:PATH")
        return None
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        table.problem(
            key,
            f"CREDENTIALS_DIRECTORY is not set, so there is no systemd credential {json.dumps(name)}",
            f"start relayproxy from a systemd unit with {load}, or use {key.removesuffix('_credential')}_file",
        )
        return None
    path = Path(directory) / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        table.problem(key, f"there is no credential {json.dumps(name)} in {directory}", f"add {load} to the unit")
        return None
    except OSError as e:
        table.problem(key, f"cannot read {path}: {e.strerror}", "check the unit's LoadCredential line")
        return None
    return _secret_text(table, key, data, str(path), f"write the {what} into the file of {load}")


def _secret_text(table: _Table, key: str, data: bytes, source: str, fix: str) -> str | None:
    """One line of UTF-8 text, as secrets are stored; the secret itself never enters a problem."""
    try:
        text = data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        table.problem(key, f"{source} is not UTF-8 text", fix)
        return None
    if not text:
        table.problem(key, f"{source} is empty", fix)
        return None
    return text


def _read_users(
    top: _Table, upstreams: Mapping[str, UpstreamConfig], user_names: frozenset[str]
) -> dict[str, UserConfig]:
    users = {}
    upstream_list = ", ".join(upstreams) or "none"
    for name, table in top.subtables("users"):
        table.check_known(["upstream", "allowed_senders", "check_header_from", *_USER_BUDGETS])
        upstream = table.string("upstream", "write the name of an [upstream.NAME] section") or DEFAULT_UPSTREAM
        if upstreams and upstream not in upstreams:
            table.problem(
                "upstream",
                f"no [upstream.{upstream}] section",
                f"name one of the configured upstreams ({upstream_list}) or add that section",
            )
        senders = []
        fix = 'write addresses such as "alice@example.com" or whole domains such as "@example.com"'
        for sender in table.string_list("allowed_senders", fix):
            _, at, domain = sender.rpartition("@")
            if not at or not domain:
                table.problem("allowed_senders", f"{json.dumps(sender)} is no address or @domain", fix)
            senders.append(sender.lower())
        budget_fix = "write a whole number of at least 1, or remove the key for no limit"
        users[name] = UserConfig(
            name, upstream, tuple(senders),
            max_messages_per_hour=table.integer("max_messages_per_hour", 0, budget_fix, low=1, high=10**9) or None,
            max_recipients_per_day=table.integer("max_recipients_per_day", 0, budget_fix, low=1, high=10**9) or None,
            check_header_from=table.boolean("check_header_from", True),
        )
    if upstreams and DEFAULT_UPSTREAM not in upstreams:
        for name in sorted(user_names - users.keys()):
            top.report.add(
                _join_key("users", name),
                f"user {name} from the users file has no [users.{name}] section and there is no "
                f"[upstream.{DEFAULT_UPSTREAM}] to route it to",
                f'add [users.{name}] with upstream = "NAME" or an [upstream.{DEFAULT_UPSTREAM}] section',
            )
    return users


_LIMIT_SECONDS = (
    "command_timeout", "data_timeout", "session_timeout", "auth_failure_window", "auth_backoff", "auth_backoff_max",
    "unauthenticated_timeout", "data_rate_grace",
)
_LIMIT_COUNTS = (
    "max_connections", "max_connections_per_ip", "max_auth_failures_per_session",
    "auth_failures_per_ip", "auth_failures_per_user", "max_invalid_commands", "max_header_size", "max_unauthenticated",
)


def _read_limits(table: _Table) -> LimitsConfig:
    table.check_known([*_LIMIT_SECONDS, *_LIMIT_COUNTS, "greeting_delay", "store", "min_data_rate", "ipv6_prefix"])
    defaults = LimitsConfig()
    values: dict[str, Any] = {name: table.seconds(name, getattr(defaults, name)) for name in _LIMIT_SECONDS}
    for name in _LIMIT_COUNTS:
        values[name] = table.integer(name, getattr(defaults, name), "write a whole number of at least 1", low=1, high=10**9)
    delay = table.data.get("greeting_delay")
    values["greeting_delay"] = 0.0 if delay == 0 else table.seconds("greeting_delay", defaults.greeting_delay)
    values["min_data_rate"] = table.integer(
        "min_data_rate", defaults.min_data_rate, "write octets per second as a whole number (0: no minimum)", low=0, high=10**9
    )
    values["ipv6_prefix"] = table.integer(
        "ipv6_prefix", defaults.ipv6_prefix, "write a prefix length from 1 to 128 (64: one customer network)", low=1, high=128
    )
    values["store"] = _read_store(table)
    if "max_unauthenticated" not in table.data:
        values["max_unauthenticated"] = max(1, min(defaults.max_unauthenticated, values["max_connections"] // 2))
    elif values["max_unauthenticated"] >= values["max_connections"]:
        table.problem(
            "max_unauthenticated", f"{values['max_unauthenticated']} leaves no slot of max_connections ({values['max_connections']}) to authenticated sessions",
            "make it smaller than max_connections, so clients that never log in cannot lock out those that do",
        )
    return LimitsConfig(**values)


_USER_BUDGETS = ("max_messages_per_hour", "max_recipients_per_day")


def _read_store(table: _Table) -> str:
    fix = 'write "memory" or a URL such as "redis://127.0.0.1:6379/0"'
    value = table.string("store", fix)
    if value is None or value == "memory":
        return "memory"
    try:
        parse_redis_url(value)
    except ValueError as e:
        # The URL may hold a password: the problem names only what is wrong with it.
        table.problem("store", f"not \"memory\" or a usable redis:// URL: {e}", fix)
        return "memory"
    return value
