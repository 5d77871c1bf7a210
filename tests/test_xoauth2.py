"""SASL XOAUTH2 upstreams end to end: a local token endpoint (twisted.web, TLS) and aiosmtpd checking the token."""

from __future__ import annotations

import smtplib
from pathlib import Path

from conftest import ProxyFactory, SmarthostFactory
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from graph_standin import make_client_certificate
from harness import CLIENT_PASSWORD, CLIENT_USER, PKI, UPSTREAM_USER, Proxy, Smarthost
from test_oauth import (  # noqa: F401  (fixture)
    REFRESH_TOKEN, Provider, decode_jwt, make_service_account, provider, token_answer,
)

CLIENT_SECRET = "client-secret-for-xoauth2"


def xoauth2_upstream(smarthost: Smarthost, pki: PKI, provider: Provider, directory: Path) -> str:
    (directory / "client-secret").write_text(CLIENT_SECRET + "\n")
    (directory / "refresh-token").write_text(REFRESH_TOKEN + "\n")
    return f"""
[upstream.default]
host = "localhost"
port = {smarthost.port}
tls = "starttls"
ca_file = "{pki.ca_path}"
auth = "xoauth2"
username = "{UPSTREAM_USER}"
token_url = "{provider.url('/token')}"
token_ca_file = "{pki.ca_path}"
client_id = "relay-client"
client_secret_file = "{directory / 'client-secret'}"
refresh_token_file = "{directory / 'refresh-token'}"
scope = "https://outlook.office365.com/.default"
"""


def send(proxy: Proxy, pki: PKI) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", proxy.port, timeout=20) as smtp:
        smtp.starttls(context=pki.client_context())
        smtp.login(CLIENT_USER, CLIENT_PASSWORD)
        code, text = smtp.mail("app1@example.org")
        if code != 250:
            return code, text
        smtp.rcpt("bob@example.net")
        return smtp.data(b"Subject: via xoauth2\r\n\r\nhi\r\n")


def test_token_from_the_endpoint_is_used_and_cached(
    make_proxy: ProxyFactory, make_smarthost: SmarthostFactory, pki: PKI, provider: Provider, tmp_path: Path
) -> None:
    smarthost = make_smarthost(bearer_tokens={"access-1"})
    provider.answers["/token"] = [token_answer("access-1")]
    proxy = make_proxy(xoauth2_upstream(smarthost, pki, provider, tmp_path))
    assert send(proxy, pki) == (250, b"2.0.0 Ok: queued as TEST1")
    assert send(proxy, pki) == (250, b"2.0.0 Ok: queued as TEST1")
    assert len(smarthost.received) == 2
    # The second client's transaction reuses the first's authenticated upstream session.
    assert smarthost.auth_attempts == ["XOAUTH2"]
    [form] = provider.forms()
    assert form == {
        "grant_type": "refresh_token", "refresh_token": REFRESH_TOKEN, "client_id": "relay-client",
        "client_secret": CLIENT_SECRET, "scope": "https://outlook.office365.com/.default",
    }


def test_refused_token_is_refreshed_once(
    make_proxy: ProxyFactory, make_smarthost: SmarthostFactory, pki: PKI, provider: Provider, tmp_path: Path
) -> None:
    smarthost = make_smarthost(bearer_tokens={"access-2"})
    provider.answers["/token"] = [token_answer("revoked-1"), token_answer("access-2")]
    proxy = make_proxy(xoauth2_upstream(smarthost, pki, provider, tmp_path))
    assert send(proxy, pki) == (250, b"2.0.0 Ok: queued as TEST1")
    assert len(provider.forms()) == 2


def test_failed_refresh_gives_454_and_one_clear_log_line(
    make_proxy: ProxyFactory, make_smarthost: SmarthostFactory, pki: PKI, provider: Provider, tmp_path: Path,
    log_lines: list[str],
) -> None:
    smarthost = make_smarthost(bearer_tokens={"access-1"})
    provider.answers["/token"] = [(400, {"error": "invalid_grant", "error_description": "AADSTS70000 token revoked"})]
    proxy = make_proxy(xoauth2_upstream(smarthost, pki, provider, tmp_path))
    assert send(proxy, pki) == (454, b"4.7.0 Upstream default sign-in token unavailable, try again later")
    assert smarthost.received == [] and smarthost.auth_attempts == []
    failures = [line for line in log_lines if "upstream failure" in line]
    assert len(failures) == 1
    assert "default" in failures[0] and "invalid_grant" in failures[0] and "AADSTS70000" in failures[0]
    for line in log_lines:
        assert CLIENT_SECRET not in line and REFRESH_TOKEN not in line


