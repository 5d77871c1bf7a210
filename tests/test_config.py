"""load_config: a full configuration loads, and each kind of mistake is one clear line."""

from __future__ import annotations

import re
import textwrap
import tomllib
from pathlib import Path

import pytest
import trustme

from relayproxy.config import Config, UserConfig, load_config
from relayproxy.config.schema import key_names
from relayproxy.config.sections import TABLES
from relayproxy.usersfile import hash_password, write_users_file
from relayproxy.errors import ConfigError

VALID = """\
[server]
hostname = "relay.test"
max_recipients = 50

[tls]
certificate = "cert.pem"
key = "key.pem"

[[listener]]
endpoint = "tcp:587:interface=0.0.0.0"

[[listener]]
endpoint = "tcp:465"
tls = "implicit"

[[listener]]
endpoint = "tcp:2525:interface=127.0.0.1"
tls = "none"

[auth]
users_file = "users"

[upstream.default]
host = "smtp.provider.example"
tls = "implicit"
username = "account@provider.example"
password_file = "secret"
connect_timeout = 10

[upstream.other]
host = "smtp.other.example"
username = "other@other.example"
password_env = "OTHER_PASSWORD"

[upstream.local]
host = "127.0.0.1"
tls = "none"

[users.alice]
upstream = "other"
allowed_senders = ["Alice@Example.com", "@Team.Example.com"]

[limits]
command_timeout = 60
"""


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    ca = trustme.CA()
    cert = ca.issue_cert("relay.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.issue_cert("other.test").private_key_pem.write_to_path(str(tmp_path / "other-key.pem"))
    hashed = hash_password("pw", rounds=4)
    write_users_file(tmp_path / "users", {"alice": hashed, "bob": hashed})
    (tmp_path / "secret").write_text("s3cret\n")
    return tmp_path


def load(config_dir: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    path = config_dir / "relayproxy.toml"
    path.write_text(text)
    return load_config(path, {"OTHER_PASSWORD": "other-pw"} if environ is None else environ)


def problems(config_dir: Path, text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(config_dir, text, environ)
    file = str(config_dir / "relayproxy.toml")
    for line in info.value.problems:
        assert line.startswith(file + ": "), line
        assert "\n" not in line
        assert "; " in line
    return info.value.problems


def edited(old: str, new: str, text: str = VALID) -> str:
    assert old in text
    return text.replace(old, new)


def test_valid_config_loads(config_dir: Path) -> None:
    config = load(config_dir, VALID)
    assert config.server.hostname == "relay.test"
    assert config.server.max_recipients == 50
    assert config.server.max_message_size == 35 * 1024 * 1024
    assert config.tls.certificate == config_dir / "cert.pem"
    assert [listener.tls for listener in config.listeners] == ["starttls", "implicit", "none"]
    assert config.auth.users_file == config_dir / "users"
    default = config.upstreams["default"]
    assert (default.port, default.password, default.connect_timeout) == (465, "s3cret", 10.0)
    assert config.upstreams["other"].port == 587
    assert config.upstreams["other"].password == "other-pw"
    assert config.upstreams["local"].port == 25
    assert config.users["alice"].allowed_senders == ("alice@example.com", "@team.example.com")
    assert config.user("bob") == UserConfig("bob", "default")
    assert config.limits.command_timeout == 60.0
    assert "s3cret" not in repr(config)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    [line] = info.value.problems
    assert line.startswith(f"{tmp_path / 'nope.toml'}: cannot read")


def test_toml_syntax_error(config_dir: Path) -> None:
    [line] = problems(config_dir, "[server\n")
    assert "not valid TOML" in line and "line 1" in line


def test_unknown_key(config_dir: Path) -> None:
    [line] = problems(config_dir, edited('host = "smtp.other.example"', 'host = "smtp.other.example"\nprot = 25'))
    assert ": upstream.other.prot: unknown key; remove it or check the spelling (known keys: host, port" in line


def test_wrong_type(config_dir: Path) -> None:
    [line] = problems(config_dir, edited("connect_timeout = 10", 'port = "x"'))
    assert line.endswith(
        ': upstream.default.port: expected an integer, got "x"; write a port number such as 465'
    )


def test_missing_users_file(config_dir: Path) -> None:
    (config_dir / "users").unlink()
    [line] = problems(config_dir, VALID)
    assert ": auth.users_file: cannot read " in line and "No such file" in line


def test_bad_users_file_line(config_dir: Path) -> None:
    with (config_dir / "users").open("a") as f:
        f.write("carol:$apr1$abc$def\n")
    [line] = problems(config_dir, VALID)
    assert f": auth.users_file: {config_dir / 'users'}:3: the hash of user carol is not bcrypt" in line


def test_unreadable_ca_file(config_dir: Path) -> None:
    # A directory cannot be read as a file even by root, unlike a file with mode 0.
    (config_dir / "ca.pem").mkdir()
    [line] = problems(config_dir, edited('tls = "implicit"\nusername', 'tls = "implicit"\nca_file = "ca.pem"\nusername'))
    assert ": upstream.default.ca_file: cannot read " in line and "Is a directory" in line


def test_missing_ca_file(config_dir: Path) -> None:
    [line] = problems(config_dir, edited('tls = "implicit"\nusername', 'tls = "implicit"\nca_file = "ca.pem"\nusername'))
    assert ": upstream.default.ca_file: cannot read " in line


def test_key_not_matching_certificate(config_dir: Path) -> None:
    [line] = problems(config_dir, edited('key = "key.pem"', 'key = "other-key.pem"'))
    assert ": tls.key: key does not match certificate " in line


def test_certificate_without_key(config_dir: Path) -> None:
    [line] = problems(config_dir, edited('key = "key.pem"\n', ""))
    assert ": tls.key: missing, but certificate is set; set both or neither" in line


def test_tls_listener_needs_certificate(config_dir: Path) -> None:
    [line] = problems(config_dir, edited('certificate = "cert.pem"\nkey = "key.pem"\n', ""))
    assert ': tls.certificate: missing, but listener[1] has tls = "starttls"' in line


def test_user_routed_to_missing_upstream(config_dir: Path) -> None:
    [line] = problems(config_dir, edited('upstream = "other"', 'upstream = "gmail"'))
    assert ": users.alice.upstream: no [upstream.gmail] section; " in line


def test_user_without_section_needs_default_upstream(config_dir: Path) -> None:
    [line] = problems(config_dir, VALID.replace("upstream.default]", "upstream.main]"))
    assert ": users.bob: user bob from the users file has no [users.bob] section" in line


def test_no_listeners(config_dir: Path) -> None:
    text = VALID.split("[[listener]]")[0] + "[auth]" + VALID.split("[auth]")[1]
    [line] = problems(config_dir, text)
    assert ": listener: missing: nothing would accept connections; " in line


def test_plaintext_listener_on_all_interfaces_refused(config_dir: Path) -> None:
    [line] = problems(config_dir, edited("tcp:2525:interface=127.0.0.1", "tcp:2525:interface=0.0.0.0"))
    assert ": listener[3].tls: " in line and "in the clear" in line


@pytest.mark.parametrize(
    "endpoint",
    ["tcp:2525:interface=127.0.0.1", r"tcp6:2525:interface=\:\:1", "tcp:2525:interface=localhost", "unix:/run/relay.sock"],
)
def test_plaintext_listener_on_loopback_allowed(config_dir: Path, endpoint: str) -> None:
    # A TOML literal string, so the backslashes of Twisted's escapes stay as written.
    text = edited('"tcp:2525:interface=127.0.0.1"', f"'{endpoint}'")
    assert load(config_dir, text).listeners[2].endpoint == endpoint


def test_plaintext_listener_allowed_explicitly(config_dir: Path) -> None:
    text = edited('endpoint = "tcp:2525:interface=127.0.0.1"', 'endpoint = "tcp:2525"\nallow_plaintext_auth = true')
    assert load(config_dir, text).listeners[2].allow_plaintext_auth


def test_ssl_endpoint_refused(config_dir: Path) -> None:
    [line] = problems(config_dir, edited('"tcp:465"', '"ssl:465"'))
    assert ': listener[2].endpoint: ' in line and 'tls = "implicit"' in line


def test_unknown_endpoint_type(config_dir: Path) -> None:
    [line] = problems(config_dir, edited('"tcp:465"', '"udp:465"'))
    assert ": listener[2].endpoint: not a server endpoint of a known type" in line


def test_upstream_without_tls_needs_loopback_host(config_dir: Path) -> None:
    [line] = problems(config_dir, edited('host = "127.0.0.1"', 'host = "mail.example.com"'))
    assert ': upstream.local.tls: "none" is only allowed for a loopback host' in line


def test_upstream_without_tls_never_gets_credentials(config_dir: Path) -> None:
    text = edited('host = "127.0.0.1"', 'host = "127.0.0.1"\nusername = "u"\npassword_env = "OTHER_PASSWORD"')
    [line] = problems(config_dir, text)
    assert ": upstream.local.tls: " in line and "never sends credentials in the clear" in line


def test_upstream_password_rules(config_dir: Path) -> None:
    text = edited('password_env = "OTHER_PASSWORD"', 'password_env = "OTHER_PASSWORD"\npassword_file = "secret"')
    [both] = problems(config_dir, text)
    assert ": upstream.other.password_env: set together with password_file" in both
    [unset] = problems(config_dir, VALID, environ={})
    assert ": upstream.other.password_env: the environment variable OTHER_PASSWORD is not set" in unset
    [alone] = problems(config_dir, edited('username = "other@other.example"\n', ""))
    assert ": upstream.other.username: missing, but a password is set" in alone


def test_bad_allowed_sender(config_dir: Path) -> None:
    [line] = problems(config_dir, edited('"@Team.Example.com"', '"team.example.com"'))
    assert ': users.alice.allowed_senders: "team.example.com" is no address or @domain' in line


def test_many_problems_reported_together(config_dir: Path) -> None:
    text = textwrap.dedent(
        """\
        [server]
        max_recipients = true
        colour = "blue"

        [auth]
        users_file = "missing"

        [upstream.default]
        host = "smtp.example.com"
        tls = "sometimes"
        """
    )
    lines = problems(config_dir, text)
    keys = [line.split(": ")[1] for line in lines]
    assert keys == [
        "server.colour",
        "server.hostname",
        "server.max_recipients",
        "listener",
        "auth.users_file",
        "upstream.default.tls",
    ]


@pytest.mark.parametrize(
    ("allowed", "address", "expected"),
    [
        ((), "anyone@anywhere.example", True),
        ((), "", True),
        (("alice@example.com",), "Alice@EXAMPLE.com", True),
        (("alice@example.com",), "bob@example.com", False),
        (("@example.com",), "bob@Example.COM", True),
        (("@example.com",), "bob@sub.example.com", False),
        (("@example.com",), "example.com", False),
        (("alice@example.com", "@example.com"), "", False),
        (("Alice@Example.com",), "alice@example.com", True),
    ],
)
def test_may_send(allowed: tuple[str, ...], address: str, expected: bool) -> None:
    assert UserConfig("alice", allowed_senders=allowed).may_send(address) is expected


def documented_keys(text: str) -> set[str]:
    """The keys etc/relayproxy.toml shows as ``key = value`` lines, commented out or not, as TABLE.KEY
    (TABLE.NAME.KEY for the tables of [upstream.NAME] and [users.NAME])."""
    found, table = set(), ""
    for raw in text.splitlines():
        line = raw.strip().lstrip("#").strip()
        header = re.fullmatch(r"\[\[?([A-Za-z0-9_.-]+)\]\]?", line)
        if header:
            parts = header.group(1).split(".")
            table = parts[0] + (".NAME" if len(parts) > 1 else "")
            continue
        try:
            pair = tomllib.loads(line)
        except tomllib.TOMLDecodeError:
            # Prose, such as a line that only mentions tls = "none".
            continue
        if len(pair) == 1 and table:
            found.add(f"{table}.{next(iter(pair))}")
    return found


def test_example_config_documents_every_declared_key_and_no_other() -> None:
    declared = {f"{table}.{key}" for table, schemas in TABLES.items() for key in key_names(*schemas)}
    documented = documented_keys((REPO / "etc" / "relayproxy.toml").read_text())
    assert sorted(declared - documented) == [], "declared but not documented in etc/relayproxy.toml"
    assert sorted(documented - declared) == [], "in etc/relayproxy.toml but not declared in relayproxy/config/sections.py"
    # The parser itself finds keys in both forms, under [[...]] and commented headers too.
    assert documented_keys('[[listener]]\n# tls = "none": prose\nendpoint = "x"\n# [upstream.a]\n# port = 1\n') == {
        "listener.endpoint", "upstream.NAME.port"
    }


GRAPH = """
[upstream.m365]
kind = "graph"
username = "alerts@example.org"
token_url = "https://login.microsoftonline.com/TENANT/oauth2/v2.0/token"
client_id = "00000000-0000-0000-0000-000000000000"
client_secret_file = "secret"
"""


def test_a_graph_upstream_loads_with_its_defaults(config_dir: Path) -> None:
    upstream = load(config_dir, VALID + GRAPH).upstreams["m365"]
    assert upstream.kind == "graph" and upstream.graph_url == "https://graph.microsoft.com/v1.0"
    assert upstream.oauth is not None and upstream.oauth.grant == "client_credentials"
    assert upstream.oauth.scope == "https://graph.microsoft.com/.default" and upstream.oauth.client_secret == "s3cret"


def test_smtp_keys_are_refused_for_a_graph_upstream(config_dir: Path) -> None:
    text = VALID + GRAPH + 'host = "smtp.office365.com"\nmax_messages_per_session = 10\n'
    lines = problems(config_dir, text)
    assert any(": upstream.m365.host: not used with kind = \"graph\"" in line for line in lines)
    assert any(": upstream.m365.max_messages_per_session: not used with kind = \"graph\"" in line for line in lines)


def test_a_graph_upstream_needs_a_mailbox_and_a_credential(config_dir: Path) -> None:
    text = VALID + GRAPH.replace('username = "alerts@example.org"\n', "").replace('client_secret_file = "secret"\n', "")
    lines = problems(config_dir, text)
    assert any(": upstream.m365.username: missing" in line for line in lines)
    assert any("client_secret_file" in line or "client_certificate_file" in line for line in lines)


def test_graph_url_is_only_for_graph(config_dir: Path) -> None:
    [line] = problems(config_dir, edited('[upstream.other]\n', '[upstream.other]\ngraph_url = "https://graph.microsoft.com/v1.0"\n'))
    assert ': upstream.other.graph_url: only used with kind = "graph"' in line


def test_save_to_sent_defaults_to_true_and_may_be_false(config_dir: Path) -> None:
    assert load(config_dir, VALID + GRAPH).upstreams["m365"].save_to_sent is True
    assert load(config_dir, VALID + GRAPH + "save_to_sent = false\n").upstreams["m365"].save_to_sent is False


def test_save_to_sent_is_only_for_graph(config_dir: Path) -> None:
    [line] = problems(config_dir, edited('[upstream.other]\n', '[upstream.other]\nsave_to_sent = false\n'))
    assert ': upstream.other.save_to_sent: only used with kind = "graph"' in line
    [line] = problems(config_dir, VALID + GRAPH + 'save_to_sent = "no"\n')
    assert ": upstream.m365.save_to_sent: " in line


# -- allowed senders with international domains ---------------------------------------------------


@pytest.mark.parametrize(
    ("allowed", "address", "expected"),
    [
        # The domain's U-labels and A-labels are one domain, whichever side writes which.
        (("@b\u00fccher.example",), "anna@xn--bcher-kva.example", True),
        (("@xn--bcher-kva.example",), "anna@b\u00fccher.example", True),
        (("@B\u00dcCHER.example",), "anna@b\u00fccher.Example", True),
        (("j\u00f6rg@b\u00fccher.example",), "J\u00f6rg@XN--BCHER-KVA.example", True),
        (("j\u00f6rg@b\u00fccher.example",), "jorg@b\u00fccher.example", False),
        (("@b\u00fccher.example",), "anna@bucher.example", False),
        (("@b\u00fccher.example",), "anna@sub.b\u00fccher.example", False),
        # The local part is compared as written (lower-cased), not IDNA-mapped.
        (("@example.com",), "\u7528\u6237@example.com", True),
        # A domain without an A-label form is nobody's, even next to a domain entry.
        (("@example.com",), "a@b\u00fc_cher.example", False),
        # Routed local parts stay outside a domain entry, with U-labels too.
        (("@b\u00fccher.example",), '"ceo@example.org"@b\u00fccher.example', False),
        (("@b\u00fccher.example",), "ceo%example.org@xn--bcher-kva.example", False),
    ],
)
def test_may_send_compares_idna_normalised_domains(allowed: tuple[str, ...], address: str, expected: bool) -> None:
    assert UserConfig("alice", allowed_senders=allowed).may_send(address) is expected


def test_international_allowed_senders(config_dir: Path) -> None:
    config = load(config_dir, edited('"@Team.Example.com"', '"@B\u00fccher.Example", "J\u00f6rg@xn--bcher-kva.example"'))
    alice = config.users["alice"]
    assert alice.allowed_senders == ("alice@example.com", "@b\u00fccher.example", "j\u00f6rg@xn--bcher-kva.example")
    assert alice.may_send("anna@xn--bcher-kva.example") and alice.may_send("j\u00f6rg@b\u00fccher.example")
    [line] = problems(config_dir, edited('"@Team.Example.com"', '"@b\u00fc_cher.example"'))
    assert ': users.alice.allowed_senders: "@b\\u00fc_cher.example": the domain is not a valid internationalised domain name (IDNA)' in line


def test_spool_directory_defaults_to_systemds_state_directory(config_dir: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = load(config_dir, VALID + '\n[users.spooler]\ndelivery = "spool"\n', {"OTHER_PASSWORD": "other-pw", "STATE_DIRECTORY": str(state)})
    assert config.spool.directory == state / "spool" and config.user("spooler").delivery == "spool"
    assert (state / "spool").is_dir() and (state / "spool").stat().st_mode & 0o777 == 0o700


def test_a_spool_directory_that_cannot_be_made_is_a_problem_naming_the_key(config_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    found = problems(config_dir, VALID + f'\n[users.spooler]\ndelivery = "relay-then-spool"\n\n[spool]\ndirectory = "{blocker}/spool"\n')
    assert len(found) == 1 and "spool.directory: " in found[0] and "cannot be created" in found[0] and "mode 0700" in found[0]


def test_spool_keys_are_checked(config_dir: Path) -> None:
    found = problems(config_dir, VALID + '\n[users.spooler]\ndelivery = "later"\n\n[spool]\nretry_initial = 600\nretry_max = 60\n')
    assert any("users.spooler.delivery: " in line and "relay-then-spool" in line for line in found)
    assert any("spool.retry_max: 60 is less than retry_initial (600)" in line for line in found)
