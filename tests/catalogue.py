"""Every reply the proxy composes, for tests that must cover the whole Catalogue."""

from __future__ import annotations

import inspect

from relayproxy.smtp.reply import Catalogue, Reply


def composed_replies() -> list[tuple[str, Reply]]:
    """Catalogue's Reply attributes, and its staticmethods called with sample arguments."""
    found: list[tuple[str, Reply]] = []
    for name, raw in inspect.getmembers_static(Catalogue):
        if name.startswith("_"):
            continue
        if isinstance(raw, staticmethod):
            func = raw.__func__
            samples = [("PIPELINING", "AUTH PLAIN LOGIN") if p.annotation == "tuple[str, ...]" else "sample.example"
                       for p in inspect.signature(func).parameters.values()]
            reply = func(*samples)
            assert isinstance(reply, Reply), f"Catalogue.{name} does not return a Reply"
            found.append((name, reply))
        elif isinstance(raw, Reply):
            found.append((name, raw))
    return found
