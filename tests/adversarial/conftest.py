"""Fixtures for the adversarial suite: proxies with config variations, log capture, memory probes."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from harness import PKI, Proxy, start_proxy, write_config
from twisted.logger import formatEvent, globalLogPublisher

Launch = Callable[..., Proxy]


@pytest.fixture
def launch(tmp_path: Path, pki: PKI) -> Iterator[Launch]:
    """Start a proxy: ``launch(upstream_toml, server="max_recipients = 3", limits="command_timeout = 1")``.

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


@dataclass
class LogCapture:
    events: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def lines(self) -> list[str]:
        out = []
        for event in list(self.events):
            text = formatEvent(event)
            failure = event.get("log_failure")
            if failure is not None:
                text += "\n" + failure.getTraceback()
            out.append(text)
        return out


@pytest.fixture
def twisted_log() -> Iterator[LogCapture]:
    """Every Twisted log event published while the test runs (the proxy runs in-process)."""
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    yield capture
    globalLogPublisher.removeObserver(capture)


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


class RssMonitor:
    """Samples this process's RSS (proxy, upstream and client all run in it) while a block runs."""

    def __init__(self) -> None:
        self.before = rss_kib()
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_kib())

    def __enter__(self) -> RssMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.after = rss_kib()
        self.peak = max(self.peak, self.after)

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.before) / 1024


@dataclass
class Wire:
    """An upstream's received bytes read the way a strict RFC 5321 server reads them."""

    commands: list[bytes]
    bodies: list[bytes]
    """Complete bodies, dot-stuffed as on the wire, each up to and including the CRLF before its final dot."""
    unterminated: bytes | None
    """A body that was still open when the bytes ended (no final dot)."""


def read_wire(data: bytes) -> Wire:
    commands: list[bytes] = []
    bodies: list[bytes] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n", pos)
        if end < 0:
            break
        line = data[pos:end]
        pos = end + 2
        commands.append(line)
        if line.upper() == b"DATA":
            if data.startswith(b".\r\n", pos):
                bodies.append(b"")
                pos += 3
                continue
            stop = data.find(b"\r\n.\r\n", pos)
            if stop < 0:
                return Wire(commands, bodies, data[pos:])
            bodies.append(data[pos : stop + 2])
            pos = stop + 5
    return Wire(commands, bodies, None)


def final_dots(data: bytes) -> int:
    return len(read_wire(data).bodies)
