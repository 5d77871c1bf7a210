"""Fixtures for the adversarial suite: proxies with config variations, log capture."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest
from conftest import ProxyFactory
from twisted.logger import ILogObserver, globalLogPublisher

from .support import Launch, LogCapture


@pytest.fixture
def launch(make_proxy: ProxyFactory) -> Launch:
    """``make_proxy`` under the name the adversarial tests use."""
    return make_proxy


@pytest.fixture
def twisted_log() -> Iterator[LogCapture]:
    """Every Twisted log event published while the test runs (the proxy runs in-process)."""
    capture = LogCapture()
    observer = cast(ILogObserver, capture)
    globalLogPublisher.addObserver(observer)
    yield capture
    globalLogPublisher.removeObserver(observer)
