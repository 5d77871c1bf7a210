"""The spool with real processes and files: `twistd -n relayproxy` killed with SIGKILL and started
again, a file size limit that makes the disk "full", `relayproxy queue` beside a running proxy, and
the spool's Prometheus metrics.
"""

from __future__ import annotations

import base64
import json
import resource
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import CLIENT_PASSWORD, CLIENT_USER, PKI, Smarthost, _listening, free_port, smarthost_upstream, wait_for, write_config
from peers import Client
from test_twistd import environment, twistd

MESSAGE = b"From: app1@example.org\r\nSubject: scan 7\r\nMessage-ID: <scan-7@example.org>\r\n\r\n" + b"page\r\n" * 100
LOGIN = b"AUTH PLAIN " + base64.b64encode(f"\0{CLIENT_USER}\0{CLIENT_PASSWORD}".encode())
FAST = "retry_initial = 0.2\nretry_max = 0.5\nscan_interval = 0.1\n"


class Relay:
    """One configuration, run (and killed, and run again) as a twistd process."""

    def __init__(self, directory: Path, pki: PKI, smarthost: Smarthost, spool: str = FAST, extra: str = "") -> None:
        self.directory = directory
        self.spool = directory / "spool"
        self.config, ports = write_config(
            directory, pki, smarthost_upstream(smarthost, pki),
            extra=f'[users.app1]\ndelivery = "spool"\n\n[spool]\ndirectory = "{self.spool}"\n{spool}\n{extra}',
        )
        self.ports = ports
        self.port = ports[2]
        self.log = directory / "twistd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, file_size_limit: int | None = None) -> None:
        def limit() -> None:
            if file_size_limit is not None:
                # Writes past it fail with EFBIG (Python ignores SIGXFSZ): a disk that is full for the spool.
                resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

        self.proc = subprocess.Popen(
            [*twistd(), "-n", "--pidfile=", "--logfile", str(self.log), "relayproxy", "--config", str(self.config)],
            env=environment(), cwd=self.directory, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, preexec_fn=limit,
        )
        proc = self.proc
        wait_for(lambda: proc.poll() is not None or all(_listening(p) for p in self.ports), timeout=30)
        assert proc.poll() is None, self.log.read_text()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def queued(self, folder: str = "queue") -> list[dict[str, object]]:
        """The envelopes in the folder now (one delivered while they are read is left out)."""
        found = []
        for path in sorted((self.spool / folder).glob("*.env")):
            try:
                found.append(json.loads(path.read_bytes()))
            except FileNotFoundError:
                pass
        return found

    def queue(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "relayproxy", "queue", *args, "--config", str(self.config)],
            env=environment(), capture_output=True, text=True, timeout=60,
        )


@pytest.fixture
def relays(tmp_path: Path, pki: PKI) -> Iterator[Callable[..., Relay]]:
    made: list[Relay] = []

    def make(smarthost: Smarthost, **kwargs: str) -> Relay:
        directory = tmp_path / f"relay{len(made)}"
        directory.mkdir()
        relay = Relay(directory, pki, smarthost, **kwargs)
        made.append(relay)
        return relay

    yield make
    for relay in made:
        relay.stop()


def begin(port: int, recipients: tuple[str, ...] = ("bob@example.net",)) -> Client:
    """A logged-in client after its 354."""
    client = Client(port)
    client.command(b"EHLO printer.test")
    assert client.command(LOGIN).startswith(b"235")
    assert client.command(b"MAIL FROM:<app1@example.org>").startswith(b"250")
    for recipient in recipients:
        assert client.command(b"RCPT TO:<" + recipient.encode() + b">").startswith(b"250")
    assert client.command(b"DATA").startswith(b"354")
    return client


def send(port: int, message: bytes = MESSAGE) -> bytes:
    client = begin(port)
    client.send(message + b".\r\n")
    reply = client.reply()
    client.close()
    return reply


def test_kill_9_after_the_250_delivers_after_the_restart_once(relays: Callable[..., Relay], pki: PKI) -> None:
    later = Smarthost(pki, port=free_port())
    relay = relays(later)
    relay.start()
    reply = send(relay.port)
    assert reply.startswith(b"250 2.0.0 Ok: queued as ") and reply.endswith(b" (spooled)\r\n")
    relay.kill()
    assert len(relay.queued()) == 1
    later.start()
    try:
        relay.start()
        wait_for(lambda: not relay.queued(), timeout=20)
        assert [m.content for m in later.received] == [MESSAGE]
        assert "message_id=<scan-7@example.org>" in relay.log.read_text()
    finally:
        later.stop()


