"""Old devices (issue 16): a listener's own TLS policy, allowed networks of listeners and users, and
IP-bound devices that send without AUTH.

The configuration rules first, then the machine, then end to end: an old-protocol TLS client on a
legacy listener, connections and logins from two loopback addresses, a device through swaks.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest
from conftest import ProxyFactory
from harness import CLIENT_PASSWORD, CLIENT_USER, PKI, Smarthost, fields_of, free_port, reactor, smarthost_upstream, wait_listening
from peers import Client, auth_plain
from test_config import VALID, config_dir, edited, load, problems  # noqa: F401  (config_dir: a fixture)
from twisted.internet.threads import blockingCallFromThread

from relayproxy.smtp.reply import Catalogue
from relayproxy.smtp.session import Send, ServerSession, SessionSettings, State

# -- configuration ------------------------------------------------------------------------------

PUBLIC = 'endpoint = "tcp:587:interface=0.0.0.0"'


def test_listener_policy_defaults(config_dir: Path) -> None:
    listener = load(config_dir, VALID).listeners[0]
    assert (listener.tls_min_version, listener.tls_ciphers, listener.allowed_networks, listener.allow_ip_login) == (
        "TLSv1.2", None, (), False
    )


@pytest.mark.parametrize(
    "endpoint",
    ["tcp:587:interface=0.0.0.0", "tcp:587", "tcp6:587:interface=\\:\\:", "tcp:587:interface=93.184.216.34",
     "tcp:587:interface=relay.example.org", "systemd:domain=INET:index=0", "haproxy:tcp:587:interface=127.0.0.1"],
)
def test_an_old_tls_version_on_a_public_interface_is_refused(config_dir: Path, endpoint: str) -> None:
    [line] = problems(config_dir, edited(PUBLIC, f"endpoint = '{endpoint}'\ntls_min_version = 'TLSv1'"))
    assert ": listener[1].tls_min_version: " in line
    assert "would offer broken TLS to anyone" in line and "allowed_networks" in line and "private or loopback interface" in line


@pytest.mark.parametrize(
    "endpoint", ["tcp:587:interface=192.168.10.1", "tcp:587:interface=127.0.0.1", "tcp6:587:interface=fd00\\:\\:1", "unix:/run/r.sock"]
)
def test_an_old_tls_version_on_an_internal_interface_loads(config_dir: Path, endpoint: str) -> None:
    config = load(config_dir, edited(PUBLIC, f"endpoint = '{endpoint}'\ntls_min_version = 'TLSv1.1'"))
    assert config.listeners[0].tls_min_version == "TLSv1.1"


def test_an_old_tls_version_with_allowed_networks_loads_anywhere(config_dir: Path) -> None:
    text = edited(PUBLIC, PUBLIC + '\ntls_min_version = "TLSv1"\nallowed_networks = ["192.168.10.0/24", "2001:db8::/48"]')
    listener = load(config_dir, text).listeners[0]
    assert [str(n) for n in listener.allowed_networks] == ["192.168.10.0/24", "2001:db8::/48"]


def test_tls_policy_problems(config_dir: Path) -> None:
    text = edited(PUBLIC, PUBLIC + '\ntls_min_version = "TLSv1.0"\ntls_ciphers = "NO-SUCH-CIPHER"\nallowed_networks = ["192.168.10.1/24"]')
    plain = 'endpoint = "tcp:2525:interface=127.0.0.1"\ntls = "none"'
    text = edited(plain, plain + '\ntls_ciphers = "ECDHE+AESGCM"', text)
    lines = problems(config_dir, text)
    assert any('listener[1].tls_min_version: expected one of "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"' in line for line in lines)
    assert any("listener[1].tls_ciphers: OpenSSL" in line and "knows no cipher" in line for line in lines)
    assert any('listener[1].allowed_networks: "192.168.10.1/24" is not a network' in line for line in lines)
    assert any('listener[3].tls_ciphers: only used with tls = "starttls" or "implicit"' in line for line in lines)
    assert len(lines) == 4


USERS = """
[users.printer]
devices = ["192.168.10.20/32", "192.168.10.21/32"]