def app_upstream(smarthost: Smarthost, pki: PKI, provider: Provider, credential: str) -> str:
    """An upstream that signs in as the application (client credentials) with ``credential``."""
    return f"""
[upstream.default]
host = "localhost"
port = {smarthost.port}
tls = "starttls"
ca_file = "{pki.ca_path}"
auth = "xoauth2"
username = "{UPSTREAM_USER}"
token_url = "{provider.url('/token')}"
token_ca_file = "{pki.ca_path}"
client_id = "relay-client"
grant = "client_credentials"
scope = "https://outlook.office365.com/.default"
{credential}
"""


def test_client_credentials_with_a_certificate(
    make_proxy: ProxyFactory, make_smarthost: SmarthostFactory, pki: PKI, provider: Provider, tmp_path: Path, log_lines: list[str]
) -> None:
    certificate = make_client_certificate(tmp_path, "m365-app")
    smarthost = make_smarthost(bearer_tokens={"app-token"})
    provider.answers["/token"] = [token_answer("app-token")]
    files = f'client_certificate_file = "{certificate.certificate_file}"\nclient_key_file = "{certificate.key_file}"'
    proxy = make_proxy(app_upstream(smarthost, pki, provider, files))
    assert send(proxy, pki) == (250, b"2.0.0 Ok: queued as TEST1")
    assert len(smarthost.received) == 1
    [form] = provider.forms()
    assert "client_secret" not in form and form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    header, claims, signed, signature = decode_jwt(form["client_assertion"])
    assert header["x5t#S256"] == certificate.x5t_s256 and claims["aud"] == provider.url("/token")
    public_key = certificate.certificate.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    public_key.verify(signature, signed, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256())
    for line in log_lines:
        assert form["client_assertion"] not in line and "app-token" not in line


def workspace_app_upstream(smarthost: Smarthost, pki: PKI, key_file: Path) -> str:
    """Google Workspace app-only: the service account acts as the mailbox; no token_url, no client secret."""
    return f"""
[upstream.default]
host = "localhost"
port = {smarthost.port}
tls = "starttls"
ca_file = "{pki.ca_path}"
auth = "xoauth2"
username = "{UPSTREAM_USER}"
grant = "service_account"
service_account_file = "{key_file}"
token_ca_file = "{pki.ca_path}"
"""


def test_service_account_signs_in_as_the_mailbox(
    make_proxy: ProxyFactory, make_smarthost: SmarthostFactory, pki: PKI, provider: Provider, tmp_path: Path, log_lines: list[str]
) -> None:
    account = make_service_account(tmp_path, provider.url("/token"))
    provider.register(account)
    smarthost = make_smarthost(bearer_tokens={"ya29.delegated"})
    provider.answers["/token"] = [token_answer("ya29.delegated", expires_in=3599)]
    proxy = make_proxy(workspace_app_upstream(smarthost, pki, account.path))
    assert send(proxy, pki) == (250, b"2.0.0 Ok: queued as TEST1")
    assert send(proxy, pki) == (250, b"2.0.0 Ok: queued as TEST1")
    # One grant for both messages, verified with the account's public key; the smarthost took
    # the token for the mailbox (its XOAUTH2 checks user= and the token).
    [verified] = provider.assertions
    assert verified["claims"]["sub"] == UPSTREAM_USER and verified["claims"]["scope"] == "https://mail.google.com/"
    assert smarthost.auth_attempts == ["XOAUTH2"] and len(smarthost.received) == 2
    [form] = provider.forms()
    for line in log_lines:
        assert form["assertion"] not in line and "ya29.delegated" not in line and "PRIVATE KEY" not in line


def test_service_account_without_delegation_gives_454_with_the_fix(
    make_proxy: ProxyFactory, make_smarthost: SmarthostFactory, pki: PKI, provider: Provider, tmp_path: Path, log_lines: list[str]
) -> None:
    account = make_service_account(tmp_path, provider.url("/token"))
    provider.register(account, scopes=set())
    smarthost = make_smarthost(bearer_tokens={"never"})
    provider.answers["/token"] = [token_answer("never")]
    proxy = make_proxy(workspace_app_upstream(smarthost, pki, account.path))
    assert send(proxy, pki) == (454, b"4.7.0 Upstream default sign-in token unavailable, try again later")
    assert smarthost.auth_attempts == []
    [failure] = [line for line in log_lines if "upstream failure" in line]
    assert "unauthorized_client" in failure and f"add client ID {account.client_id} with the scope https://mail.google.com/" in failure
