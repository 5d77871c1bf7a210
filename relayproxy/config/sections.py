"""Every table of the configuration, each declared once: its keys' types, defaults, ranges and fixes.

etc/relayproxy.toml documents each key declared here (tests/test_config.py holds the two together).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from relayproxy.config.schema import Invalid, Schema, Setting, section, setting
from relayproxy.redis import RedisURL, parse_redis_url
from relayproxy.smtp.addresses import ascii_domain, comparable

DEFAULT_PATH = Path("/etc/relayproxy/relayproxy.toml")

DEFAULT_UPSTREAM = "default"

ListenerTLS = Literal["starttls", "implicit", "none"]
UpstreamTLS = Literal["implicit", "starttls", "none"]
UpstreamAuth = Literal["password", "xoauth2"]
UpstreamKind = Literal["smtp", "graph"]
OAuthGrant = Literal["refresh_token", "client_credentials", "service_account"]
Delivery = Literal["relay", "spool", "relay-then-spool"]
LogFormat = Literal["text", "json"]
TLSVersion = Literal["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
TLSKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey | dsa.DSAPrivateKey
"""The private keys that can serve TLS."""

_COUNT = "write a whole number of at least 1"
_BUDGET = "write a whole number of at least 1, or remove the key for no limit"
_CA_FILE = "write the path of a PEM file of CA certificates"


# -- values that need more than a type ----------------------------------------------------------

# Endpoint types that yield a plain stream for relayproxy to run SMTP (and its
# own TLS) over.  "haproxy" wraps one of the others, so its inner type is checked too.
_ENDPOINT_TYPES = ("tcp", "tcp6", "unix", "systemd")


def endpoint_fields(endpoint: str) -> list[str]:
    # Twisted escapes a colon inside a field with a backslash.
    return re.split(r"(?<!\\):", endpoint)


def _listener_endpoint(endpoint: str) -> str:
    fields = endpoint_fields(endpoint)
    kind = fields[0].lower()
    if kind == "haproxy" and len(fields) > 1:
        kind = fields[1].lower()
    if kind in ("ssl", "tls"):
        raise Invalid(
            f"relayproxy does its own TLS, so {kind}: endpoints are not used",
            'use a tcp endpoint with tls = "implicit" instead, such as "tcp:465"',
        )
    if kind not in _ENDPOINT_TYPES or len(fields) < 2 or not fields[1]:
        raise Invalid(f"not a server endpoint of a known type ({', '.join(_ENDPOINT_TYPES)}, haproxy)")
    return endpoint


def _metrics_endpoint(endpoint: str) -> str:
    # The metrics server speaks plain HTTP to a scraper: no TLS, no PROXY protocol in front.
    fields = endpoint_fields(endpoint)
    kind = fields[0].lower()
    if kind not in _ENDPOINT_TYPES or len(fields) < 2 or not fields[1]:
        raise Invalid(f"{json.dumps(endpoint)} is not a server endpoint of a known type ({', '.join(_ENDPOINT_TYPES)})")
    if kind in ("tcp", "tcp6"):
        # The port is the first field without "=", or "port=N" anywhere.
        ports = [f.removeprefix("port=") for f in fields[1:] if "=" not in f or f.startswith("port=")]
        if not ports or not (ports[0].isdigit() and int(ports[0]) <= 65535):
            raise Invalid(f"{json.dumps(endpoint)} names no port number from 0 to 65535")
    return endpoint


def _https_url(url: str) -> str:
    try:
        parts = urllib.parse.urlsplit(url)
        ok = parts.scheme == "https" and bool(parts.hostname) and url.isascii() and not parts.fragment
    except ValueError:
        ok = False
    if not ok:
        # Client secrets and tokens cross this connection: only verified TLS will do.
        raise Invalid(f"{json.dumps(url)} is not an https:// URL")
    return url


def _address(value: str) -> str:
    if not re.fullmatch(r"[^\s<>@]+@[^\s<>@]+", value):
        raise Invalid(f"{json.dumps(value)} is not an address", 'write one such as "alerts@example.org"')
    return value


def _header_from(value: str) -> str:
    # The value goes into the message header as it is: one line of printable ASCII (RFC 5322 2.2).
    if not (value.isascii() and value.isprintable() and "@" in value):
        raise Invalid(
            "must be one line of printable ASCII with an address",
            'write one such as "Alerts <alerts@example.org>" (encode other characters per RFC 2047)',
        )
    return value


def _sender(value: str) -> str:
    _, at, domain = value.rpartition("@")
    if not at or not domain:
        raise Invalid(f"{json.dumps(value)} is no address or @domain")
    if ascii_domain(domain) is None:
        # It could never match: senders are compared by their domains' A-labels.
        raise Invalid(f"{json.dumps(value)}: the domain is not a valid internationalised domain name (IDNA)")
    return value.lower()


def _network(value: str) -> Network:
    try:
        # strict: "192.0.2.10/24" has host bits set, a typo for /32 or for 192.0.2.0/24.
        return ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        raise Invalid(f"{json.dumps(value)} is not a network ({e})") from None


_NETWORKS = 'write CIDR networks such as ["192.168.10.0/24", "2001:db8::/48"] (one address: "192.0.2.10/32")'


def client_ip(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's address as allowed_networks and devices see it; None for a Unix socket's peer."""
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return None
    # A tcp6 listener sees IPv4 clients as ::ffff:a.b.c.d: they are matched as the IPv4 address.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def in_networks(peer: str, networks: tuple[Network, ...]) -> bool:
    """Is the client at ``peer`` in one of ``networks``?"""
    ip = client_ip(peer)
    return ip is not None and any(ip in network for network in networks)


