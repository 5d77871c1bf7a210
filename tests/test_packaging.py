"""A regular install carries every package: twistd and the systemd unit run the installed copy."""

from __future__ import annotations

import configparser
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_package_of_relayproxy_is_listed_in_setup_cfg() -> None:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    found = {
        ".".join(path.parent.relative_to(REPO).parts)
        for path in (REPO / "relayproxy").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert found - listed == set(), "add these to [options] packages in setup.cfg"
    for package in found:
        assert (REPO / package.replace(".", "/") / "__init__.py").exists(), f"{package} has no __init__.py"
