"""The twistd plugin's tap: ``twistd -n relayproxy --config PATH``."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

from twisted.application.service import IService, MultiService
from OpenSSL import SSL
from twisted.cred.portal import Portal
from twisted.internet import defer, ssl, threads
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IProtocolFactory
from twisted.logger import ILogObserver
from twisted.python.components import Componentized
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from relayproxy.config import Config, ListenerConfig, TLSConfig, load_config
from relayproxy.credentials import device_users, known_names, make_portal
from relayproxy.errors import ConfigError
from relayproxy.limits import AuthThrottle, Budgets, ConnectionCounter
from relayproxy.listening import CannotListen, ListenerService, bind_all
from relayproxy.logs import EventLog, FirstSeen, JSONLinesObserver
from relayproxy.metrics import Metrics, NullMetrics
from relayproxy.prometheus import PrometheusMetrics, metrics_service
from relayproxy.proxyprotocol import listener_service
from relayproxy.server import ServerSettings, SMTPServerFactory
from relayproxy.spool.delivery import Deliveries
from relayproxy.spool.intake import Spooler
from relayproxy.spool.store import Spool
from relayproxy.store import open_store
from relayproxy.upstream.graph import GraphUpstream
from relayproxy.upstream.smtp import SMTPUpstream
from zope.interface import implementer

log = EventLog("relayproxy.tap")

DEFAULT_CONFIG = "/etc/relayproxy/relayproxy.toml"


class Options(usage.Options):
    synopsis = "[--config PATH]"
    longdesc = (
        "Run the relayproxy SMTP relay proxy: every app logs in with its own account (see "
        "`relayproxy passwd`), and each message is relayed, streaming, to the app's upstream "
        "smarthost with the provider credentials that only the proxy holds. The upstream's "
        "verdict is the app's verdict, unless the app's user has delivery = \"spool\" or "
        "\"relay-then-spool\" (then a message the upstream cannot take now is answered 250 once "
        "it is on disk in [spool] directory, and delivered from there). Every key of the config file is documented in "
        "etc/relayproxy.toml. A bad config prints one line per problem and exits with status 2; "
        "a listener that cannot bind prints one line and exits with status 1, nothing served."
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


_SERVER_TLS12 = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
SERVER_TLS12_CIPHERS = ssl.AcceptableCiphers.fromOpenSSLCipherString(_SERVER_TLS12)  # type: ignore[no-untyped-call]
"""TLS 1.2 suites offered to clients: forward-secret ECDHE with an AEAD cipher only (Mozilla's
"intermediate" list without DHE). No CBC (padding oracles such as Lucky13), no RSA key exchange
(no forward secrecy, ROBOT), no SHA1 MAC. TLS 1.3 keeps OpenSSL's suites, all of them AEAD."""

LEGACY_CIPHERS = (
    _SERVER_TLS12 + ":ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:ECDHE-RSA-AES256-SHA:"
    "AES128-SHA:AES256-SHA"
)
"""A listener lowered to TLS 1.0 or 1.1 without its own tls_ciphers: TLS 1.0 and 1.1 define no AEAD
suite, so old devices get AES-CBC with SHA1 (forward-secret first, plain RSA key exchange last for
printers that know nothing else); the strong suites stay first for clients that can use them."""

_VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1_0, "TLSv1.1": ssl.TLSVersion.TLSv1_1, "TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}

TLSPolicy = tuple[str, str | None]
"""A listener's tls_min_version and tls_ciphers: listeners with the same one share a context."""


def tls_policy(listener: ListenerConfig) -> TLSPolicy:
    return listener.tls_min_version, listener.tls_ciphers


