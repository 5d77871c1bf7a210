"""load_config: app-only credentials without a secret, a certificate (Microsoft) or a service account key
(Google), read and checked once at load; every problem names the key and the fix, never key material."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from graph_standin import ClientCertificate as StandinCertificate
from graph_standin import make_client_certificate
from test_config_secrets import BASE, M365, config_dir, load, problems  # noqa: F401  (fixture)
from test_oauth import ServiceAccountKey, make_service_account

from relayproxy.config import Config

CERTIFICATE = 'client_certificate_file = "graph-app.crt"\nclient_key_file = "graph-app.key"\n'
SMTP_APP = M365.replace('client_secret_credential = "m365-secret"\n', "")
GRAPH_APP = """\
[upstream.default]
kind = "graph"
username = "alerts@example.org"
token_url = "https://login.microsoftonline.com/TENANT/oauth2/v2.0/token"
client_id = "client-1"
"""
WORKSPACE_APP = """\
[upstream.default]
host = "smtp.gmail.com"
tls = "implicit"
auth = "xoauth2"
username = "alerts@example.org"
grant = "service_account"
service_account_file = "relay-sender.json"
"""


@pytest.fixture
def certificate(config_dir: Path) -> StandinCertificate:  # noqa: F811
    return make_client_certificate(config_dir)


@pytest.fixture
def account(config_dir: Path) -> ServiceAccountKey:  # noqa: F811
    return make_service_account(config_dir, "https://oauth2.googleapis.com/token")


def app_certificate_of(config: Config) -> object:
    oauth = config.upstreams["default"].oauth
    assert oauth is not None
    return oauth.client_certificate


def test_certificate_for_client_credentials(config_dir: Path, certificate: StandinCertificate) -> None:  # noqa: F811
    oauth = load(config_dir, SMTP_APP + CERTIFICATE).upstreams["default"].oauth
    assert oauth is not None and oauth.client_secret is None
    loaded = oauth.client_certificate
    assert loaded is not None
    assert loaded.path == certificate.certificate_file
    assert loaded.sha256_thumbprint == certificate.x5t_s256
    assert loaded.sha1_thumbprint == certificate.certificate.fingerprint(hashes.SHA1()).hex().upper()
    assert loaded.not_after == certificate.certificate.not_valid_after_utc
    assert loaded.key.private_numbers() == certificate.private_key.private_numbers()
    assert "PRIVATE" not in repr(oauth) and "private_numbers" not in repr(oauth) and "key=" not in repr(loaded)


def test_certificate_for_graph(config_dir: Path, certificate: StandinCertificate) -> None:  # noqa: F811
    upstream = load(config_dir, GRAPH_APP + CERTIFICATE).upstreams["default"]
    assert upstream.oauth is not None and upstream.oauth.client_certificate is not None
    assert upstream.oauth.grant == "client_credentials" and upstream.oauth.client_secret is None


def test_a_der_certificate_and_a_combined_pem_file(config_dir: Path, certificate: StandinCertificate) -> None:  # noqa: F811
    (config_dir / "app.cer").write_bytes(certificate.certificate.public_bytes(serialization.Encoding.DER))
    assert app_certificate_of(load(config_dir, GRAPH_APP + CERTIFICATE.replace("graph-app.crt", "app.cer"))) is not None
    # One PEM file holding both, as some tools write them.
    (config_dir / "both.pem").write_bytes(certificate.key_file.read_bytes() + certificate.certificate_file.read_bytes())
    both = 'client_certificate_file = "both.pem"\nclient_key_file = "both.pem"\n'
    assert app_certificate_of(load(config_dir, GRAPH_APP + both)) is not None


@pytest.mark.parametrize("table", [SMTP_APP, GRAPH_APP], ids=["smtp", "graph"])
def test_secret_and_certificate_together(config_dir: Path, certificate: StandinCertificate, table: str) -> None:  # noqa: F811
    [line] = problems(config_dir, table + 'client_secret_file = "client-secret"\n' + CERTIFICATE)
    assert ": upstream.default.client_certificate_file: set together with client_secret_file: the application signs in with one" in line
    assert "; remove client_secret_file to sign in with the certificate, or client_certificate_file and client_key_file" in line


@pytest.mark.parametrize(
    ("table", "where"), [(SMTP_APP, 'grant = "client_credentials"'), (GRAPH_APP, 'kind = "graph"')], ids=["smtp", "graph"]
)
def test_neither_secret_nor_certificate(config_dir: Path, table: str, where: str) -> None:  # noqa: F811
    [line] = problems(config_dir, table)
    assert f": upstream.default.client_secret_file: missing: {where} signs in as the application, with its client secret or a certificate" in line
    assert "set client_secret_file or client_secret_credential, or client_certificate_file and client_key_file" in line


def test_certificate_without_key_and_key_without_certificate(config_dir: Path, certificate: StandinCertificate) -> None:  # noqa: F811
    [line] = problems(config_dir, GRAPH_APP + 'client_certificate_file = "graph-app.crt"\n')
    assert ": upstream.default.client_key_file: missing, but client_certificate_file is set; write the path of the certificate's private key" in line
    [line] = problems(config_dir, GRAPH_APP + 'client_key_file = "graph-app.key"\n')
    assert ": upstream.default.client_certificate_file: missing, but client_key_file is set; write the path of the certificate" in line


def test_key_of_another_certificate(config_dir: Path, certificate: StandinCertificate) -> None:  # noqa: F811
    other = make_client_certificate(config_dir, "other")
    [line] = problems(config_dir, GRAPH_APP + CERTIFICATE.replace("graph-app.key", "other.key"))
    assert f": upstream.default.client_key_file: {other.key_file} does not match the certificate in {certificate.certificate_file}" in line
    assert "; point client_key_file at the private key the certificate was made with" in line
    assert "PRIVATE KEY" not in line


def test_unusable_certificate_and_key_files(config_dir: Path, certificate: StandinCertificate) -> None:  # noqa: F811
    (config_dir / "junk.crt").write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    [line] = problems(config_dir, GRAPH_APP + CERTIFICATE.replace("graph-app.crt", "junk.crt"))
    assert ": upstream.default.client_certificate_file: " in line and "junk.crt holds no certificate; point it at the certificate (PEM or DER)" in line
    [line] = problems(config_dir, GRAPH_APP + CERTIFICATE.replace("graph-app.key", "graph-app.crt"))
    assert ": upstream.default.client_key_file: " in line and "graph-app.crt holds no PEM private key; point it at the certificate's private key" in line
    [line] = problems(config_dir, GRAPH_APP + CERTIFICATE.replace("graph-app.key", "missing.key"))
    assert ": upstream.default.client_key_file: cannot read " in line and "missing.key: No such file or directory" in line


def test_encrypted_key(config_dir: Path, certificate: StandinCertificate) -> None:  # noqa: F811
    encrypted = certificate.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"passphrase")
    )
    (config_dir / "encrypted.key").write_bytes(encrypted)
    [line] = problems(config_dir, GRAPH_APP + CERTIFICATE.replace("graph-app.key", "encrypted.key"))
    assert "encrypted.key holds an encrypted private key; write it without a passphrase: openssl pkey" in line


def test_ec_key_is_refused(config_dir: Path) -> None:  # noqa: F811
    key = ec.generate_private_key(ec.SECP256R1())
    (config_dir / "ec.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    make_client_certificate(config_dir)
    [line] = problems(config_dir, GRAPH_APP + CERTIFICATE.replace("graph-app.key", "ec.key"))
    assert "and the application's certificate must be RSA; make an RSA certificate of 2048 bits or more" in line


def test_expired_certificate_loads(config_dir: Path) -> None:  # noqa: F811
    # Refused at sign-in, where the log says it expired; at load it would stop every other upstream too.
    ended = datetime.datetime(2024, 3, 1, tzinfo=datetime.UTC)
    make_client_certificate(config_dir, not_before=ended - datetime.timedelta(days=30), not_after=ended)
    assert app_certificate_of(load(config_dir, GRAPH_APP + CERTIFICATE)) is not None


def test_certificate_with_a_refresh_token(config_dir: Path, certificate: StandinCertificate) -> None:  # noqa: F811
    workspace = M365.replace('grant = "client_credentials"\n', 'refresh_token_file = "state/refresh-token"\n')
    lines = problems(config_dir, workspace + CERTIFICATE)
    assert len(lines) == 2
    assert ': upstream.default.client_certificate_file: only used with grant = "client_credentials"' in lines[0]
    assert ': upstream.default.client_key_file: only used with grant = "client_credentials"' in lines[1]


def test_certificate_with_password_auth(config_dir: Path, certificate: StandinCertificate) -> None:  # noqa: F811
    table = '[upstream.default]\nhost = "smtp.example.com"\nusername = "u"\npassword_file = "client-secret"\n'
    lines = problems(config_dir, table + CERTIFICATE)
    assert ': upstream.default.client_certificate_file: only used with auth = "xoauth2"' in lines[0]


# -- Google service accounts --------------------------------------------------------------------


def test_service_account(config_dir: Path, account: ServiceAccountKey) -> None:  # noqa: F811
    upstream = load(config_dir, WORKSPACE_APP).upstreams["default"]
    oauth = upstream.oauth
    assert oauth is not None and oauth.grant == "service_account"
    loaded = oauth.service_account
    assert loaded is not None
    assert (loaded.client_email, loaded.private_key_id, loaded.client_id) == (account.client_email, account.private_key_id, account.client_id)
    assert loaded.token_uri == oauth.token_url == "https://oauth2.googleapis.com/token"
    assert oauth.scope == "https://mail.google.com/"
    assert loaded.key.private_numbers() == account.private_key.private_numbers()
    assert account.private_key_pem not in repr(upstream) and "key=" not in repr(loaded)


def test_service_account_token_uri_defaults_and_scope_may_be_set(config_dir: Path) -> None:  # noqa: F811
    make_service_account(config_dir, None)
    oauth = load(config_dir, WORKSPACE_APP + 'scope = "https://mail.google.com/ openid"\n').upstreams["default"].oauth
    assert oauth is not None and oauth.token_url == "https://oauth2.googleapis.com/token"
    assert oauth.scope == "https://mail.google.com/ openid"


def test_service_account_needs_its_key_file(config_dir: Path) -> None:  # noqa: F811
    [line] = problems(config_dir, WORKSPACE_APP.replace('service_account_file = "relay-sender.json"\n', ""))
    assert ': upstream.default.service_account_file: missing: grant = "service_account" signs in with the key of a service account' in line
    assert "set it to the JSON key file of a service account with domain-wide delegation" in line


def test_keys_a_service_account_does_not_use(config_dir: Path, account: ServiceAccountKey) -> None:  # noqa: F811
    extra = (
        'token_url = "https://oauth2.googleapis.com/token"\nclient_id = "1"\nclient_secret_file = "client-secret"\n'
        'refresh_token_file = "state/refresh-token"\n'
    )
    lines = problems(config_dir, WORKSPACE_APP + extra)
    keys = [line.split(": ")[1] for line in lines]
    assert keys == [f"upstream.default.{k}" for k in ("token_url", "client_id", "client_secret_file", "refresh_token_file")]
    assert all('not used with grant = "service_account"; remove it: the service account\'s key file names' in line for line in lines)


def test_service_account_file_without_the_grant(config_dir: Path, account: ServiceAccountKey) -> None:  # noqa: F811
    [line] = problems(config_dir, M365 + 'service_account_file = "relay-sender.json"\n')
    assert ': upstream.default.service_account_file: only used with grant = "service_account"' in line


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"type": "service_account",', "is not JSON (Expecting property name enclosed in double quotes at line 1 column 28)"),
        ("[1, 2]", "holds no JSON object"),
        ('{"type": "authorized_user", "refresh_token": "r"}', 'is a key of type "authorized_user", not "service_account"'),
        ('{"installed": {"client_id": "x", "client_secret": "y"}}', "is an OAuth client's secret file, not a service account's key"),
        ('{"private_key": "x"}', 'has no "type": "service_account"'),
    ],
    ids=["json", "object", "user", "oauth-client", "type"],
)
def test_unusable_key_files(config_dir: Path, content: str, expected: str) -> None:  # noqa: F811
    (config_dir / "relay-sender.json").write_text(content)
    [line] = problems(config_dir, WORKSPACE_APP)
    assert f": upstream.default.service_account_file: {config_dir / 'relay-sender.json'} {expected}; point it at the service account's JSON key" in line
    assert "client_secret\": \"y" not in line and "refresh_token" not in line


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"client_email": None, "private_key_id": ""}, "has no client_email, private_key_id (a non-empty string each)"),
        ({"private_key": 7}, "has no private_key (a non-empty string each)"),
        ({"private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"}, ": private_key is no usable unencrypted PEM private key"),
        ({"token_uri": "http://oauth2.googleapis.com/token"}, ": token_uri is not an https:// URL"),
    ],
    ids=["fields", "key-type", "key", "token-uri"],
)
def test_unusable_key_file_fields(config_dir: Path, overrides: dict[str, object], expected: str) -> None:  # noqa: F811
    overrides = dict(overrides)
    token_uri = str(overrides.pop("token_uri", "https://oauth2.googleapis.com/token"))
    made = make_service_account(config_dir, token_uri, **overrides)
    [line] = problems(config_dir, WORKSPACE_APP)
    assert f"{config_dir / 'relay-sender.json'}{'' if expected.startswith(':') else ' '}{expected}" in line
    assert made.private_key_pem not in line and "BEGIN" not in line


def test_a_service_account_key_that_is_not_rsa(config_dir: Path) -> None:  # noqa: F811
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    make_service_account(config_dir, "https://oauth2.googleapis.com/token", private_key=pem)
    [line] = problems(config_dir, WORKSPACE_APP)
    assert ": private_key is a " in line and ", not an RSA key" in line and "BEGIN" not in line


def test_unreadable_key_file(config_dir: Path) -> None:  # noqa: F811
    [line] = problems(config_dir, WORKSPACE_APP)
    assert ": upstream.default.service_account_file: cannot read " in line and "relay-sender.json: No such file or directory" in line


def test_key_file_read_once_into_the_config(config_dir: Path, account: ServiceAccountKey) -> None:  # noqa: F811
    first = load(config_dir, WORKSPACE_APP)
    # An unchanged key file gives an equal upstream (a reload keeps its token); a new key does not.
    assert load(config_dir, WORKSPACE_APP).upstreams == first.upstreams
    info = json.loads(account.path.read_text())
    make_service_account(config_dir, info["token_uri"])
    assert load(config_dir, WORKSPACE_APP).upstreams != first.upstreams