def _store(value: str) -> Literal["memory"] | RedisURL:
    if value == "memory":
        return "memory"
    try:
        return parse_redis_url(value)
    except ValueError as e:
        # The URL may hold a password: the problem names only what is wrong with it.
        raise Invalid(f'not "memory" or a usable redis:// URL: {e}') from None


# -- the tables -----------------------------------------------------------------------------------


@section
class ServerConfig:
    hostname: str = setting(fix='write the name this relay announces, such as "relay.example.org"')
    max_message_size: int = setting(default=35 * 1024 * 1024, low=1, high=2**63 - 1, fix="write a size in bytes such as 36700160")
    max_recipients: int = setting(default=100, low=1, high=2**31 - 1, fix="write a number of recipients such as 100")
    shutdown_grace: float = setting(default=30.0)


@section
class TLSConfig:
    certificate: Path | None = setting(default=None, fix="write the path of a PEM certificate file")
    key: Path | None = setting(default=None, fix="write the path of a PEM private key file")
    # Read and checked once by load_config; the listeners serve with these, never reading the files again.
    chain: tuple[x509.Certificate, ...] = field(default=(), repr=False)
    private_key: TLSKey | None = field(default=None, repr=False, compare=False)


@section
class ListenerConfig:
    endpoint: str = setting(fix='write one such as "tcp:587:interface=0.0.0.0"', parse=_listener_endpoint)
    tls: ListenerTLS = setting(default="starttls")
    allow_plaintext_auth: bool = setting(default=False)
    tls_min_version: TLSVersion = setting(default="TLSv1.2")
    """The oldest TLS version this listener accepts; below TLSv1.2 needs allowed_networks on a public interface (rules.py)."""
    tls_ciphers: str | None = setting(
        default=None, fix='write an OpenSSL cipher string such as "ECDHE+AESGCM:ECDHE+AES:@SECLEVEL=0", or remove it for the default'
    )
    """The TLS 1.2-and-older suites offered; None: relayproxy's (tap.py), which depend on tls_min_version."""
    allowed_networks: tuple[Network, ...] = setting(default=(), parse=_network, fix=_NETWORKS)
    """Clients from elsewhere get 554 5.7.1 at the greeting; empty: any client."""
    allow_ip_login: bool = setting(default=False)
    """Clients from a user's devices networks are that user without AUTH on this listener."""


@section
class AuthConfig:
    users_file: Path = setting(fix="write the path of the users file")
    cache_seconds: float = setting(default=300.0, low=0)
    """How long a verified user name and password pair is accepted without bcrypt (0: never)."""


@dataclass(frozen=True)
class ClientCertificate:
    """An application's certificate credential (client_certificate_file and client_key_file), read
    and checked by load_config: the key signs each client assertion, never read from disk again."""

    path: Path
    sha256_thumbprint: str
    """Base64url SHA-256 of the DER certificate: the x5t#S256 of a client assertion."""
    sha1_thumbprint: str
    """Hex SHA-1 of it, as the app registration's "Certificates & secrets" page shows it."""
    not_after: datetime.datetime
    key: rsa.RSAPrivateKey = field(repr=False, compare=False)


