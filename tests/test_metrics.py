"""Prometheus metrics: counters over real SMTP sessions, /metrics and /healthz over real HTTP, config.

The metrics server keeps serving through the shutdown drain (/healthz: 503) and closes its port
when the last session has ended, so once the service has stopped a scrape gets connection refused.
"""

from __future__ import annotations

import re
import smtplib
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import (
    login,
    CLIENT_USER,
    PKI,
    Proxy,
    Smarthost,
    _listening,
    reactor,
    smarthost_upstream,
    start_proxy,
    wait_for,
    wait_listening,
    write_config,
)
from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.threads import blockingCallFromThread

from relayproxy.config import load_config
from relayproxy.errors import ConfigError
from relayproxy.metrics import NullMetrics
from relayproxy.prometheus import PrometheusMetrics

MESSAGE = b"From: app1@example.org\r\nTo: bob@example.net\r\nSubject: counted\r\n\r\nhello\r\n.dot line\r\n"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """The samples of a Prometheus text exposition, keyed by name and label set (any order)."""
    samples: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)', line)
        assert m, line
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        samples[(m.group(1), labels)] = float(m.group(3))
    return samples


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def get(port: int, path: str) -> tuple[int, str, str]:
    """Status, content type and body of GET http://127.0.0.1:port/path (HTTP errors included)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def scrape(port: int) -> Samples:
    status, content_type, body = get(port, "/metrics")
    assert (status, content_type) == (200, CONTENT_TYPE_LATEST)
    return parse(body)


@pytest.fixture
def metrics_port() -> int:
    from harness import free_port

    return free_port()


@pytest.fixture
def metered(tmp_path: Path, pki: PKI, smarthost: Smarthost, metrics_port: int) -> Iterator[Proxy]:
    """The ``proxy`` fixture with a [metrics] endpoint on ``metrics_port``."""
    extra = f'[metrics]\nendpoint = "tcp:{metrics_port}:interface=127.0.0.1"\n'
    path, ports = write_config(tmp_path, pki, smarthost_upstream(smarthost, pki), extra=extra)
    running = start_proxy(path, ports)
    wait_listening(metrics_port)
    yield running
    if running.service.running:
        running.stop()


def test_counters_after_a_message_a_refusal_and_a_wrong_password(
    metered: Proxy, pki: PKI, smarthost: Smarthost, metrics_port: int
) -> None:
    before = scrape(metrics_port)
    assert sample(before, "relayproxy_auth_total", outcome="failed") == 0.0
    assert sample(before, "relayproxy_sessions_active") == 0.0

    with login(metered.port, pki) as smtp:
        assert smtp.sendmail("app1@example.org", ["bob@example.net"], MESSAGE) == {}
        smarthost.data_reply = "554 5.7.1 Message rejected as spam"
        with pytest.raises(smtplib.SMTPDataError):
            smtp.sendmail("app1@example.org", ["bob@example.net"], b"Subject: spam\r\n\r\nbuy\r\n")
    # One AUTH PLAIN (smtp.login would retry with LOGIN after the 535: two failures).
    with smtplib.SMTP("127.0.0.1", metered.port, timeout=20) as smtp:
        smtp.starttls(context=pki.client_context())
        smtp.ehlo()
        smtp.user, smtp.password = CLIENT_USER, "wrong"
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.auth("PLAIN", smtp.auth_plain)

    # session_closed runs when the proxy sees the close, a moment after the client's.
    wait_for(lambda: sample(scrape(metrics_port), "relayproxy_sessions_active") == 0.0)
    s = scrape(metrics_port)
    assert sample(s, "relayproxy_messages_total", user="app1", upstream="default", outcome="relayed") == 1.0
    assert sample(s, "relayproxy_messages_total", user="app1", upstream="default", outcome="refused") == 1.0
    [received] = smarthost.received
    # Only the relayed message counts, at its size as the client sent it (the log's size=): the
    # dot-stuffed body, so one octet more than the upstream stores for the ".dot line".
    assert received.content == MESSAGE
    assert sample(s, "relayproxy_relayed_bytes_total", upstream="default") == len(MESSAGE) + 1
    assert sample(s, "relayproxy_auth_total", outcome="ok") == 1.0
    assert sample(s, "relayproxy_auth_total", outcome="failed") == 1.0
    assert sample(s, "relayproxy_auth_total", outcome="throttled") == 0.0
    assert sample(s, "relayproxy_auth_throttled_total") == 0.0
    assert sample(s, "relayproxy_sessions_total") >= 2
    for phase in ("connect", "tls", "auth", "end_of_data"):
        count = sample(s, "relayproxy_upstream_latency_seconds_count", upstream="default", phase=phase)
        assert count >= 1, phase
        # Every observation falls in the +Inf bucket; the 60 s bucket exists too.
        assert sample(s, "relayproxy_upstream_latency_seconds_bucket", upstream="default", phase=phase, le="+Inf") == count
        assert ("relayproxy_upstream_latency_seconds_bucket", frozenset({("upstream", "default"), ("phase", phase), ("le", "60.0")})) in s
    # The exact line as served (prometheus_client writes labels sorted by name).
    _, _, text = get(metrics_port, "/metrics")
    assert 'relayproxy_messages_total{outcome="relayed",upstream="default",user="app1"} 1.0' in text.splitlines()


def test_healthz_and_other_paths(metered: Proxy, metrics_port: int) -> None:
    assert get(metrics_port, "/healthz") == (200, "text/plain; charset=utf-8", "ok\n")
    assert get(metrics_port, "/metrics?x=1")[0] == 200
    for path in ("/", "/nope", "/metrics/", "/healthz/x"):
        assert get(metrics_port, path)[0] == 404, path
    request = urllib.request.Request(f"http://127.0.0.1:{metrics_port}/metrics", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 405
    assert info.value.headers["Allow"] == "GET, HEAD"
    head = urllib.request.Request(f"http://127.0.0.1:{metrics_port}/healthz", method="HEAD")
    with urllib.request.urlopen(head, timeout=10) as response:
        assert (response.status, response.read()) == (200, b"")


def test_healthz_is_503_while_draining_then_the_port_closes(
    metered: Proxy, pki: PKI, smarthost: Smarthost, metrics_port: int
) -> None:
    busy = login(metered.port, pki)
    assert busy.mail("app1@example.org")[0] == 250
    assert busy.rcpt("bob@example.net")[0] == 250
    assert busy.docmd("DATA")[0] == 354
    busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n")

    stopped = threading.Event()
    reactor.callFromThread(lambda: metered.service.stopService().addBoth(lambda _: stopped.set()))
    wait_for(lambda: not _listening(metered.port))
    # The SMTP listeners are closed, a transaction is still in flight: unhealthy, still scrapable.
    status, _, body = get(metrics_port, "/healthz")
    assert (status, body) == (503, "not listening\n")
    assert sample(scrape(metrics_port), "relayproxy_sessions_active") == 1.0

    busy.send(b"second half\r\n.\r\n")
    assert busy.getreply()[0] == 250
    busy.close()
    assert stopped.wait(10)
    # Fully stopped: nothing listens on the metrics port any more.
    with pytest.raises(urllib.error.URLError) as info:
        get(metrics_port, "/healthz")
    assert isinstance(info.value.reason, ConnectionRefusedError)


def test_reload_keeps_the_metrics_object(metered: Proxy, pki: PKI, metrics_port: int) -> None:
    metrics = metered.service.metrics
    assert isinstance(metrics, PrometheusMetrics)
    with login(metered.port, pki):
        pass
    # Another [metrics] endpoint in the file only takes effect after a restart.
    path = metered.config_path
    path.write_text(path.read_text().replace(f"tcp:{metrics_port}:", "tcp:1:"))
    assert blockingCallFromThread(reactor, metered.service.reload)
    assert metered.service.metrics is metrics
    assert metered.service.config.metrics.endpoint == f"tcp:{metrics_port}:interface=127.0.0.1"
    with login(metered.port, pki):
        pass
    assert sample(scrape(metrics_port), "relayproxy_auth_total", outcome="ok") == 2.0


def test_no_metrics_section_no_metrics_server(proxy: Proxy) -> None:
    assert proxy.service.config.metrics.endpoint is None
    assert isinstance(proxy.service.metrics, NullMetrics)
    assert proxy.service.healthy()


@pytest.mark.parametrize(
    "endpoint",
    ['"http://127.0.0.1:9187/metrics"', '"9187"', '"tcp:metrics"', '"tcp:interface=127.0.0.1"', '"ssl:9187"', "9187", '""'],
)
def test_bad_metrics_endpoint_is_a_config_error(tmp_path: Path, pki: PKI, smarthost: Smarthost, endpoint: str) -> None:
    path, _ = write_config(tmp_path, pki, smarthost_upstream(smarthost, pki), extra=f"[metrics]\nendpoint = {endpoint}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={"RELAYPROXY_TEST_UPSTREAM_PASSWORD": "x"})
    [line] = info.value.problems
    assert line.startswith(f"{path}: metrics.endpoint: "), line
    assert "; write one such as \"tcp:9187:interface=127.0.0.1\"" in line, line


def test_metrics_endpoint_forms_that_load(tmp_path: Path, pki: PKI, smarthost: Smarthost) -> None:
    for endpoint in ("tcp:9187", "tcp:interface=127.0.0.1:port=9187", "tcp6:9187:interface=\\:\\:1", "unix:/run/relayproxy/metrics.sock"):
        path, _ = write_config(tmp_path, pki, smarthost_upstream(smarthost, pki), extra=f"[metrics]\nendpoint = '{endpoint}'\n")
        config = load_config(path, environ={"RELAYPROXY_TEST_UPSTREAM_PASSWORD": "x"})
        assert config.metrics.endpoint == endpoint


def test_unknown_metrics_key(tmp_path: Path, pki: PKI, smarthost: Smarthost) -> None:
    path, _ = write_config(tmp_path, pki, smarthost_upstream(smarthost, pki), extra='[metrics]\nport = 9187\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={"RELAYPROXY_TEST_UPSTREAM_PASSWORD": "x"})
    [line] = info.value.problems
    assert line.startswith(f"{path}: metrics.port: unknown key; "), line


def test_each_instance_has_its_own_registry() -> None:
    one, two = PrometheusMetrics(), PrometheusMetrics()
    one.message("a", "default", "relayed", 100)
    one.message("a", "default", "failed", 50)
    one.auth("throttled")
    one.connection_refused("too many connections")
    one.upstream_latency("default", "connect", 0.003)
    s, t = parse(one.exposition().decode()), parse(two.exposition().decode())
    assert sample(s, "relayproxy_relayed_bytes_total", upstream="default") == 100.0
    assert sample(s, "relayproxy_auth_total", outcome="throttled") == 1.0
    assert sample(s, "relayproxy_auth_throttled_total") == 1.0
    assert sample(s, "relayproxy_connections_refused_total", reason="too many connections") == 1.0
    assert sample(s, "relayproxy_upstream_latency_seconds_bucket", upstream="default", phase="connect", le="0.005") == 1.0
    assert ("relayproxy_relayed_bytes_total", frozenset({("upstream", "default")})) not in t
    assert sample(t, "relayproxy_auth_throttled_total") == 0.0