[users.scanner]
devices = ["192.168.10.16/29"]
"""


def test_overlapping_devices_of_two_users_are_refused(config_dir: Path) -> None:
    [line] = problems(config_dir, VALID + USERS)
    assert ": users.scanner.devices: 192.168.10.16/29 overlaps 192.168.10.20/32 of [users.printer]" in line
    assert "give each device's address to one user only" in line


def test_devices_and_allowed_networks_of_users_load(config_dir: Path) -> None:
    text = VALID + USERS.replace("192.168.10.16/29", "192.168.10.24/29") + '\n[users.bob]\nallowed_networks = ["10.0.0.0/8"]\n'
    config = load(config_dir, text)
    assert [str(n) for n in config.users["scanner"].devices] == ["192.168.10.24/29"]
    assert [str(n) for n in config.user("bob").allowed_networks] == ["10.0.0.0/8"]


# -- the machine ----------------------------------------------------------------------------------


def test_a_device_session_is_authenticated_after_its_hello() -> None:
    session = ServerSession(SessionSettings("relay.test", plaintext_auth=True), identified=True)
    session.greet()
    [ehlo] = [a.reply for a in session.receive(b"EHLO printer\r\n") if isinstance(a, Send)]
    assert session.state is State.AUTHENTICATED
    # Nothing to log in to: AUTH is not offered, and refused as for a logged-in session.
    assert not any(line.startswith("AUTH") for line in ehlo.lines)
    assert [a.reply for a in session.receive(auth_plain() + b"\r\n") if isinstance(a, Send)] == [Catalogue.ALREADY_AUTHENTICATED]


# -- end to end -----------------------------------------------------------------------------------


def old_client(pki: PKI, version: ssl.TLSVersion) -> ssl.SSLContext:
    """A client that speaks only ``version``, as an old printer does."""
    context = pki.client_context()
    with warnings.catch_warnings():
        # Python deprecates the old versions; speaking them is the point here.
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = context.maximum_version = version
    # OpenSSL 3 negotiates TLS 1.0 and 1.1 only at security level 0, on either side.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["TLSv1", "TLSv1.1"])
def test_an_old_tls_client_on_a_legacy_listener_and_not_on_the_default(
    make_proxy: ProxyFactory, smarthost: Smarthost, pki: PKI, version: ssl.TLSVersion
) -> None:
    legacy = free_port()
    proxy = make_proxy(
        smarthost_upstream(smarthost, pki),
        extra=f'[[listener]]\nendpoint = "tcp:{legacy}:interface=127.0.0.1"\ntls = "implicit"\ntls_min_version = "TLSv1"\n',
    )
    wait_listening(legacy)
    with Client(legacy, tls=old_client(pki, version)) as client:
        assert client.greeting.startswith(b"220 relay.test ")
        assert client.sock.version() == version.name.replace("_", ".")
        client.ehlo()
        assert client.command(auth_plain()).startswith(b"235 ")
        client.envelope()
        assert client.command(b"DATA").startswith(b"354 ")
        assert client.command(b"Subject: old\r\n\r\nfrom an old printer\r\n.").startswith(b"250 ")
    [got] = smarthost.received
    assert b"from an old printer" in got.content
    # The other listeners keep TLS 1.2 as their minimum.
    with pytest.raises(ssl.SSLError):
        Client(proxy.tls_port, tls=old_client(pki, version))


def test_a_reload_changes_a_listeners_tls_version_for_new_handshakes(make_proxy: ProxyFactory, smarthost: Smarthost, pki: PKI) -> None:
    legacy = free_port()
    written = f'[[listener]]\nendpoint = "tcp:{legacy}:interface=127.0.0.1"\ntls = "implicit"\ntls_min_version = "TLSv1"\n'
    proxy = make_proxy(smarthost_upstream(smarthost, pki), extra=written)
    wait_listening(legacy)
    Client(legacy, tls=old_client(pki, ssl.TLSVersion.TLSv1)).close()
    proxy.config_path.write_text(proxy.config_path.read_text().replace(written, written.replace('"TLSv1"', '"TLSv1.2"')))
    assert blockingCallFromThread(reactor, proxy.service.reload) is True
    with pytest.raises(ssl.SSLError):
        Client(legacy, tls=old_client(pki, ssl.TLSVersion.TLSv1))
    Client(legacy, tls=pki.client_context()).close()


def test_a_listener_with_allowed_networks_refuses_other_addresses(
    make_proxy: ProxyFactory, smarthost: Smarthost, pki: PKI, events: list[dict[str, Any]]
) -> None:
    port = free_port()
    make_proxy(
        smarthost_upstream(smarthost, pki),
        extra=f'[[listener]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\ntls = "none"\nallowed_networks = ["127.0.0.2/32"]\n',
    )
    wait_listening(port)
    with Client(port, source="127.0.0.2") as allowed:
        assert allowed.greeting.startswith(b"220 relay.test ")
    with Client(port, source="127.0.0.3", read_greeting=False) as refused:
        said = refused.wait_closed()
    assert said == Catalogue.network_refused("relay.test").to_bytes() and said.startswith(b"554 5.7.1 ")
    [line] = [f for f in fields_of(events, "connection refused") if f["client"] == "127.0.0.3"]
    assert line["reason"] == "not in allowed_networks" and line["endpoint"] == f"tcp:{port}:interface=127.0.0.1"
    assert "allowed_networks" in line["hint"]


def test_behind_haproxy_allowed_networks_match_the_headers_address(
    make_proxy: ProxyFactory, smarthost: Smarthost, pki: PKI, events: list[dict[str, Any]]
) -> None:
    port = free_port()
    make_proxy(
        smarthost_upstream(smarthost, pki),
        extra=f'[[listener]]\nendpoint = "haproxy:tcp:{port}:interface=127.0.0.1"\ntls = "none"\nallowed_networks = ["192.0.2.0/24"]\n',
    )
    wait_listening(port)
    # HAProxy itself connects from 127.0.0.1, outside the networks: the header's client is what counts.
    with Client(port, read_greeting=False) as inside:
        inside.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 51234 587\r\n")
        assert inside.reply().startswith(b"220 relay.test ")
    with Client(port, read_greeting=False) as outside:
        outside.send(b"PROXY TCP4 203.0.113.7 127.0.0.1 51234 587\r\n")
        assert outside.wait_closed() == Catalogue.network_refused("relay.test").to_bytes()
    assert [f["client"] for f in fields_of(events, "connection refused")] == ["203.0.113.7"]


def test_a_users_allowed_networks_refuse_auth_from_elsewhere_as_a_wrong_password(
    make_proxy: ProxyFactory, smarthost: Smarthost, pki: PKI, events: list[dict[str, Any]]
) -> None:
    proxy = make_proxy(smarthost_upstream(smarthost, pki), extra=f'[users.{CLIENT_USER}]\nallowed_networks = ["127.0.0.2/32"]\n')
    with Client(proxy.plain_port, source="127.0.0.2") as inside:
        inside.ehlo()
        assert inside.command(auth_plain()).startswith(b"235 ")
    with Client(proxy.plain_port, source="127.0.0.3") as outside:
        outside.ehlo()
        refused = outside.command(auth_plain())
        wrong = outside.command(auth_plain(password=CLIENT_PASSWORD + "x"))
    # The same bytes as a wrong password: from outside, the rule cannot be told from a typo.
    assert refused == wrong == Catalogue.AUTH_INVALID.to_bytes()
    reasons = [f["reason"] for f in fields_of(events, "auth failed") if f["client"] == "127.0.0.3"]
    assert reasons == [f"client not in allowed_networks of [users.{CLIENT_USER}]", "bad credentials"]


def swaks(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("swaks")
    if path is None:
        pytest.fail("swaks is not installed: install it (apt-get install swaks; .ci/run does) to run this test")
    return subprocess.run([path, *args, "--to", "bob@example.net", "--timeout", "20"], capture_output=True, text=True, timeout=60)


def test_an_ip_bound_device_sends_without_auth_on_an_ip_login_listener_only(
    make_proxy: ProxyFactory, smarthost: Smarthost, pki: PKI, events: list[dict[str, Any]]
) -> None:
    port = free_port()
    proxy = make_proxy(
        smarthost_upstream(smarthost, pki),
        extra=(
            f'[[listener]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\ntls = "none"\nallow_ip_login = true\n'
            '[users.printer]\ndevices = ["127.0.0.4/32"]\nallowed_senders = ["scanner@example.org"]\n'
        ),
    )
    wait_listening(port)
    done = swaks("--server", f"127.0.0.1:{port}", "--local-interface", "127.0.0.4", "--from", "scanner@example.org")
    assert done.returncode == 0, done.stdout + done.stderr
    [got] = smarthost.received
    assert (got.mail_from, got.rcpt_tos) == ("scanner@example.org", ["bob@example.net"])
    [line] = fields_of(events, "device ok")
    assert (line["client"], line["user"]) == ("127.0.0.4", "printer")
    [message] = fields_of(events, "message")
    assert (message["user"], message["outcome"]) == ("printer", "relayed")
    # The user's allowed senders apply to its device.
    with Client(port, source="127.0.0.4") as device:
        assert b"AUTH" not in device.ehlo()
        assert device.command(b"MAIL FROM:<ceo@example.org>").startswith(b"553 5.7.1 ")
    # Another address on that listener, and the device on a listener without allow_ip_login, must log in.
    for listener, source in ((port, "127.0.0.5"), (proxy.plain_port, "127.0.0.4")):
        with Client(listener, source=source) as other:
            other.ehlo()
            assert other.command(b"MAIL FROM:<scanner@example.org>") == Catalogue.AUTH_REQUIRED.to_bytes()
    assert len(smarthost.received) == 1


def test_a_device_stays_itself_after_starttls(make_proxy: ProxyFactory, smarthost: Smarthost, pki: PKI) -> None:
    port = free_port()
    make_proxy(
        smarthost_upstream(smarthost, pki),
        extra=(
            f'[[listener]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\ntls = "starttls"\nallow_ip_login = true\n'
            '[users.printer]\ndevices = ["127.0.0.4/32"]\n'
        ),
    )
    wait_listening(port)
    with Client(port, source="127.0.0.4") as device:
        device.ehlo()
        assert device.command(b"STARTTLS").startswith(b"220 ")
        device.starttls(pki.client_context())
        assert b"AUTH" not in device.ehlo()
        device.envelope(sender=b"scanner@example.org")
        assert device.command(b"DATA").startswith(b"354 ")
        assert device.command(b"Subject: scan\r\n\r\nscanned\r\n.").startswith(b"250 ")
    [got] = smarthost.received
    assert b"scanned" in got.content



def test_the_readme_example_loads(config_dir: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    example = readme.split("### Printers and scanners\n", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    config = load(config_dir, VALID + example)
    printers = config.listeners[-1]
    assert (printers.tls_min_version, printers.allow_ip_login) == ("TLSv1", True)
    assert [str(n) for n in config.users["scanner"].devices] == ["192.168.10.20/32", "192.168.10.21/32"]
    # Without its allowed_networks, only its private interface keeps it loadable; on 0.0.0.0 it is refused.
    public = example.replace("interface=192.168.10.1", "interface=0.0.0.0")
    public = public.replace('allowed_networks = ["192.168.10.0/24"]          # anyone', "# anyone")
    [line] = problems(config_dir, VALID + public)
    assert ": listener[5].tls_min_version: " in line