def server_tls_options(tls: TLSConfig, policy: TLSPolicy = ("TLSv1.2", None)) -> ssl.CertificateOptions:
    """The TLS settings of a client-facing listener: STARTTLS and implicit TLS alike, with the
    certificate chain and key load_config read and checked, and the listener's version and suites."""
    assert tls.private_key is not None and tls.chain
    version, ciphers = policy
    legacy = version in ("TLSv1", "TLSv1.1")
    cipher_string = ciphers or (LEGACY_CIPHERS if legacy else _SERVER_TLS12)
    if legacy and "@SECLEVEL" not in cipher_string:
        # OpenSSL 3 refuses TLS 1.0 and 1.1 at security level 1 and above (their handshake signs with
        # SHA1): without level 0 the version would be configured and never negotiated.
        cipher_string += ":@SECLEVEL=0"
    acceptable = (
        SERVER_TLS12_CIPHERS if cipher_string == _SERVER_TLS12
        else ssl.AcceptableCiphers.fromOpenSSLCipherString(cipher_string)  # type: ignore[no-untyped-call]
    )
    bound = {"insecurelyLowerMinimumTo": _VERSIONS[version]} if legacy else {"raiseMinimumTo": _VERSIONS[version]}
    # pyOpenSSL takes cryptography's objects (its own X509/PKey are deprecated); Twisted's hints lag.
    options = ssl.CertificateOptions(
        privateKey=cast(Any, tls.private_key),
        certificate=cast(Any, tls.chain[0]),
        extraCertChain=cast(Any, list(tls.chain[1:])),
        acceptableCiphers=acceptable,
        **bound,
    )
    if cipher_string != _SERVER_TLS12:
        # Twisted keeps only the suites' names, which drops a @SECLEVEL: the context built now (and
        # kept by CertificateOptions for every connection) gets the string itself.
        options.getContext().set_cipher_list(cipher_string.encode("ascii"))
    return options


def _server_tls(config: Config) -> dict[TLSPolicy, ssl.CertificateOptions]:
    """The options of each listener's policy; none without a certificate."""
    if config.tls.private_key is None:
        return {}
    return {policy: server_tls_options(config.tls, policy) for policy in {tls_policy(listener) for listener in config.listeners}}


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerTLS:
    """The server TLS settings in force now: a reload swaps ``current``, new handshakes use it."""

    def __init__(self, current: ssl.CertificateOptions) -> None:
        self.current = current

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self.current.getContext(), None)


