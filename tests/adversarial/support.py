"""Helpers for the adversarial suite: how a strict server reads an upstream's bytes, memory probes,
captured log events, and the proxy factory's type."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harness import Proxy
from twisted.logger import formatEvent

Launch = Callable[..., Proxy]


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
