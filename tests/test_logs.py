"""One event is one log line, in the key=value text twistd writes and in JSON lines, whatever a
client put into a logged value (a user name is whatever AUTH decoded to)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
from twisted.logger import globalLogPublisher, textFileLogObserver

from relayproxy.logs import EventLog, JSONLinesObserver, render

# A line break for a log reader (LF, CR, the Unicode ones str.splitlines knows), a terminal
# escape sequence, NUL, DEL and the C1 control U+0085.
HOSTILE = ["alice\n", "a\rb", "\x1b[31m", "a\x00b", "a\x7fb", "a\x85b", "a\u2028b", "a\u2029b", "a\x0bb", "a\x1cb"]


@pytest.fixture
def text_and_json() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """What twistd's own text observer and the JSON-lines observer write for each event."""
    text, jsonl = io.StringIO(), io.StringIO()
    observers = [textFileLogObserver(text), JSONLinesObserver(jsonl)]
    for observer in observers:
        globalLogPublisher.addObserver(observer)
    yield text, jsonl
    for observer in observers:
        globalLogPublisher.removeObserver(observer)


@pytest.mark.parametrize("value", HOSTILE)
def test_a_value_with_a_control_character_is_quoted_and_escaped(value: str) -> None:
    line = render("auth failed", {"client": "192.0.2.1", "user": value, "reason": "bad credentials"})
    assert line == f'auth failed client=192.0.2.1 user={json.dumps(value)} reason="bad credentials"'
    assert line.isprintable() and len(line.splitlines()) == 1


def test_plain_values_stay_unquoted() -> None:
    assert render("auth ok", {"user": "app1", "client": "2001:db8::1", "from": "<a@example.org>"}) == (
        "auth ok user=app1 client=2001:db8::1 from=<a@example.org>"
    )


@pytest.mark.parametrize("value", HOSTILE)
def test_one_event_is_one_line_in_text_and_json(value: str, text_and_json: tuple[io.StringIO, io.StringIO]) -> None:
    text, jsonl = text_and_json
    EventLog("relayproxy.test").warn("auth failed", client="192.0.2.1", user=value)
    [line] = text.getvalue().splitlines()
    assert line.endswith(f"[relayproxy.test#warn] auth failed client=192.0.2.1 user={json.dumps(value)}")
    [record] = jsonl.getvalue().splitlines()
    assert record.isprintable() and f'"user": {json.dumps(value)}' in record
    assert json.loads(record)["user"] == value