def test_kill_9_mid_body_never_delivers(relays: Callable[..., Relay], smarthost: Smarthost) -> None:
    relay = relays(smarthost)
    relay.start()
    client = begin(relay.port)
    # More than the spool holds in memory before it writes: part of the body is on disk in tmp/.
    client.send(b"Subject: half\r\n\r\n" + (b"x" * 78 + b"\r\n") * 8000)
    wait_for(lambda: any(p.stat().st_size for p in (relay.spool / "tmp").iterdir()))
    relay.kill()
    client.close()
    relay.start()
    wait_for(lambda: "receipt was never completed" in relay.log.read_text())
    assert list((relay.spool / "tmp").iterdir()) == [] and relay.queued() == []
    # A message sent now is delivered, and nothing else.
    assert send(relay.port).startswith(b"250")
    wait_for(lambda: not relay.queued())
    assert [m.content for m in smarthost.received] == [MESSAGE]


def test_a_full_disk_is_452_and_nothing_is_spooled(relays: Callable[..., Relay], smarthost: Smarthost) -> None:
    relay = relays(smarthost)
    relay.start(file_size_limit=1024 * 1024)
    big = b"Subject: too big for the disk\r\n\r\n" + (b"y" * 998 + b"\r\n") * 1500
    assert send(relay.port, big) == b"452 4.3.1 Insufficient system storage: the spool cannot take the message now, try again later\r\n"
    assert relay.queued() == [] and list((relay.spool / "tmp").iterdir()) == []
    assert "spool write failed" in relay.log.read_text()
    # Room for a small one: taken and delivered.
    assert send(relay.port).startswith(b"250")
    wait_for(lambda: not relay.queued())
    assert [m.content for m in smarthost.received] == [MESSAGE]


def test_queue_list_show_retry_delete_beside_the_running_proxy(relays: Callable[..., Relay], pki: PKI) -> None:
    later = Smarthost(pki, port=free_port())
    relay = relays(later, spool="retry_initial = 3600\nretry_max = 3600\nscan_interval = 0.2\n")
    relay.start()
    first, second = (send(relay.port).split()[5].decode() for _ in range(2))
    wait_for(lambda: all(e["attempts"] == 1 for e in relay.queued()))
    listed = relay.queue("list")
    assert listed.returncode == 0, listed.stderr
    assert first in listed.stdout and second in listed.stdout and "2 messages in" in listed.stdout
    shown = relay.queue("show", first)
    assert shown.returncode == 0 and "Subject: scan 7" in shown.stdout and "bob@example.net" in shown.stdout
    assert "message-id:   <scan-7@example.org>" in shown.stdout
    deleted = relay.queue("delete", second)
    assert deleted.returncode == 0 and second in deleted.stdout
    assert relay.queue("show", second).returncode == 1
    later.start()
    try:
        retried = relay.queue("retry", first)
        assert retried.returncode == 0, retried.stderr
        wait_for(lambda: not relay.queued(), timeout=20)
        assert [m.content for m in later.received] == [MESSAGE]
    finally:
        later.stop()
    assert "0 messages in" in relay.queue("list").stdout


def test_spool_metrics(relays: Callable[..., Relay], pki: PKI) -> None:
    later = Smarthost(pki, port=free_port())
    metrics_port = free_port()
    relay = relays(later, extra=f'[metrics]\nendpoint = "tcp:{metrics_port}:interface=127.0.0.1"\n')
    relay.start()
    assert send(relay.port).startswith(b"250")

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
            text: str = answer.read().decode()
            return text

    wait_for(lambda: 'relayproxy_spool_deliveries_total{outcome="deferred",upstream="default"}' in scrape())
    page = scrape()
    assert "relayproxy_spool_messages 1.0" in page
    oldest = next(line for line in page.splitlines() if line.startswith("relayproxy_spool_oldest_age_seconds "))
    assert float(oldest.split()[1]) > 0
    later.start()
    try:
        wait_for(lambda: 'relayproxy_spool_deliveries_total{outcome="delivered",upstream="default"} 1.0' in scrape(), timeout=20)
        wait_for(lambda: "relayproxy_spool_messages 0.0" in scrape())
    finally:
        later.stop()
