"""`relayproxy demo`: the proxy in front of a local stand-in upstream, on 127.0.0.1 only.

By default the stand-in is a smarthost: aiosmtpd (the `demo` extra) with STARTTLS and AUTH
required, like a provider's port 587; it prints every message it receives and stores it under
DIR/mail/. With --graph it is a stand-in for Microsoft Graph instead (relayproxy/demograph.py:
the token endpoint and sendMail, twisted.web over TLS), which prints and stores each message it
"sent". Certificates come from a throwaway CA (trustme), so the proxy really verifies the
stand-in's certificate.
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
_MAILBOX = "demo@example.org"
"""The mailbox the Graph stand-in sends as: the demo's sender, so that its From is allowed."""
_TENANT = "00000000-0000-0000-0000-0000000de770"
_CLIENT_ID = "11111111-2222-3333-4444-0000000de770"


def run_demo(directory: Path | None, port: int, plain_port: int, smarthost_port: int, graph: bool = False, graph_port: int = 2443) -> int:
    try:
        import trustme
    except ImportError:
        print("relayproxy demo needs the demo extra: pip install 'relayproxy[demo]'", file=sys.stderr)
        return 2
    from twisted.internet import reactor

    from relayproxy.config import load_config
    from relayproxy.errors import ConfigError
    from relayproxy.tap import build_service

    work = directory or Path(tempfile.mkdtemp(prefix="relayproxy-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "mail").mkdir(exist_ok=True)
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(work / "demo-ca.pem"))
    standin = "graph" if graph else "smarthost"
    for name in ("proxy", standin):
        cert = ca.issue_cert("localhost", "127.0.0.1")
        cert.cert_chain_pems[0].write_to_path(str(work / f"{name}.crt"))
        (work / f"{name}.key").write_bytes(cert.private_key_pem.bytes())
        (work / f"{name}.key").chmod(0o600)

    user_password = secrets.token_urlsafe(12)
    upstream_secret = secrets.token_urlsafe(16)
    write_users_file(work / "users", {DEMO_USER: hash_password(user_password)})
    secret_file = work / ("graph-client-secret" if graph else "upstream-password")
    secret_file.write_text(upstream_secret + "\n")
    secret_file.chmod(0o600)
    if graph:
        upstream = f"""[upstream.default]
kind = "graph"
username = "{_MAILBOX}"
token_url = "https://localhost:{graph_port}/{_TENANT}/oauth2/v2.0/token"
client_id = "{_CLIENT_ID}"
client_secret_file = "{secret_file.name}"
graph_url = "https://localhost:{graph_port}/v1.0"
ca_file = "demo-ca.pem"
"""
    else:
        upstream = f"""[upstream.default]
host = "localhost"
port = {smarthost_port}
tls = "starttls"
ca_file = "demo-ca.pem"
username = "{_UPSTREAM_USER}"
password_file = "{secret_file.name}"
"""
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

{upstream}"""
    )
    try:
        config = load_config(config_path)
    except ConfigError as e:
        print("\n".join(e.problems), file=sys.stderr)
        return 2

    def show(what: str, number: int, content: bytes, envelope: str, reply: str) -> None:
        (work / "mail" / f"{number:04d}.eml").write_bytes(content)
        print(f"\n=== {what} {number}: {envelope}, {len(content)} bytes, {reply} ===")
        print(content.decode("utf-8", "replace").rstrip("\r\n").replace("\r\n", "\n"))
        print("=== end of message ===\n", flush=True)

    if graph:
        standin_line = (
            f"stand-in Graph:      https://localhost:{graph_port} (token endpoint and sendMail; certificate checked by the proxy)"
        )
        stop = _start_graph(reactor, work, graph_port, upstream_secret, show)
    else:
        standin_line = f"stand-in smarthost:  127.0.0.1:{smarthost_port} (STARTTLS and AUTH required; certificate checked by the proxy)"
        started = _start_smarthost(work, smarthost_port, upstream_secret, show)
        if started is None:
            return 2
        stop = started

    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    service = build_service(config, reactor)
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.addSystemEventTrigger("after", "shutdown", stop)

    python = shlex.quote(sys.executable)
    if graph:
        outcome = f"""The message appears below as the stand-in Graph received it (base64-decoded), sent as the mailbox
{_MAILBOX}; the client's reply is Graph's verdict, with Graph's request id as the queue id.
  {python} -m relayproxy check --config {config_path}
shows the app's access token, its roles (Mail.Send) and its expiry, sending no mail."""
    else:
        outcome = "The message appears below as the smarthost received it; the client's reply is the smarthost's own."
    print(f"""
relayproxy demo is running (Ctrl-C stops it). Files: {work}
  proxy:               127.0.0.1:{port} (STARTTLS, AUTH) and 127.0.0.1:{plain_port} (loopback plaintext)
  {standin_line}
  demo login:          user {DEMO_USER}   password {user_password}

Send a test message through the proxy (in another terminal):
  swaks --server 127.0.0.1:{port} --tls --auth PLAIN --auth-user {DEMO_USER} --auth-password '{user_password}' \\
        --from demo@example.org --to someone@example.net
or without swaks:
  {python} -c "import smtplib; s = smtplib.SMTP('127.0.0.1', {port}); s.starttls(); \\
s.login('{DEMO_USER}', '{user_password}'); \\
print(s.sendmail('demo@example.org', ['someone@example.net'], b'Subject: hello\\r\\n\\r\\nHello through relayproxy\\r\\n')); s.quit()"

{outcome}
""", flush=True)
    reactor.run()
    return 0


Show = Any
"""show(what, number, content, envelope, reply): print a message the stand-in took and store it."""


def _start_smarthost(work: Path, smarthost_port: int, password: str, show: Show) -> Any:
    """aiosmtpd on 127.0.0.1 with STARTTLS and AUTH required; returns its stop(), None without aiosmtpd."""
    try:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult, LoginPassword
    except ImportError:
        print("relayproxy demo needs the demo extra: pip install 'relayproxy[demo]'", file=sys.stderr)
        return None
    # aiosmtpd warns about its own deprecated attribute on every AUTH; not the operator's concern.
    warnings.filterwarnings("ignore", message="Session.login_data is deprecated")
    received = 0

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            nonlocal received
            received += 1
            reply = f"250 2.0.0 Ok: queued as DEMO{received:04d}"
            rcpts = ", ".join(f"<{r}>" for r in envelope.rcpt_tos)
            show("stand-in smarthost received message", received, envelope.original_content or b"",
                 f"from <{envelope.mail_from}> to {rcpts}", f'answered "{reply}"')
            return reply

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        ok = isinstance(data, LoginPassword) and data.login.decode() == _UPSTREAM_USER and data.password.decode() == password
        return AuthResult(success=ok)

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(work / "smarthost.crt"), str(work / "smarthost.key"))
    smarthost = Controller(
        Handler(), hostname="127.0.0.1", port=smarthost_port, server_hostname="localhost",
        tls_context=context, require_starttls=True, authenticator=authenticate,
        auth_required=True, auth_require_tls=True, decode_data=False,
    )
    smarthost.start()
    return smarthost.stop


def _start_graph(reactor: Any, work: Path, graph_port: int, client_secret: str, show: Show) -> Any:
    """The stand-in Graph on 127.0.0.1 over TLS, in the proxy's reactor; returns its stop()."""
    from twisted.internet import ssl as twisted_ssl
    from twisted.web.server import Site

    from relayproxy.demograph import DemoGraph, SentMessage

    def sent(message: SentMessage) -> None:
        rcpts = ", ".join(f"<{r}>" for r in message.recipients)
        show("stand-in Graph sent message", message.number, message.mime,
             f"as <{message.mailbox}> to {rcpts}", f"answered 202 with request-id {message.request_id}")

    resource = DemoGraph(_TENANT, _CLIENT_ID, client_secret, _MAILBOX, sent)
    pem = (work / "graph.crt").read_bytes() + (work / "graph.key").read_bytes()
    tls = twisted_ssl.PrivateCertificate.loadPEM(pem).options()  # type: ignore[no-untyped-call]
    site = Site(resource)  # type: ignore[no-untyped-call]
    site.displayTracebacks = False
    port = reactor.listenSSL(graph_port, site, tls, interface="127.0.0.1")
    return port.stopListening
