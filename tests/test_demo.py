"""`relayproxy demo` as a newcomer runs it: a real process, a message sent with smtplib, the stand-in's printout."""

from __future__ import annotations

import re
import signal
import smtplib
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from harness import free_port, wait_for
from test_check import check
from test_twistd import environment


@dataclass
class Demo:
    process: subprocess.Popen[str]
    directory: Path
    port: int
    lines: list[str] = field(default_factory=list)

    def read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(list(self.lines))

    def wait_for_line(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        found: list[re.Match[str]] = []

        def seen() -> bool:
            assert self.process.poll() is None, self.output()
            found[:] = [m for m in (re.search(pattern, line) for line in list(self.lines)) if m][:1]
            return bool(found)

        wait_for(seen, timeout=timeout)
        return found[0]

    def printed_message(self, number: int) -> tuple[str, list[str]]:
        """The header line the stand-in printed for message ``number``, and the message's lines."""
        self.wait_for_line(r"^=== end of message ===$")
        lines = list(self.lines)
        start = next(i for i, line in enumerate(lines) if re.match(rf"^=== stand-in .* message {number}: ", line))
        end = lines.index("=== end of message ===", start)
        return lines[start], lines[start + 1 : end]


DemoFactory = Callable[..., Demo]
"""``run_demo("--graph")``: start ``relayproxy demo`` with free ports and wait until it serves."""


@pytest.fixture
def run_demo(tmp_path: Path) -> Iterator[DemoFactory]:
    started: list[Demo] = []

    def run(*options: str) -> Demo:
        port = free_port()
        standin = ["--graph-port", str(free_port())] if "--graph" in options else ["--smarthost-port", str(free_port())]
        process = subprocess.Popen(
            [sys.executable, "-u", "-m", "relayproxy", "demo", "--dir", str(tmp_path / "demo"), "--port", str(port),
             "--plain-port", str(free_port()), *standin, *options],
            env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        demo = Demo(process, tmp_path / "demo", port)
        threading.Thread(target=demo.read, daemon=True).start()
        started.append(demo)
        demo.wait_for_line(r"^relayproxy demo is running")
        demo.wait_for_line(r"SMTPServerFactory starting on \d+")
        return demo

    yield run
    for demo in started:
        # SIGTERM, not Ctrl-C's SIGINT: a shell without job control starts background children
        # with SIGINT ignored, and Twisted then leaves it so.
        demo.process.send_signal(signal.SIGTERM)
        try:
            status = demo.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            demo.process.kill()
            demo.process.wait()
            raise AssertionError("relayproxy demo did not stop on SIGTERM") from None
        assert status == 0, demo.output()


def send(demo: Demo, data: bytes, recipients: list[str]) -> tuple[int, bytes]:
    """Log in as the demo prints it, then MAIL, RCPT and DATA with STARTTLS against the demo's CA."""
    password = demo.wait_for_line(r"demo login:\s+user demo\s+password (\S+)").group(1)
    smtp = smtplib.SMTP("127.0.0.1", demo.port, timeout=30)
    try:
        smtp.starttls(context=ssl.create_default_context(cafile=str(demo.directory / "demo-ca.pem")))
        smtp.login("demo", password)
        assert smtp.mail("demo@example.org")[0] == 250
        for recipient in recipients:
            assert smtp.rcpt(recipient)[0] == 250
        return smtp.data(data)
    finally:
        smtp.quit()


MESSAGE = b"From: demo@example.org\r\nTo: someone@example.net\r\nSubject: hello\r\n\r\nHello through relayproxy\r\n"


def test_demo_graph_sends_through_a_stand_in_graph(run_demo: DemoFactory) -> None:
    demo = run_demo("--graph")
    assert re.search(r"^  stand-in Graph: +https://localhost:\d+ \(token endpoint and sendMail", demo.output(), re.MULTILINE)
    code, text = send(demo, MESSAGE, ["someone@example.net", "bob@example.net"])
    match = re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9a-f-]{36})", text)
    assert code == 250 and match, (code, text)
    request_id = match.group(1).decode()
    header, message = demo.printed_message(1)
    assert header == (
        f"=== stand-in Graph sent message 1: as <demo@example.org> to <someone@example.net>, <bob@example.net>, "
        f"{len(MESSAGE) + len(b'Bcc: bob@example.net') + 2} bytes, answered 202 with request-id {request_id} ==="
    )
    # What the proxy handed Graph: the client's header, and the envelope recipient it does not name as Bcc.
    assert message == ["From: demo@example.org", "To: someone@example.net", "Subject: hello", "Bcc: bob@example.net", "", "Hello through relayproxy"]
    assert (demo.directory / "mail" / "0001.eml").read_bytes().endswith(b"\r\n\r\nHello through relayproxy\r\n")
    assert f'reply="250 2.0.0 Ok: queued as {request_id}"' in demo.output()

    # The demo's app holds Mail.Send, and relayproxy check reads it from the token.
    result = check(demo.directory / "relayproxy.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    [line] = [line for line in result.stdout.splitlines() if "upstream default" in line]
    assert line.startswith("ok   upstream default graph https://localhost:") and ", roles: Mail.Send, expires " in line, line


def test_demo_graph_answers_as_graph_does_for_another_sender(run_demo: DemoFactory) -> None:
    demo = run_demo("--graph")
    code, text = send(demo, MESSAGE.replace(b"From: demo@", b"From: boss@"), ["someone@example.net"])
    assert (code, text[:6]) == (550, b"5.7.60"), text
    assert not any(line.startswith("=== stand-in Graph sent message") for line in demo.lines)


def test_demo_sends_through_a_stand_in_smarthost(run_demo: DemoFactory) -> None:
    demo = run_demo()
    assert send(demo, MESSAGE, ["someone@example.net"]) == (250, b"2.0.0 Ok: queued as DEMO0001")
    header, message = demo.printed_message(1)
    assert header == (
        f"=== stand-in smarthost received message 1: from <demo@example.org> to <someone@example.net>, {len(MESSAGE)} bytes, "
        'answered "250 2.0.0 Ok: queued as DEMO0001" ==='
    )
    assert message == ["From: demo@example.org", "To: someone@example.net", "Subject: hello", "", "Hello through relayproxy"]


def test_demo_help_documents_graph() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "relayproxy", "demo", "--help"], check=False, env=environment(), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())
    assert "--graph put the proxy in front of a stand-in for Microsoft Graph" in help_text
    assert "--graph-port GRAPH_PORT" in help_text