class StartupFailed(SystemExit, Exception):
    """Start-up stopped before anything was served: exit status 1, no traceback.

    An Exception too, so that twistd's start-up catches it, removes the pid file and tells a
    daemon's parent, which prints it and exits 1 (on a bare SystemExit that parent waits for
    ever). Re-raised by twistd, it is a SystemExit: Python exits with ``code``, no traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(1)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass
class _Listener:
    """One [[listener]]: its configuration, the factory its sessions share, the service that listens."""

    config: ListenerConfig
    factory: SMTPServerFactory
    service: ListenerService
    tls: ReloadableServerTLS | None
    """Its server TLS settings (an implicit TLS factory keeps this object: a reload swaps its current)."""


Shared = tuple[Portal, dict[str, SMTPUpstream | GraphUpstream]]


class RelayService(MultiService):
    """All listeners of one configuration; SIGHUP re-reads it without dropping a session.

    Sessions keep the settings they started with; sessions accepted after a reload get the new
    users, upstreams, limits, certificate and listeners. Every listener is bound before any
    serves: one that cannot bind stops the start-up, or refuses the reload, as a whole.
    """

    def __init__(self, config: Config, reactor: Any, load: Callable[[], Config]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self._reactor = reactor
        self._load = load
        # Before any factory or connector is built: they keep the object they are given. A reload
        # keeps it too, so counters run on across SIGHUP.
        prometheus = PrometheusMetrics() if config.metrics.endpoint else None
        self.metrics: Metrics = prometheus or NullMetrics()
        # One store for the AUTH throttle and the budgets; with Redis, shared with other instances.
        self._store = open_store(reactor, config.limits.store)
        self._throttle = AuthThrottle(reactor, config.limits, self._store)
        self._budgets = Budgets(reactor, self._store)
        self._connections = ConnectionCounter(config.limits)
        # "auth ok" for a user and address once an hour: an app logging in all day is not news.
        self._logins = FirstSeen(reactor, 3600)
        self._upstreams: dict[str, SMTPUpstream | GraphUpstream] = {}
        self._spooler: Spooler | None = None
        self._deliveries: Deliveries | None = None
        self._spool_for(config)
        shared = self._shared(config)
        self._upstreams = shared[1]
        options = _server_tls(config)
        self._listeners = [self._listener(config, listener, shared, options) for listener in config.listeners]
        for listener in self._listeners:
            listener.service.setServiceParent(self)  # type: ignore[no-untyped-call]
        # The factories of listeners a reload removed, while they still have sessions to drain.
        self._retired: list[SMTPServerFactory] = []
        if prometheus is not None and config.metrics.endpoint:
            # Serves on through the shutdown drain, /healthz answering 503, then stops.
            metrics_service(
                reactor, config.metrics.endpoint, prometheus, self.healthy,
                until=lambda: defer.gatherResults([f.when_empty() for f in self._factories()]),
            ).setServiceParent(self)  # type: ignore[no-untyped-call]

    def _spool_for(self, config: Config) -> None:
        """The spool and its deliveries, once a configuration uses it or it holds messages; they
        stay for the life of the process, so that what a user spooled is delivered after a reload
        changed the user's delivery."""
        directory = config.spool.directory
        assert directory is not None
        if self._spooler is not None:
            if self._spooler.spool.directory != directory:
                log.warn("reload: a change of [spool] directory takes effect only after a restart")
            return
        if not (config.spooling or (directory / "queue").is_dir()):
            return
        spool = Spool(directory)
        try:
            # Before anything listens (the reactor does not run yet): what a crash left half-received goes.
            for name in spool.prepare():
                log.info("spool: removed a message whose receipt was never completed", file=name)
        except OSError as e:
            message = f"cannot use the spool directory {directory}: {e.strerror}"
            os.write(2, f"relayproxy: {message}\n".encode())
            raise StartupFailed(message) from None
        deliveries = Deliveries(self._reactor, spool, config.spool, config.server.hostname, lambda: self._upstreams, self.metrics)
        self._deliveries = deliveries
        self._spooler = Spooler(self._reactor, spool, config.spool.retry_initial, deliveries.taken)

    def healthy(self) -> bool:
        """Is the service running with every child service (each listener) running?"""
        return bool(self.running) and all(child.running for child in self)

    def _factories(self) -> list[SMTPServerFactory]:
        """Every factory that may have sessions: the listeners', and those of removed listeners."""
        return [listener.factory for listener in self._listeners] + self._retired

    def _shared(self, config: Config) -> Shared:
        """The portal and the upstreams for ``config``; nothing in force changes yet."""
        portal = make_portal(config, lambda f: threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f))
        upstreams: dict[str, SMTPUpstream | GraphUpstream] = {}
        for name, upstream in config.upstreams.items():
            old = self._upstreams.get(name)
            # An unchanged upstream is kept (and so its pool, cached tokens and TLS context).
            if old is not None and old.config == upstream:
                upstreams[name] = old
            elif upstream.kind == "graph":
                upstreams[name] = GraphUpstream(self._reactor, upstream)
            else:
                upstreams[name] = SMTPUpstream(self._reactor, upstream, config.server.hostname, self.metrics)
        return portal, upstreams

    def _settings(self, config: Config, listener: ListenerConfig, shared: Shared, tls: ReloadableServerTLS | None) -> ServerSettings:
        portal, upstreams = shared
        return ServerSettings(
            server=config.server,
            listener=listener,
            limits=config.limits,
            portal=portal,
            upstreams=dict(upstreams),
            tls_options=tls,
            clock=self._reactor,
            throttle=self._throttle,
            connections=self._connections,
            metrics=self.metrics,
            budgets=self._budgets,
            logins=self._logins,
            known_user=known_names(portal),
            devices=device_users(config) if listener.allow_ip_login else (),
            spooler=self._spooler,
        )

    def _listener(
        self, config: Config, listener: ListenerConfig, shared: Shared, options: dict[TLSPolicy, ssl.CertificateOptions]
    ) -> _Listener:
        """A listener's factory and service, not bound yet."""
        tls = ReloadableServerTLS(options[tls_policy(listener)]) if options else None
        server_factory = SMTPServerFactory(self._settings(config, listener, shared, tls))
        factory: IProtocolFactory = server_factory
        if listener.tls == "implicit":
            assert tls is not None, "load_config requires [tls] for TLS listeners"
            factory = TLSMemoryBIOFactory(tls, False, factory)
        # haproxy:INNER: the PROXY header reader wraps the (TLS-wrapped) factory, outermost.
        return _Listener(listener, server_factory, listener_service(listener.endpoint, factory, self._reactor), tls)

    def _bind(self) -> None:
        bind_all(child for child in self if isinstance(child, ListenerService))

    def privilegedStartService(self) -> None:
        """twistd's first step, before it sheds privileges (so that ports below 1024 bind) and
        before the reactor runs: bind every listener, the metrics server's too. One that cannot
        bind ends the process with status 1 and one line naming its endpoint and the system's
        error; the others were unbound again and no connection was served."""
        try:
            self._bind()
        except CannotListen as e:
            log.error("cannot listen", endpoint=e.endpoint, error=e.reason)
            # Also to fd 2, the terminal or journal that started the proxy, as configuration
            # errors are: twistd has pointed sys.stderr at its log by now.
            os.write(2, f"relayproxy: {e}\n".encode())
            raise StartupFailed(str(e)) from None
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        # Started without privilegedStartService (in-process, as the tests do): the same bind of
        # all listeners or none, raising CannotListen.
        self._bind()
        super().startService()  # type: ignore[no-untyped-call]
        if self._deliveries is not None:
            self._deliveries.start()

    def stopService(self) -> defer.Deferred[object]:
        """Stop accepting; idle sessions get 421 4.3.2 now, the others when their transaction ends
        or when ``shutdown_grace`` runs out (a message already handed over still gets its verdict)."""
        stopped = super().stopService()  # type: ignore[no-untyped-call]
        spooling = self._deliveries.stop() if self._deliveries is not None else defer.succeed(None)
        sessions = [session for factory in self._factories() for session in list(factory.sessions)]
        for session in sessions:
            session.drain()
        deadline = self._reactor.callLater(self.config.server.shutdown_grace, self._force_close)
        drained = defer.gatherResults([factory.when_empty() for factory in self._factories()])

        def done(result: object) -> object:
            if deadline.active():
                deadline.cancel()
            for upstream in self._upstreams.values():
                upstream.close_idle()
            self._store.close()
            return result

        return defer.gatherResults([defer.maybeDeferred(lambda: stopped), drained, spooling]).addBoth(done)

    def _force_close(self) -> None:
        if self._deliveries is not None:
            self._deliveries.force_stop()
        for factory in self._factories():
            for session in list(factory.sessions):
                session.force_close()

    def setServiceParent(self, parent: Any) -> None:
        # twistd asks the application for an ILogObserver before its own text log.
        if self.config.log.format == "json" and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, JSONLinesObserver())  # type: ignore[no-untyped-call]
        super().setServiceParent(parent)  # type: ignore[no-untyped-call]

    def reload_on_sighup(self) -> None:
        """Python runs signal handlers between bytecodes; the reload itself runs in the reactor."""
        signal.signal(signal.SIGHUP, lambda *_: self._reactor.callFromThread(self.reload))

    def _refuse(self, problems: list[str]) -> bool:
        for problem in problems:
            log.error("reload refused", problem=problem)
        log.error("reload failed, keeping the running configuration", path=str(self.config.path))
        return False

    def reload(self) -> bool:
        """Apply the configuration file as it is now; on any problem keep the running one.

        A listener is known by its endpoint string: one whose endpoint stays keeps its socket and
        its sessions and takes the new settings; a new one is bound before anything changes; a
        removed one stops accepting while its sessions finish.
        """
        try:
            new = self._load()
        except ConfigError as e:
            return self._refuse(e.problems)
        options = _server_tls(new)
        if new.metrics != self.config.metrics:
            log.warn("reload: [metrics] changes take effect only after a restart")
            new = replace(new, metrics=self.config.metrics)
        if new.limits.store != self.config.limits.store:
            log.warn("reload: [limits] store changes take effect only after a restart")
            new = replace(new, limits=replace(new.limits, store=self.config.limits.store))
        if new.log != self.config.log:
            log.warn("reload: [log] format changes take effect only after a restart")
        try:
            self._spool_for(new)
        except StartupFailed as e:
            return self._refuse([f"{new.path}: {e}"])
        shared = self._shared(new)
        unclaimed = {listener.config.endpoint: listener for listener in self._listeners}
        plan: list[tuple[_Listener, ListenerConfig]] = []
        added: list[_Listener] = []
        for wanted in new.listeners:
            kept = unclaimed.pop(wanted.endpoint, None)
            if kept is None:
                kept = self._listener(new, wanted, shared, options)
                added.append(kept)
            elif (kept.config.tls == "implicit") != (wanted.tls == "implicit"):
                # The socket's factory is TLS-wrapped or not from the moment it listens.
                log.warn('reload: a change to or from tls = "implicit" takes effect only after a restart', endpoint=wanted.endpoint)
                wanted = replace(wanted, tls=kept.config.tls)
            plan.append((kept, wanted))
        try:
            bind_all(listener.service for listener in added)
        except CannotListen as e:
            return self._refuse([f"{new.path}: {e}"])
        # Bound: from here on nothing can fail, and the new configuration is in force.
        self._throttle.update(new.limits)
        self._connections.update(new.limits)
        self._upstreams = shared[1]
        if self._deliveries is not None and self._spooler is not None:
            self._deliveries.config = new.spool
            self._spooler.retry_initial = new.spool.retry_initial
            if self.running and not self._deliveries.running:
                self._deliveries.start()
        for listener, wanted in plan:
            listener.config = wanted
            current = options.get(tls_policy(wanted))
            if current is None:
                listener.tls = None
            elif listener.tls is None:
                # The first [tls] of a proxy that had none: a new object for this listener.
                listener.tls = ReloadableServerTLS(current)
            else:
                listener.tls.current = current
            listener.factory.settings = self._settings(new, wanted, shared, listener.tls)
        removed = list(unclaimed.values())
        self._retired = [factory for factory in self._retired if factory.sessions] + [listener.factory for listener in removed]
        for listener in removed:
            listener.service.disownServiceParent()  # type: ignore[no-untyped-call]
            log.info("reload: listener removed", endpoint=listener.config.endpoint)
        for listener in added:
            listener.service.setServiceParent(self)  # type: ignore[no-untyped-call]
            log.info("reload: listener added", endpoint=listener.config.endpoint)
        self._listeners = [listener for listener, _ in plan]
        self.config = replace(new, listeners=tuple(wanted for _, wanted in plan))
        log.info("reload: configuration applied", path=str(new.path))
        return True


def build_service(config: Config, reactor: Any, load: Callable[[], Config] | None = None) -> RelayService:
    """``load`` re-reads the configuration on SIGHUP (default: the same file, the same way)."""
    return RelayService(config, reactor, load or (lambda: load_config(config.path)))


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    service = build_service(options.loaded, reactor)
    service.reload_on_sighup()
    return service