@dataclass(frozen=True)
class ServiceAccount:
    """A Google service account's JSON key (service_account_file), read and checked by load_config."""

    path: Path
    client_email: str
    private_key_id: str
    token_uri: str
    client_id: str | None
    """The numeric ID that Google Admin's domain-wide delegation is granted to."""
    key: rsa.RSAPrivateKey = field(repr=False, compare=False)


@section
class OAuthConfig:
    """Where and how an upstream with auth = "xoauth2" gets its access tokens (keys of [upstream.NAME]).

    The refresh token is not held here: it rotates, so relayproxy.oauth reads it from
    ``refresh_token_file`` whenever it refreshes, and a reload sees an unchanged upstream.
    """

    # Not required for grant = "service_account", whose key file names both (rules.py).
    token_url: str = setting(
        required=False,
        parse=_https_url,
        fix="write the provider's token endpoint, such as \"https://login.microsoftonline.com/TENANT/oauth2/v2.0/token\"",
    )
    client_id: str = setting(required=False, fix="write the client ID of the application registered with the provider")
    grant: OAuthGrant = setting(default="refresh_token")
    client_secret: str | None = setting(default=None, repr=False, secret=("file", "credential"))
    # The application's certificate instead of its client secret (client credentials); rules.py
    # reads the pair into client_certificate.
    client_certificate_file: Path | None = setting(
        default=None, fix="write the path of the certificate registered with the application (PEM or DER)"
    )
    client_key_file: Path | None = setting(default=None, fix="write the path of the certificate's private key (PEM, unencrypted)")
    client_certificate: ClientCertificate | None = None
    # grant = "service_account": Google's JSON key, read into service_account by rules.py.
    service_account_file: Path | None = setting(
        default=None, fix="write the path of the service account's JSON key file, as the Google Cloud console downloads it"
    )
    service_account: ServiceAccount | None = None
    # Set exactly when grant is "refresh_token".
    refresh_token_file: Path | None = setting(default=None, fix="write the path of the file relayproxy keeps the refresh token in")
    scope: str | None = setting(default=None, fix='write the scopes separated by spaces, such as "https://mail.google.com/"')
    device_authorization_url: str | None = setting(
        default=None,
        parse=_https_url,
        fix="write the provider's device authorization endpoint, such as "
        '"https://login.microsoftonline.com/TENANT/oauth2/v2.0/devicecode"',
    )
    token_ca_file: Path | None = setting(default=None, readable=True, fix=_CA_FILE)
    """PEM CA certificates for the token endpoints; None: the system's trust store."""


@section
class UpstreamConfig:
    name: str
    # Not required when hosts lists them; port's default depends on tls (rules.py).
    host: str = setting(required=False, fix='write the provider\'s SMTP server, such as "smtp.gmail.com"')
    port: int = setting(required=False, low=1, high=65535, fix="write a port number such as 465")
    tls: UpstreamTLS = setting(default="starttls")
    ca_file: Path | None = setting(default=None, readable=True, fix=_CA_FILE)
    username: str | None = setting(default=None, fix='write the login name, such as "relay@example.com"')
    password: str | None = setting(default=None, repr=False, secret=("file", "env", "credential"))
    helo_name: str | None = setting(default=None, fix='write a host name such as "relay.example.org"')
    connect_timeout: float = setting(default=30.0)
    reply_timeout: float = setting(default=300.0)
    data_timeout: float = setting(default=600.0)
    auth: UpstreamAuth = setting(default="password")
    # Set exactly when auth is "xoauth2"; username is then the mailbox and password None.
    oauth: OAuthConfig | None = None
    fallbacks: tuple[tuple[str, int], ...] = ()
    """Further hosts after ``host``/``port`` (from ``hosts = [...]``), tried in order."""
    envelope_from: str | None = setting(default=None, parse=_address, fix='write the account\'s address, such as "alerts@example.org"')
    header_from: str | None = setting(default=None, parse=_header_from, fix='write a From such as "Alerts <alerts@example.org>"')
    pool_size: int = setting(default=32, low=0, high=1000, fix="write a number of sessions such as 32 (0 keeps none)")
    """Authenticated sessions kept open for the next transaction of any client of this upstream."""
    pool_idle_timeout: float = setting(default=30.0)
    max_messages_per_session: int | None = setting(
        default=None, low=1, high=10**9, fix="write a number of messages such as 10, or remove the key for no limit"
    )
    """Messages one session carries before the proxy ends it with QUIT and opens a new one; None: no limit."""
    max_sessions: int | None = setting(
        default=None, low=1, high=10**6, fix="write a number of sessions such as 3, or remove the key for no limit"
    )
    """Sessions open to the provider at once (SMTP: connections, kept ones included; Graph: requests); None: no limit."""
    max_messages_per_minute: int | None = setting(
        default=None, low=1, high=10**9, fix="write a number of messages such as 30, or remove the key for no limit"
    )
    """Transactions begun in any 60 seconds, at most; None: no limit."""
    pacing_timeout: float = setting(default=30.0)
    """How long a client waits for a session or a message slot before 451 4.7.0 (spool deliveries wait on)."""
    kind: UpstreamKind = setting(default="smtp")
    """How mail goes on: an SMTP smarthost, or Microsoft Graph's sendMail for the mailbox ``username``."""
    graph_url: str = setting(
        default="https://graph.microsoft.com/v1.0", parse=_https_url,
        fix='write Microsoft Graph\'s base URL, such as "https://graph.microsoft.com/v1.0"',
    )
    save_to_sent: bool = setting(default=True)
    """kind = "graph": keep a copy in the mailbox's Sent Items, as Graph's MIME sendMail always does
    (and Exchange does for SMTP AUTH); false sends through a draft marked PidTagDeleteAfterSubmit."""


