"""Fixtures for the adversarial suite: proxies with config variations, log capture."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from harness import PKI, Proxy, start_proxy, write_config
from twisted.logger import ILogObserver, globalLogPublisher

from .support import Launch, LogCapture


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


@pytest.fixture
def twisted_log() -> Iterator[LogCapture]:
    """Every Twisted log event published while the test runs (the proxy runs in-process)."""
    capture = LogCapture()
    observer = cast(ILogObserver, capture)
    globalLogPublisher.addObserver(observer)
    yield capture
    globalLogPublisher.removeObserver(observer)
