"""load_config: upstream secrets (files, environment, systemd credentials) and auth = "xoauth2"."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from relayproxy.config import Config, OAuthConfig, load_config
from relayproxy.usersfile import hash_password, write_users_file
from relayproxy.errors import ConfigError

BASE = """\
[server]
hostname = "relay.test"

[[listener]]
endpoint = "tcp:2525:interface=127.0.0.1"
tls = "none"

[auth]
users_file = "users"

"""

PASSWORD_UPSTREAM = """\
[upstream.default]
host = "smtp.example.com"
username = "relay@example.com"
"""

M365 = """\
[upstream.default]
host = "smtp.office365.com"
auth = "xoauth2"
username = "alerts@example.org"
token_url = "https://login.microsoftonline.com/TENANT/oauth2/v2.0/token"
client_id = "client-1"
grant = "client_credentials"
client_secret_credential = "m365-secret"
scope = "https://outlook.office365.com/.default"
"""

WORKSPACE = """\
[upstream.default]
host = "smtp.gmail.com"
tls = "implicit"
auth = "xoauth2"
username = "alerts@example.org"
token_url = "https://oauth2.googleapis.com/token"
client_id = "client-1"
client_secret_file = "client-secret"
refresh_token_file = "state/refresh-token"
scope = "https://mail.google.com/"
"""


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    write_users_file(tmp_path / "users", {"alice": hash_password("pw", rounds=4)})
    (tmp_path / "client-secret").write_text("the-client-secret\n")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "refresh-token").write_text("the-refresh-token\n")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "upstream-password").write_text("credential-password\n")
    (credentials / "m365-secret").write_text("credential-client-secret\n")
    return tmp_path


def environ(config_dir: Path) -> dict[str, str]:
    return {"CREDENTIALS_DIRECTORY": str(config_dir / "credentials")}


def load(config_dir: Path, upstream: str, env: dict[str, str] | None = None, **kwargs: bool) -> Config:
    path = config_dir / "relayproxy.toml"
    path.write_text(BASE + upstream)
    return load_config(path, environ(config_dir) if env is None else env, **kwargs)


def problems(config_dir: Path, upstream: str, env: dict[str, str] | None = None, **kwargs: bool) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(config_dir, upstream, env, **kwargs)
    file = str(config_dir / "relayproxy.toml")
    for line in info.value.problems:
        assert line.startswith(file + ": "), line
        assert "\n" not in line and "; " in line
    return info.value.problems


# -- secrets ------------------------------------------------------------------------------------


def test_password_from_systemd_credential(config_dir: Path) -> None:
    config = load(config_dir, PASSWORD_UPSTREAM + 'password_credential = "upstream-password"\n')
    upstream = config.upstreams["default"]
    assert upstream.auth == "password" and upstream.oauth is None
    assert upstream.password == "credential-password"
    assert "credential-password" not in repr(config)


def test_credential_without_credentials_directory(config_dir: Path) -> None:
    [line] = problems(config_dir, PASSWORD_UPSTREAM + 'password_credential = "upstream-password"\n', env={})
    assert ": upstream.default.password_credential: CREDENTIALS_DIRECTORY is not set" in line
    assert "LoadCredential=upstream-password:" in line and "or use password_file" in line


def test_missing_credential(config_dir: Path) -> None:
    [line] = problems(config_dir, PASSWORD_UPSTREAM + 'password_credential = "other"\n')
    assert ': upstream.default.password_credential: there is no credential "other" in ' in line
    assert "; add LoadCredential=other:/path/to/secret to the unit" in line


def test_credential_name_is_no_path(config_dir: Path) -> None:
    [line] = problems(config_dir, PASSWORD_UPSTREAM + 'password_credential = "../users"\n')
    assert ': upstream.default.password_credential: "../users" is no credential name' in line


def test_empty_credential(config_dir: Path) -> None:
    (config_dir / "credentials" / "upstream-password").write_text("\n")
    [line] = problems(config_dir, PASSWORD_UPSTREAM + 'password_credential = "upstream-password"\n')
    assert ": upstream.default.password_credential: " in line and "upstream-password is empty" in line


def test_only_one_password_source(config_dir: Path) -> None:
    text = PASSWORD_UPSTREAM + 'password_file = "client-secret"\npassword_credential = "upstream-password"\n'
    [line] = problems(config_dir, text)
    assert ": upstream.default.password_credential: set together with password_file; set only one of them" in line


def test_password_from_file_and_environment_still_work(config_dir: Path) -> None:
    config = load(config_dir, PASSWORD_UPSTREAM + 'password_file = "client-secret"\n')
    assert config.upstreams["default"].password == "the-client-secret"
    config = load(config_dir, PASSWORD_UPSTREAM + 'password_env = "PW"\n', env={"PW": "from-env"})
    assert config.upstreams["default"].password == "from-env"


# -- auth = "xoauth2" ---------------------------------------------------------------------------


def test_client_credentials_upstream(config_dir: Path) -> None:
    upstream = load(config_dir, M365).upstreams["default"]
    assert upstream.auth == "xoauth2"
    assert upstream.username == "alerts@example.org" and upstream.password is None
    assert upstream.oauth == OAuthConfig(
        token_url="https://login.microsoftonline.com/TENANT/oauth2/v2.0/token",
        client_id="client-1",
        grant="client_credentials",
        client_secret="credential-client-secret",
        scope="https://outlook.office365.com/.default",
    )
    assert "credential-client-secret" not in repr(upstream)


def test_refresh_token_upstream(config_dir: Path) -> None:
    text = WORKSPACE + 'device_authorization_url = "https://oauth2.googleapis.com/device/code"\n'
    text += 'token_ca_file = "client-secret"\n'
    oauth = load(config_dir, text).upstreams["default"].oauth
    assert oauth is not None
    assert oauth.grant == "refresh_token"
    assert oauth.client_secret == "the-client-secret"
    assert oauth.refresh_token_file == config_dir / "state" / "refresh-token"
    assert oauth.device_authorization_url == "https://oauth2.googleapis.com/device/code"
    assert oauth.token_ca_file == config_dir / "client-secret"
    # The refresh token rotates, so it is read when needed, never kept in the configuration.
    assert "the-refresh-token" not in repr(oauth) and "the-client-secret" not in repr(oauth)
    without = load(config_dir, WORKSPACE).upstreams["default"].oauth
    assert without is not None and without.device_authorization_url is None and without.token_ca_file is None


def test_xoauth2_required_keys(config_dir: Path) -> None:
    lines = problems(config_dir, '[upstream.default]\nhost = "smtp.gmail.com"\nauth = "xoauth2"\n')
    assert len(lines) == 4
    assert ': upstream.default.username: missing: auth = "xoauth2" needs the mailbox' in lines[0]
    assert ": upstream.default.token_url: missing; write the provider's token endpoint" in lines[1]
    assert ": upstream.default.client_id: missing; " in lines[2]
    assert ": upstream.default.refresh_token_file: missing: " in lines[3]
    assert "relayproxy oauth NAME" in lines[3]


def test_client_credentials_needs_secret_and_scope(config_dir: Path) -> None:
    text = M365.replace('client_secret_credential = "m365-secret"\n', "").replace(
        'scope = "https://outlook.office365.com/.default"\n', 'refresh_token_file = "state/refresh-token"\n'
    )
    lines = problems(config_dir, text)
    assert len(lines) == 3
    assert ": upstream.default.client_secret_file: missing: " in lines[0]
    assert "set client_secret_file or client_secret_credential" in lines[0]
    assert ': upstream.default.scope: missing: grant = "client_credentials" needs' in lines[1]
    assert 'https://outlook.office365.com/.default' in lines[1]
    assert ': upstream.default.refresh_token_file: not used with grant = "client_credentials"' in lines[2]


def test_password_keys_with_xoauth2(config_dir: Path) -> None:
    [line] = problems(config_dir, M365 + 'password_file = "client-secret"\n')
    assert ': upstream.default.password_file: not used with auth = "xoauth2"' in line
    assert '; remove it, or set auth = "password"' in line


def test_oauth_keys_with_password_auth(config_dir: Path) -> None:
    text = PASSWORD_UPSTREAM + 'password_file = "client-secret"\ntoken_url = "https://example.com/token"\n'
    [line] = problems(config_dir, text)
    assert ': upstream.default.token_url: only used with auth = "xoauth2"; set auth = "xoauth2" or remove it' in line


def test_token_url_must_be_https(config_dir: Path) -> None:
    [line] = problems(config_dir, M365.replace("https://login", "http://login"))
    assert ': upstream.default.token_url: "http://login.microsoftonline.com/' in line
    assert "is not an https:// URL" in line


def test_refresh_token_file_missing(config_dir: Path) -> None:
    (config_dir / "state" / "refresh-token").unlink()
    [line] = problems(config_dir, WORKSPACE)
    assert ": upstream.default.refresh_token_file: " in line and "refresh-token does not exist" in line
    assert "; sign in with: relayproxy oauth default --config " in line
    # ... which is exactly what `relayproxy oauth` is for.
    oauth = load(config_dir, WORKSPACE, for_oauth_setup=True).upstreams["default"].oauth
    assert oauth is not None and oauth.refresh_token_file == config_dir / "state" / "refresh-token"


def test_refresh_token_file_needs_an_existing_directory(config_dir: Path) -> None:
    [line] = problems(config_dir, WORKSPACE.replace("state/", "nosuch/"), for_oauth_setup=True)
    assert ": upstream.default.refresh_token_file: the directory " in line and "nosuch does not exist" in line


def test_refresh_token_file_needs_a_writable_directory(config_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root may write anywhere, and CI runs as root: ask the check as the proxy's own user would.
    state = config_dir / "state"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == state and mode == os.W_OK else real_access(path, mode))
    [line] = problems(config_dir, WORKSPACE)
    assert "is not writable, so a rotated refresh token could not be saved" in line


def test_empty_refresh_token_file(config_dir: Path) -> None:
    (config_dir / "state" / "refresh-token").write_text("")
    [line] = problems(config_dir, WORKSPACE)
    assert ": upstream.default.refresh_token_file: " in line and "refresh-token is empty" in line


def test_xoauth2_never_in_the_clear(config_dir: Path) -> None:
    [line] = problems(config_dir, M365.replace('host = "smtp.office365.com"', 'host = "127.0.0.1"\ntls = "none"'))
    assert ": upstream.default.tls: " in line and "never sends credentials in the clear" in line
