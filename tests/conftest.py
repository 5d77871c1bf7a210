from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

sys.path.insert(0, str(Path(__file__).parent))

from harness import PKI, Proxy, Recorder, Smarthost, recorder_upstream, smarthost_upstream, start_proxy, write_config  # noqa: E402


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(trustme.CA(), tmp_path_factory.mktemp("pki"))


@pytest.fixture
def smarthost(pki: PKI) -> Iterator[Smarthost]:
    host = Smarthost(pki).start()
    yield host
    host.stop()


@pytest.fixture
def proxy(tmp_path: Path, pki: PKI, smarthost: Smarthost) -> Iterator[Proxy]:
    path, ports = write_config(tmp_path, pki, smarthost_upstream(smarthost, pki))
    running = start_proxy(path, ports)
    yield running
    running.stop()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.stop()


@pytest.fixture
def recorder_proxy(tmp_path: Path, pki: PKI, recorder: Recorder) -> Iterator[Proxy]:
    path, ports = write_config(tmp_path, pki, recorder_upstream(recorder))
    running = start_proxy(path, ports)
    yield running
    running.stop()