HOSTS = Setting("hosts", tuple[str, ...], default=(), fix='write a list such as ["smtp1.example.org:465", "smtp2.example.org:465"]')
"""[upstream.NAME] hosts: HOST or HOST:PORT entries, instead of host and port; rules.py turns them
into host, port and fallbacks."""


@section
class UserConfig:
    name: str
    upstream: str = setting(default=DEFAULT_UPSTREAM, fix="write the name of an [upstream.NAME] section")
    allowed_senders: tuple[str, ...] = setting(
        default=(), parse=_sender, fix='write addresses such as "alice@example.com" or whole domains such as "@example.com"'
    )
    max_messages_per_hour: int | None = setting(default=None, low=1, high=10**9, fix=_BUDGET)
    """Messages the upstream accepted for this user in the last hour, at most; None: unlimited."""
    max_recipients_per_day: int | None = setting(default=None, low=1, high=10**9, fix=_BUDGET)
    """Accepted recipients of those messages in the last 24 hours, at most; None: unlimited."""
    check_header_from: bool = setting(default=True)
    """With allowed_senders: the header From and Sender must be allowed addresses too."""
    allowed_networks: tuple[Network, ...] = setting(default=(), parse=_network, fix=_NETWORKS)
    """AUTH as this user from elsewhere fails like a wrong password; empty: from anywhere."""
    devices: tuple[Network, ...] = setting(default=(), parse=_network, fix=_NETWORKS)
    """Clients from these networks are this user without AUTH, on listeners with allow_ip_login."""
    delivery: Delivery = setting(default="relay")
    """relay: the upstream's verdict is the client's; spool: into [spool] directory, delivered from
    there; relay-then-spool: relayed, and spooled when the upstream cannot take it now (4xx, down)."""

    def may_send(self, address: str) -> bool:
        """May this user use ``address`` as a sender (MAIL FROM, and the header From and Sender)?"""
        if not self.allowed_senders:
            return True
        # Domains as A-labels on both sides: "@bücher.example" covers a@xn--bcher-kva.example, and
        # the other way round; a domain without an A-label form is no allowed sender's.
        normal = comparable(address)
        if normal is None:
            return False
        # rpartition: a quoted local part may itself contain "@".
        local, at, domain = normal.rpartition("@")
        # A quoted local part, a percent hack or a bang path names another mailbox to a server that
        # still honours them ("ceo@example.org"@d, ceo%example.org@d, ceo!example.org@d): a domain
        # entry does not cover them, only an exact one.
        routed = local.startswith('"') or "%" in local or "!" in local
        for entry in self.allowed_senders:
            allowed = comparable(entry)
            if allowed is None:
                # An entry whose domain has no A-label form matches nothing (a file cannot hold one: _sender).
                continue
            if allowed.startswith("@"):
                if at and allowed == "@" + domain and not routed:
                    return True
            elif allowed == normal:
                return True
        # The null sender (bounces) cannot be attributed to anyone, so only an
        # unrestricted user may use it; it never matches an entry above.
        return False


