from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from twisted.logger import formatEvent, globalLogPublisher

sys.path.insert(0, str(Path(__file__).parent))

from harness import PKI, Proxy, Smarthost, smarthost_upstream, start_proxy, write_config  # noqa: E402
from peers import Action, Certificate, ScriptedUpstream, issue  # noqa: E402
from graph_standin import GraphStandIn  # noqa: E402


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(trustme.CA(), tmp_path_factory.mktemp("pki"))


@pytest.fixture
def smarthost(pki: PKI) -> Iterator[Smarthost]:
    host = Smarthost(pki).start()
    yield host
    host.stop()


@pytest.fixture
def graph(pki: PKI) -> Iterator[GraphStandIn]:
    """Microsoft Graph and the identity platform's token endpoint over TLS (tests/graph_standin.py)."""
    standin = GraphStandIn(pki).start()
    yield standin
    standin.stop()


@pytest.fixture
def proxy(tmp_path: Path, pki: PKI, smarthost: Smarthost) -> Iterator[Proxy]:
    path, ports = write_config(tmp_path, pki, smarthost_upstream(smarthost, pki))
    running = start_proxy(path, ports)
    yield running
    running.stop()


ProxyFactory = Callable[..., Proxy]
SmarthostFactory = Callable[..., Smarthost]
UpstreamFactory = Callable[..., ScriptedUpstream]


@pytest.fixture
def make_upstream(pki: PKI) -> Iterator[UpstreamFactory]:
    """Start scripted upstreams: ``make_upstream({"RCPT": DROP}, tls="starttls", delay=0.05)``.

    With TLS and no ``certificate``, one for localhost from the session's CA.
    """
    started: list[ScriptedUpstream] = []

    def make(
        script: dict[str, Action] | None = None, *, tls: str = "none", certificate: Certificate | None = None, **kwargs: Any
    ) -> ScriptedUpstream:
        if tls != "none" and certificate is None:
            certificate = issue(pki.ca, pki.dir, "scripted-localhost", "localhost")
        upstream = ScriptedUpstream(script, tls=tls, certificate=certificate, **kwargs)
        started.append(upstream)
        return upstream

    yield make
    for upstream in started:
        upstream.stop()


@pytest.fixture
def upstream(make_upstream: UpstreamFactory) -> ScriptedUpstream:
    """A plaintext scripted upstream with the default script: it accepts everything and records it."""
    return make_upstream()


@pytest.fixture
def upstream_proxy(make_proxy: ProxyFactory, upstream: ScriptedUpstream) -> Proxy:
    """A proxy whose upstream is ``upstream``."""
    return make_proxy(upstream.toml())


@pytest.fixture
def make_smarthost(pki: PKI) -> Iterator[SmarthostFactory]:
    """Start extra or differently configured smarthosts: ``make_smarthost(password="other")``."""
    started: list[Smarthost] = []

    def make(**kwargs: object) -> Smarthost:
        host = Smarthost(pki, **kwargs).start()  # type: ignore[arg-type]
        started.append(host)
        return host

    yield make
    for host in started:
        host.stop()


@pytest.fixture
def make_proxy(tmp_path: Path, pki: PKI) -> Iterator[ProxyFactory]:
    """Start a proxy: ``make_proxy(upstream_toml, server="max_recipients = 3", limits="command_timeout = 1")``.

    ``server`` lines go into the [server] table write_config already has (TOML forbids a second
    one); ``limits`` becomes a [limits] table; ``extra`` is appended verbatim.
    """
    started: list[Proxy] = []

    def make(upstream: str, server: str = "", limits: str = "", extra: str = "", users: dict[str, str] | None = None) -> Proxy:
        directory = tmp_path / f"proxy{len(started)}"
        directory.mkdir()
        tail = (f"[limits]\n{limits}\n" if limits else "") + extra
        path, ports = write_config(directory, pki, upstream, users=users, extra=tail)
        if server:
            text = path.read_text()
            anchor = '[server]\nhostname = "relay.test"\n'
            assert anchor in text, "write_config's [server] table changed"
            path.write_text(text.replace(anchor, anchor + server.strip() + "\n", 1))
        running = start_proxy(path, ports)
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    """Every log event the in-process proxy publishes while the test runs (see harness.fields_of)."""
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """The same events as text, as a log reader sees them."""
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)
