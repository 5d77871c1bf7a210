"""`relayproxy demo`: the proxy in front of a local stand-in smarthost, on 127.0.0.1 only.

The smarthost is aiosmtpd (the `demo` extra) with STARTTLS and AUTH required, like a provider's
port 587; it prints every message it receives and stores it under DIR/mail/. Certificates come from
a throwaway CA (trustme), so the proxy really verifies the smarthost's certificate.
"""

from __future__ import annotations

import secrets
import shlex
import ssl
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from relayproxy.usersfile import hash_password, write_users_file

DEMO_USER = "demo"
_UPSTREAM_USER = "relay@smarthost.test"


def run_demo(directory: Path | None, port: int, plain_port: int, smarthost_port: int) -> int:
    try:
        import trustme
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult, LoginPassword
    except ImportError:
        print("relayproxy demo needs the demo extra: pip install 'relayproxy[demo]'", file=sys.stderr)
        return 2
    from twisted.internet import reactor

    from relayproxy.config import load_config
    from relayproxy.errors import ConfigError
    from relayproxy.tap import build_service

    # aiosmtpd warns about its own deprecated attribute on every AUTH; not the operator's concern.
    warnings.filterwarnings("ignore", message="Session.login_data is deprecated")
    work = directory or Path(tempfile.mkdtemp(prefix="relayproxy-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "mail").mkdir(exist_ok=True)
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(work / "demo-ca.pem"))
    for name in ("proxy", "smarthost"):
        cert = ca.issue_cert("localhost", "127.0.0.1")
        cert.cert_chain_pems[0].write_to_path(str(work / f"{name}.crt"))
        (work / f"{name}.key").write_bytes(cert.private_key_pem.bytes())
        (work / f"{name}.key").chmod(0o600)

    user_password = secrets.token_urlsafe(12)
    upstream_password = secrets.token_urlsafe(16)
    write_users_file(work / "users", {DEMO_USER: hash_password(user_password)})
    secret_file = work / "upstream-password"
    secret_file.write_text(upstream_password + "\n")
    secret_file.chmod(0o600)
    config_path = work / "relayproxy.toml"
    config_path.write_text(
        f"""# Written by `relayproxy demo`; run it yourself with: twistd -n relayproxy --config {config_path}
[server]
hostname = "localhost"

[tls]
certificate = "proxy.crt"
key = "proxy.key"

[[listener]]
endpoint = "tcp:{port}:interface=127.0.0.1"
tls = "starttls"

[[listener]]
endpoint = "tcp:{plain_port}:interface=127.0.0.1"
tls = "none"

[auth]
users_file = "users"

[upstream.default]
host = "localhost"
port = {smarthost_port}
tls = "starttls"
ca_file = "demo-ca.pem"
username = "{_UPSTREAM_USER}"
password_file = "upstream-password"
"""
    )
    try:
        config = load_config(config_path)
    except ConfigError as e:
        print("\n".join(e.problems), file=sys.stderr)
        return 2

    received = 0

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            nonlocal received
            received += 1
            content: bytes = envelope.original_content or b""
            (work / "mail" / f"{received:04d}.eml").write_bytes(content)
            print(f"\n=== stand-in smarthost received message {received}: from <{envelope.mail_from}> "
                  f"to {', '.join('<%s>' % r for r in envelope.rcpt_tos)}, {len(content)} bytes ===")
            print(content.decode("utf-8", "replace").rstrip("\r\n").replace("\r\n", "\n"))
            print("=== end of message ===\n", flush=True)
            return f"250 2.0.0 Ok: queued as DEMO{received:04d}"

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        ok = isinstance(data, LoginPassword) and data.login.decode() == _UPSTREAM_USER and data.password.decode() == upstream_password
        return AuthResult(success=ok)

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(work / "smarthost.crt"), str(work / "smarthost.key"))
    smarthost = Controller(
        Handler(), hostname="127.0.0.1", port=smarthost_port, server_hostname="localhost",
        tls_context=context, require_starttls=True, authenticator=authenticate,
        auth_required=True, auth_require_tls=True, decode_data=False,
    )
    smarthost.start()

    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    service = build_service(config, reactor)
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.addSystemEventTrigger("after", "shutdown", smarthost.stop)

    python = shlex.quote(sys.executable)
    print(f"""
relayproxy demo is running (Ctrl-C stops it). Files: {work}
  proxy:               127.0.0.1:{port} (STARTTLS, AUTH) and 127.0.0.1:{plain_port} (loopback plaintext)
  stand-in smarthost:  127.0.0.1:{smarthost_port} (STARTTLS and AUTH required; certificate checked by the proxy)
  demo login:          user {DEMO_USER}   password {user_password}

Send a test message through the proxy (in another terminal):
  swaks --server 127.0.0.1:{port} --tls --auth PLAIN --auth-user {DEMO_USER} --auth-password '{user_password}' \\
        --from demo@example.org --to someone@example.net
or without swaks:
  {python} -c "import smtplib; s = smtplib.SMTP('127.0.0.1', {port}); s.starttls(); \\
s.login('{DEMO_USER}', '{user_password}'); \\
print(s.sendmail('demo@example.org', ['someone@example.net'], b'Subject: hello\\r\\n\\r\\nHello through relayproxy\\r\\n')); s.quit()"

The message appears below as the smarthost received it; the client's reply is the smarthost's own.
""", flush=True)
    reactor.run()
    return 0