@section
class LimitsConfig:
    command_timeout: float = setting(default=300.0)
    data_timeout: float = setting(default=180.0)
    session_timeout: float = setting(default=3600.0)
    greeting_delay: float = setting(default=0.0, low=0)
    max_connections: int = setting(default=1000, low=1, high=10**9, fix=_COUNT)
    max_connections_per_ip: int = setting(default=50, low=1, high=10**9, fix=_COUNT)
    max_auth_failures_per_session: int = setting(default=3, low=1, high=10**9, fix=_COUNT)
    auth_failures_per_ip: int = setting(default=10, low=1, high=10**9, fix=_COUNT)
    auth_failures_per_user: int = setting(default=10, low=1, high=10**9, fix=_COUNT)
    auth_failure_window: float = setting(default=600.0)
    auth_backoff: float = setting(default=60.0)
    auth_backoff_max: float = setting(default=3600.0)
    max_invalid_commands: int = setting(default=20, low=1, high=10**9, fix=_COUNT)
    max_header_size: int = setting(default=262144, low=1, high=10**9, fix=_COUNT)
    unauthenticated_timeout: float = setting(default=60.0)
    """Longest a session may last before it authenticates."""
    max_unauthenticated: int = setting(default=200, low=1, high=10**9, fix=_COUNT)
    """Concurrent sessions that have not authenticated (the rest of max_connections is theirs who have);
    absent from the file: 200, or half of max_connections if that is less (rules.py)."""
    min_data_rate: int = setting(default=1024, low=0, high=10**9, fix="write octets per second as a whole number (0: no minimum)")
    """Octets per second a body must average once data_rate_grace has passed (0: no such limit)."""
    data_rate_grace: float = setting(default=30.0)
    ipv6_prefix: int = setting(default=64, low=1, high=128, fix="write a prefix length from 1 to 128 (64: one customer network)")
    """IPv6 clients are counted per network of this prefix length (per-address limits, AUTH throttle)."""
    store: Literal["memory"] | RedisURL = setting(
        default="memory", parse=_store, fix='write "memory" or a URL such as "redis://127.0.0.1:6379/0"'
    )
    """Where AUTH failures and sending budgets are counted: in this process, or in one Redis database."""


@section
class LogConfig:
    format: LogFormat = setting(default="text")


@section
class MetricsConfig:
    endpoint: str | None = setting(
        default=None,
        parse=_metrics_endpoint,
        fix='write one such as "tcp:9187:interface=127.0.0.1", or remove it to serve no metrics',
    )
    """Twisted server endpoint string for the Prometheus HTTP server; None: no metrics server."""


@section
class SpoolConfig:
    directory: Path | None = setting(default=None, fix="write the path of a directory that only the relayproxy user may write")
    """None: $STATE_DIRECTORY/spool under systemd's StateDirectory, else /var/lib/relayproxy/spool (rules.py)."""
    max_age: float = setting(default=5 * 86400.0)
    """How long a message is retried before its sender gets a delivery status notification."""
    retry_initial: float = setting(default=60.0)
    retry_max: float = setting(default=3600.0)
    max_deliveries: int = setting(default=10, low=1, high=10**6, fix="write a number of deliveries such as 10")
    """Spool deliveries in progress at once, over all upstreams (each upstream's max_sessions still applies)."""
    scan_interval: float = setting(default=5.0)
    """How often the spool directory is read again: how soon a `relayproxy queue retry` takes effect."""


@section
class Config:
    path: Path
    server: ServerConfig
    tls: TLSConfig
    listeners: tuple[ListenerConfig, ...]
    auth: AuthConfig
    upstreams: dict[str, UpstreamConfig]
    users: dict[str, UserConfig]
    limits: LimitsConfig = LimitsConfig()
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    spool: SpoolConfig = SpoolConfig()

    @property
    def spooling(self) -> bool:
        """Does any user's mail go through the spool?"""
        return any(user.delivery != "relay" for user in self.users.values())

    def user(self, name: str) -> UserConfig:
        """The configuration of user ``name``; users without a section use the defaults."""
        return self.users.get(name, UserConfig(name))


TABLES: dict[str, tuple[Schema, ...]] = {
    "server": (ServerConfig,),
    "tls": (TLSConfig,),
    "listener": (ListenerConfig,),
    "auth": (AuthConfig,),
    "upstream.NAME": (UpstreamConfig, HOSTS, OAuthConfig),
    "users.NAME": (UserConfig,),
    "limits": (LimitsConfig,),
    "log": (LogConfig,),
    "metrics": (MetricsConfig,),
    "spool": (SpoolConfig,),
}
"""Every table and the declarations of its keys; NAME stands for any name."""
