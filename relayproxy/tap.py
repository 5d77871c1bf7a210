"""The twistd plugin's tap: ``twistd -n relayproxy --config PATH``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.internet import ssl, threads
from twisted.internet.interfaces import IProtocolFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from relayproxy.config import Config, TLSConfig, load_config
from relayproxy.credentials import make_portal
from relayproxy.errors import ConfigError
from relayproxy.limits import AuthThrottle, ConnectionCounter
from relayproxy.server import ServerSettings, SMTPServerFactory
from relayproxy.upstream import UpstreamConnector

DEFAULT_CONFIG = "/etc/relayproxy/relayproxy.toml"


class Options(usage.Options):
    synopsis = "[--config PATH]"
    longdesc = (
        "Run the relayproxy SMTP relay proxy: every app logs in with its own account (see "
        "`relayproxy passwd`), and each message is relayed, streaming, to the app's upstream "
        "smarthost with the provider credentials that only the proxy holds. The upstream's "
        "verdict is the app's verdict. Every key of the config file is documented in "
        "etc/relayproxy.toml. A bad config prints one line per problem and exits with status 2."
    )
    optParameters = [
        ["config", "c", DEFAULT_CONFIG, "The TOML configuration file."],
    ]

    def postOptions(self) -> None:
        # Validate here, before twistd daemonizes or binds anything, so errors reach the terminal.
        try:
            self.loaded: Config = load_config(Path(self["config"]))
        except ConfigError as e:
            for problem in e.problems:
                print(f"relayproxy: {problem}", file=sys.stderr)
            raise SystemExit(2) from None


def server_tls_options(tls: TLSConfig) -> Any:
    assert tls.certificate is not None and tls.key is not None
    chain = x509.load_pem_x509_certificates(tls.certificate.read_bytes())
    key = serialization.load_pem_private_key(tls.key.read_bytes(), password=None)
    # pyOpenSSL takes cryptography's objects (its own X509/PKey are deprecated); Twisted's hints lag.
    return ssl.CertificateOptions(
        privateKey=cast(Any, key),
        certificate=cast(Any, chain[0]),
        extraCertChain=cast(Any, chain[1:]),
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


def build_service(config: Config, reactor: Any) -> MultiService:
    tls_options = server_tls_options(config.tls) if config.tls.certificate is not None else None
    portal = make_portal(config, lambda f: threads.deferToThreadPool(reactor, reactor.getThreadPool(), f))
    connectors = {
        name: UpstreamConnector(reactor, upstream, config.server.hostname) for name, upstream in config.upstreams.items()
    }
    throttle = AuthThrottle(reactor, config.limits)
    connections = ConnectionCounter(config.limits)
    top = MultiService()  # type: ignore[no-untyped-call]
    for listener in config.listeners:
        settings = ServerSettings(
            server=config.server,
            listener=listener,
            limits=config.limits,
            portal=portal,
            connectors=connectors,
            tls_options=tls_options,
            clock=reactor,
            throttle=throttle,
            connections=connections,
        )
        factory: IProtocolFactory = SMTPServerFactory(settings)
        if listener.tls == "implicit":
            assert tls_options is not None, "load_config requires [tls] for TLS listeners"
            factory = TLSMemoryBIOFactory(tls_options, False, factory)
        strports.service(listener.endpoint, factory, reactor=reactor).setServiceParent(top)  # type: ignore[no-untyped-call]
    return top


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return build_service(options.loaded, reactor)
