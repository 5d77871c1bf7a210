"""Structured log lines: one event, one line, in a fixed key=value form or as JSON.

Every event goes through twisted.logger with its fields kept apart, so the text form (what twistd
writes by default, and what fail2ban reads) and the JSON form (``[log] format = "json"``) come from
the same data. Values never contain a password, token or AUTH payload: callers pass only names,
addresses, codes and hints.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Hashable, Mapping
from datetime import datetime, timezone
from typing import IO, Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

_PLAIN = re.compile(r"[A-Za-z0-9@._:/<>+\-\[\]*#,]+")
_FIELDS = "relayproxy_fields"
_EVENT = "relayproxy_event"


def _value(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    # Quoting anything unusual keeps one field from forging another (a user name " client=...").
    # fullmatch, not match with "$": "$" also matches before a final newline, and "alice\n" would
    # end the line. json.dumps escapes every control character, DEL and, being ASCII-only, the
    # Unicode line breaks (U+0085, U+2028, U+2029), so a quoted value never spans two lines.
    return text if _PLAIN.fullmatch(text) else json.dumps(text)


def render(event: str, fields: Mapping[str, object]) -> str:
    return " ".join([event, *(f"{key}={_value(value)}" for key, value in fields.items())])


class EventLog:
    """``log.warn("auth failed", client=ip, user=name)`` writes ``auth failed client=... user=...``."""

    def __init__(self, namespace: str) -> None:
        self._log = Logger(namespace=namespace)

    def emit(self, level: LogLevel, event: str, **fields: object) -> None:
        self._log.emit(level, "{relayproxy_text}", relayproxy_text=render(event, fields), relayproxy_event=event, relayproxy_fields=fields)

    def info(self, event: str, **fields: object) -> None:
        self.emit(LogLevel.info, event, **fields)

    def warn(self, event: str, **fields: object) -> None:
        self.emit(LogLevel.warn, event, **fields)

    def error(self, event: str, **fields: object) -> None:
        self.emit(LogLevel.error, event, **fields)

    def failure(self, event: str, failure: Failure | None = None, **fields: object) -> None:
        """An unexpected exception (``failure``, or the one being handled): logged with its
        traceback, never shown to a client."""
        self._log.failure(
            "{relayproxy_text}", failure, LogLevel.critical,
            relayproxy_text=render(event, fields), relayproxy_event=event, relayproxy_fields=fields,
        )


class FirstSeen:
    """Which keys were seen in the last ``seconds``: to log an event that recurs all day (the same
    app logging in from the same address) when it is news, not every time."""

    def __init__(self, clock: IReactorTime, seconds: float, max_keys: int = 10_000) -> None:
        self._clock = clock
        self._seconds = seconds
        self._max_keys = max_keys
        self._seen: dict[Hashable, float] = {}

    def first(self, key: Hashable) -> bool:
        now = self._clock.seconds()
        seen = self._seen.get(key)
        if seen is not None and now - seen < self._seconds:
            return False
        if len(self._seen) >= self._max_keys:
            # Forgetting early only logs a line more.
            self._seen.clear()
        self._seen[key] = now
        return True


@implementer(ILogObserver)
class JSONLinesObserver:
    """One JSON object per line: ``time``, ``level``, ``event`` and the event's fields."""

    def __init__(self, out: IO[str] | None = None) -> None:
        self._out = out or sys.stdout

    def __call__(self, event: Mapping[str, Any]) -> None:
        record: dict[str, Any] = {
            "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(timespec="milliseconds"),
            "level": getattr(event.get("log_level"), "name", "info"),
        }
        if _EVENT in event:
            record["event"] = event[_EVENT]
            record.update({k: v if isinstance(v, int | float | bool) or v is None else str(v) for k, v in event[_FIELDS].items()})
        else:
            record["namespace"] = event.get("log_namespace", "-")
            record["message"] = formatEvent(dict(event))
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        # ensure_ascii writes control characters, DEL and the Unicode line breaks as
        # escapes, so no value, message or traceback can start a second line.
        self._out.write(json.dumps(record, ensure_ascii=True) + "\n")
        self._out.flush()
