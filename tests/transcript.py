"""Dialogue transcripts (tests/dialogues/*.smtp): parse one, run it against the proxy in memory.

The format is described in tests/dialogues/README.md. A run is one of the split modes: ``whole``
(each block of client bytes in one read, each block of upstream replies in one write), ``bytewise``
(every byte on its own) or ``random-N`` (pieces of random length, seeded with N). The proxy's side is
tests/dialogue.py: the real SMTPServerProtocol, relay and SMTPUpstream, with a scripted upstream server.
"""

from __future__ import annotations

import codecs
import inspect
import random
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dialogue import HOSTNAME, UPSTREAM, USERS, MemoryClient, MemoryUpstream, ScriptedServer, World

from relayproxy.config import LimitsConfig, ServerConfig, UpstreamConfig, UserConfig
from relayproxy.smtp.reply import Catalogue, Reply

MODES = ("whole", "bytewise", "random-1", "random-2", "random-3")
"""The modes every transcript runs in."""

_STEP = re.compile(r"^(?P<actor>[cu]\d*) (?P<op>->|=>|~>|\*>|<-|<~|<=|<\.\.\.|<\||<\?|![a-z]+|\?[a-z]+)(?: (?P<text>.*))?$")
_GLOBAL = re.compile(r"^(?P<op>advance|timers) (?P<text>.+)$")
_BLOCKS = {("c", "->"): "send", ("c", "~>"): "send", ("c", "*>"): "send", ("c", "=>"): "packet", ("u", "->"): "answer", ("u", "~>"): "answer", ("u", "<|"): "write"}
_OPS = {
    "c": {"->", "=>", "~>", "*>", "<-", "<~", "<=", "<...", "!connect", "!closed", "!open", "!silent", "!tls", "!drop", "?user"},
    "u": {"->", "~>", "<-", "<~", "<|", "<?", "!closed", "!aborted", "!open", "!drop"},
}


class TranscriptError(Exception):
    """The transcript itself is malformed."""


class Mismatch(AssertionError):
    """The proxy did not do what the transcript says."""


@dataclass
class Step:
    number: int
    """Its line in the file."""
    source: str
    side: str
    """"c", "u", or "" for the clock steps."""
    index: int
    """Which client or upstream connection (1 for ``c`` and ``u``)."""
    op: str
    text: str
    block: int = -1
    """Steps of one block (consecutive, same actor and kind) share this; -1: a step alone."""

    @property
    def actor(self) -> str:
        return f"{self.side}{self.index if self.index > 1 else ''}"


@dataclass
class Profile:
    server: ServerConfig = ServerConfig(HOSTNAME)
    tls: str = "none"
    allow_plaintext_auth: bool = True
    certificate: bool = False
    limits: LimitsConfig = LimitsConfig()
    users: dict[str, UserConfig] = field(default_factory=dict)
    passwords: dict[str, str] = field(default_factory=lambda: dict(USERS))
    upstream: MemoryUpstream = field(default_factory=MemoryUpstream)
    peer: str = "192.0.2.7"


@dataclass
class Transcript:
    path: Path
    profile: dict[str, Any]
    steps: list[Step]
    last_line: int

    @property
    def name(self) -> str:
        return self.path.name


# -- parsing ------------------------------------------------------------------------------------


def parse(path: Path) -> Transcript:
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    start = 0
    profile: dict[str, Any] = {}
    if "---" in lines:
        start = lines.index("---") + 1
        try:
            profile = tomllib.loads("\n".join(lines[: start - 1]))
        except tomllib.TOMLDecodeError as e:
            raise TranscriptError(f"{path}: the profile is not valid TOML: {e}") from None
    steps: list[Step] = []
    previous: tuple[str, int, str] | None = None
    block = 0
    for number, raw in enumerate(lines[start:], start + 1):
        line = raw.rstrip("\r")
        if not line.strip():
            previous = None  # a blank line ends a block
            continue
        if line.lstrip().startswith("#"):
            continue
        step = _step(path, number, line)
        key = _BLOCKS.get((step.side, step.op))
        if key is not None:
            if previous != (step.side, step.index, key):
                block += 1
            step.block = block
            previous = (step.side, step.index, key)
        else:
            previous = None
        steps.append(step)
    return Transcript(path, profile, steps, len(lines))


def _step(path: Path, number: int, line: str) -> Step:
    m = _STEP.match(line)
    if m is not None:
        side, index = m["actor"][0], int(m["actor"][1:] or 1)
        op, text = m["op"], m["text"] or ""
        if op not in _OPS[side]:
            raise TranscriptError(f"{path}:{number}: {side} has no operation {op!r}")
        return Step(number, line, side, index, op, text)
    m = _GLOBAL.match(line)
    if m is not None:
        return Step(number, line, "", 0, m["op"], m["text"])
    raise TranscriptError(f"{path}:{number}: not a step: {line!r}")


def _dataclass(cls: Any, values: dict[str, Any], where: str, **fixed: Any) -> Any:
    known = {f.name for f in fields(cls)} - set(fixed)
    unknown = set(values) - known
    if unknown:
        raise TranscriptError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    return cls(**fixed, **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def build_profile(transcript: Transcript) -> Profile:
    where = str(transcript.path)
    data = dict(transcript.profile)
    profile = Profile()
    unknown = set(data) - {"server", "listener", "limits", "users", "upstream", "client"}
    if unknown:
        raise TranscriptError(f"{where}: unknown profile tables {sorted(unknown)}")
    server = dict(data.get("server", {}))
    profile.server = _dataclass(ServerConfig, server, f"{where} [server]", hostname=server.pop("hostname", HOSTNAME))
    listener = dict(data.get("listener", {}))
    profile.tls = listener.pop("tls", "none")
    profile.allow_plaintext_auth = listener.pop("allow_plaintext_auth", True)
    profile.certificate = listener.pop("certificate", False)
    if listener:
        raise TranscriptError(f"{where} [listener]: unknown keys {sorted(listener)} (known: tls, allow_plaintext_auth, certificate)")
    profile.limits = _dataclass(LimitsConfig, data.get("limits", {}), f"{where} [limits]")
    for name, values in data.get("users", {}).items():
        values = dict(values)
        if "password" in values:
            profile.passwords[name] = values.pop("password")
        profile.users[name] = _dataclass(UserConfig, values, f"{where} [users.{name}]", name=name)
    upstream = dict(data.get("upstream", {}))
    script = {key: upstream.pop(key) for key in ("extensions", "greeting", "handshake", "auth_reply", "unreachable") if key in upstream}
    if "extensions" in script:
        script["extensions"] = tuple(script["extensions"])
    config = _dataclass(UpstreamConfig, upstream, f"{where} [upstream]", name=UPSTREAM.name, host=UPSTREAM.host, port=UPSTREAM.port, tls="none")
    profile.upstream = MemoryUpstream(config=config, **script)
    client = dict(data.get("client", {}))
    profile.peer = client.pop("peer", profile.peer)
    if client:
        raise TranscriptError(f"{where} [client]: unknown keys {sorted(client)} (known: peer)")
    return profile


def catalogue_reply(entry: str, hostname: str) -> Reply:
    """``NAME`` or ``name(arg, ...)``: a Catalogue reply; a function of the hostname alone needs no argument."""
    m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:\((.*)\))?", entry.strip())
    if m is None:
        raise TranscriptError(f"not a Catalogue entry: {entry!r}")
    name, arguments = m[1], m[2]
    value = getattr(Catalogue, name, None)
    if isinstance(value, Reply):
        if arguments is not None:
            raise TranscriptError(f"Catalogue.{name} takes no arguments")
        return value
    if not callable(value):
        raise TranscriptError(f"no Catalogue entry {name!r}")
    args = [a.strip() for a in arguments.split(",")] if arguments else []
    parameters = list(inspect.signature(value).parameters)
    if not args and parameters == ["hostname"]:
        args = [hostname]
    if len(args) != len(parameters):
        raise TranscriptError(f"Catalogue.{name} takes ({', '.join(parameters)})")
    reply = value(*args)
    assert isinstance(reply, Reply)
    return reply


def unescape(text: str) -> bytes:
    """``~>`` text: Python escapes (\\r \\n \\t \\\\ \\xHH) over UTF-8."""
    return codecs.escape_decode(text.encode("utf-8"))[0]  # type: ignore[attr-defined,no-any-return]


# -- splitting ----------------------------------------------------------------------------------


class Splitter:
    def __init__(self, mode: str, max_piece: int = 24) -> None:
        if mode not in ("whole", "bytewise") and not re.fullmatch(r"random-\d+", mode):
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode
        self.whole = mode == "whole"
        self._random = random.Random(int(mode.split("-")[1])) if mode.startswith("random-") else None
        self._max = max_piece

    def pieces(self, data: bytes) -> Iterator[bytes]:
        if self.whole or not data:
            yield data
        elif self._random is None:
            for i in range(len(data)):
                yield data[i : i + 1]
        else:
            i = 0
            while i < len(data):
                n = self._random.randint(1, self._max)
                yield data[i : i + n]
                i += n


# -- running ------------------------------------------------------------------------------------


def _relative(path: Path) -> Path:
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


def _show(data: bytes) -> str:
    return repr(data.decode("ascii", "backslashreplace"))


@dataclass
class _Answer:
    """An upstream answer block: its replies, one unit each, delivered in order."""

    steps: list[Step]
    units: list[tuple[bytes, bool, Step]]
    """Bytes, whether they must answer something (``->``; ``~>`` is sent unchecked), the step."""
    sent: int = 0


class Run:
    def __init__(self, transcript: Transcript, mode: str, max_piece: int = 24) -> None:
        self.t = transcript
        self.mode = mode
        self.split = Splitter(mode, max_piece)
        profile = build_profile(transcript)
        self.hostname = profile.server.hostname
        self.world = World(
            tls=profile.tls, allow_plaintext_auth=profile.allow_plaintext_auth, upstream=profile.upstream,
            limits=profile.limits, server=profile.server, users=profile.users, passwords=profile.passwords,
            tls_options=object() if profile.certificate else None,
        )
        self.upstream = profile.upstream
        self.clients: dict[int, MemoryClient] = {1: self.world.connect(profile.peer)}
        self.read: dict[int, int] = {1: 0}
        """How much of each client's output the transcript has read."""
        self.cursor: dict[int, int] = {}
        """How many lines of each upstream connection the transcript has read."""
        self.answers: dict[int, _Answer] = {}
        steps = transcript.steps
        for step in steps:
            if step.side == "u" and step.op in ("->", "~>"):
                answer = self.answers.setdefault(step.block, _Answer([], []))
                answer.steps.append(step)
        for answer in self.answers.values():
            answer.units = _units(answer.steps)

    # -- failing ------------------------------------------------------------------------------

    def fail(self, step: Step | None, message: str) -> Mismatch:
        where = f"{_relative(self.t.path)}:{step.number if step else self.t.last_line}"
        head = f"{where} [{self.mode}]: " + (step.source if step else "(end of transcript)")
        return Mismatch(f"{head}\n  {message}")

    # -- the client's side --------------------------------------------------------------------

    def client(self, step: Step) -> MemoryClient:
        client = self.clients.get(step.index)
        if client is None:
            raise self.fail(step, f"client {step.actor} has not connected (use `{step.actor} !connect`)")
        return client

    def unread(self, index: int) -> bytes:
        return self.clients[index].transport.value()[self.read[index] :]

    def next_line(self, step: Step) -> str | None:
        data = self.unread(step.index)
        end = data.find(b"\r\n")
        if end < 0:
            return None
        self.read[step.index] += end + 2
        return data[:end].decode("ascii", "backslashreplace")

    def expect_line(self, step: Step, check: Any, expected: str) -> None:
        before = self.unread(step.index)
        line = self.next_line(step)
        if line is None:
            got = f"nothing more (unterminated: {_show(before)})" if before else "nothing more"
            raise self.fail(step, f"expected {expected}\n  got      {got}")
        if not check(line):
            raise self.fail(step, f"expected {expected}\n  got      {line!r}\n  unread after it: {_show(self.unread(step.index))}")

    # -- the upstream's side ------------------------------------------------------------------

    def connection(self, step: Step) -> ScriptedServer:
        connections = self.upstream.connections
        if step.index > len(connections):
            raise self.fail(step, f"the proxy opened {len(connections)} upstream connection(s), not {step.actor}")
        self.cursor.setdefault(step.index, 0)
        return connections[step.index - 1]

    def upstream_line(self, step: Step, position: int, optional: bool = False) -> Any:
        """The next unread line of the step's connection; in the split modes, upstream answers later in
        this run of upstream steps are sent early when the line waits for them."""
        server = self.connection(step)
        while self.cursor[step.index] >= len(server.lines):
            if optional or self.split.whole or not self.send_early(step.index, position):
                return None
        line = server.lines[self.cursor[step.index]]
        return line

    def send_early(self, index: int, position: int) -> bool:
        steps = self.t.steps
        for later in steps[position + 1 :]:
            if later.side != "u":
                return False
            answer = self.answers.get(later.block) if later.op in ("->", "~>") else None
            if answer is not None and later.index == index and answer.sent < len(answer.units):
                self.send_unit(answer, later)
                return True
        return False

    def send_unit(self, answer: _Answer, step: Step) -> None:
        data, checked, origin = answer.units[answer.sent]
        server = self.connection(step)
        self.check_answer(origin, server, data, checked)
        answer.sent += 1
        if checked:
            server.replied(data)
        for piece in self.split.pieces(data):
            server.deliver(piece)
            self.world.pump()

    def check_answer(self, step: Step, server: ScriptedServer, data: bytes, checked: bool) -> None:
        if server.gone:
            raise self.fail(step, f"upstream {step.actor}'s connection is closed: it cannot answer")
        finals = sum(1 for line in data.split(b"\r\n")[:-1] if line[3:4] != b"-") if checked else 0
        if finals > len(server.outstanding):
            waiting = [line.decode("ascii", "backslashreplace") for line in server.outstanding]
            raise self.fail(step, f"the upstream answers {finals} command(s) here, but only {len(waiting)} wait(s) for a reply: {waiting}")

    def unread_upstream(self, index: int) -> list[str]:
        server = self.upstream.connections[index - 1]
        return [line.text.decode("ascii", "backslashreplace") for line in server.lines[self.cursor.get(index, 0) :]]

    # -- the steps ----------------------------------------------------------------------------

    def run(self) -> None:
        steps = self.t.steps
        i = 0
        while i < len(steps):
            step = steps[i]
            if step.block >= 0:
                end = i
                while end + 1 < len(steps) and steps[end + 1].block == step.block:
                    end += 1
                self.block(steps[i : end + 1], end)
                i = end + 1
            else:
                self.single(step, i)
                i += 1
            self.world.pump()
        self.finish()

    def block(self, block: list[Step], position: int) -> None:
        first = block[0]
        if first.side == "c":
            client = self.client(first)
            data = b"".join(client_bytes(self.t, s) for s in block)
            pieces = [data] if first.op == "=>" else self.split.pieces(data)
            for piece in pieces:
                client.send(piece)
                self.world.pump()
        elif first.op in ("->", "~>"):
            answer = self.answers[first.block]
            server = self.connection(first)
            if self.split.whole:
                data = b"".join(unit for unit, _, _ in answer.units)
                for unit, checked, origin in answer.units:
                    self.check_answer(origin, server, unit, checked)
                    if checked:
                        server.replied(unit)
                answer.sent = len(answer.units)
                server.deliver(data)
            else:
                while answer.sent < len(answer.units):
                    self.send_unit(answer, first)
                    self.world.pump()
        else:  # u <| : one write, exactly these lines (whole mode); else each as u <-
            received = []
            for offset, step in enumerate(block):
                line = self.upstream_line(step, position)
                if line is None or line.text != step.text.encode("utf-8"):
                    self.upstream_mismatch(step, line, repr(step.text))
                received.append(line)
                self.cursor[step.index] += 1
            if self.split.whole:
                writes = {line.first_write for line in received} | {line.last_write for line in received}
                if len(writes) != 1 or not received[0].starts_write or not received[-1].ends_write:
                    server = self.connection(first)
                    shown = [_show(server.writes[w]) for w in sorted(writes)]
                    raise self.fail(first, f"expected these {len(block)} line(s) as one write of their own\n  got writes {', '.join(shown)}")

    def upstream_mismatch(self, step: Step, line: Any, expected: str) -> None:
        server = self.connection(step)
        if line is None:
            got = "nothing more" + (f" (a partial line: {_show(server.partial)})" if server.partial else "")
        else:
            got = repr(line.text.decode("ascii", "backslashreplace"))
        waiting = [w.decode("ascii", "backslashreplace") for w in server.outstanding]
        raise self.fail(step, f"expected the upstream to receive {expected}\n  got      {got}\n  awaiting a reply: {waiting}")

    def single(self, step: Step, position: int) -> None:
        op, text = step.op, step.text
        if step.side == "":
            if op == "advance":
                self.world.advance(float(text))
            else:
                pending = [call for call in self.world.clock.getDelayedCalls() if call.active()]
                wanted = 0 if text == "none" else int(text)
                if len(pending) != wanted:
                    raise self.fail(step, f"expected {wanted} pending timer(s), got {len(pending)}: {pending}")
            return
        if step.side == "c":
            self.client_step(step, op, text)
        else:
            self.upstream_step(step, op, text, position)

    def client_step(self, step: Step, op: str, text: str) -> None:
        if op == "!connect":
            if step.index in self.clients or step.index != max(self.clients) + 1:
                raise TranscriptError(f"{self.t.path}:{step.number}: clients connect in order, each once")
            self.clients[step.index] = self.world.connect(text or "192.0.2.7")
            self.read[step.index] = 0
            return
        client = self.client(step)
        if op == "<-":
            self.expect_line(step, lambda line: line == text, repr(text))
        elif op == "<~":
            self.expect_line(step, lambda line: re.fullmatch(text, line) is not None, f"a line matching {text!r}")
        elif op == "<=":
            try:
                reply = catalogue_reply(text, self.hostname)
            except TranscriptError as e:
                raise TranscriptError(f"{self.t.path}:{step.number}: {e}") from None
            for wanted in reply.to_bytes().decode("ascii").split("\r\n")[:-1]:
                self.expect_line(step, lambda line, wanted=wanted: line == wanted, f"{wanted!r} (Catalogue {text})")
        elif op == "<...":
            while True:
                before = self.unread(step.index)
                line = self.next_line(step)
                if line is None:
                    raise self.fail(step, f"no line matching {text!r} came (skipped to the end: {_show(before)})")
                if re.fullmatch(text, line) is not None:
                    break
        elif op == "!closed":
            if not client.closed:
                raise self.fail(step, "expected the proxy to have closed the connection; it is open")
        elif op == "!open":
            if client.closed or client.lost:
                raise self.fail(step, "expected the connection open; the proxy closed it" if client.closed else "the client dropped it")
        elif op == "!silent":
            if self.unread(step.index):
                raise self.fail(step, f"expected nothing (more) from the proxy; unread: {_show(self.unread(step.index))}")
        elif op == "!tls":
            if client.transport.tls_started is None:
                raise self.fail(step, "expected the proxy to have started TLS")
        elif op == "!drop":
            client.drop()
        elif op == "?user":
            relay = client.protocol.relay
            user = relay.user.name if relay is not None and relay.user is not None else "-"
            if user != text:
                raise self.fail(step, f"expected the session's user {text!r}, got {user!r}")

    def upstream_step(self, step: Step, op: str, text: str, position: int) -> None:
        if op in ("<-", "<~"):
            line = self.upstream_line(step, position)
            if op == "<-":
                matches = line is not None and line.text == text.encode("utf-8")
            else:
                matches = line is not None and re.fullmatch(text, line.text.decode("ascii", "backslashreplace")) is not None
            if not matches:
                self.upstream_mismatch(step, line, repr(text) if op == "<-" else f"a line matching {text!r}")
            self.cursor[step.index] += 1
            return
        if op == "<?":
            line = self.upstream_line(step, position, optional=True)
            if line is not None and line.text == text.encode("utf-8"):
                self.cursor[step.index] += 1
            return
        server = self.connection(step)
        if op == "!closed":
            if not server.closed:
                state = "aborted it" if server.aborted else "dropped" if server.dropped else "open"
                raise self.fail(step, f"expected the proxy to have closed upstream {step.actor} politely; it is {state}")
        elif op == "!aborted":
            if not server.aborted:
                state = "closed politely" if server.closed else "dropped" if server.dropped else "open"
                raise self.fail(step, f"expected the proxy to have aborted upstream {step.actor}; it is {state}")
        elif op == "!open":
            if server.gone:
                raise self.fail(step, f"expected upstream {step.actor} open; it is {'aborted' if server.aborted else 'closed'}")
        elif op == "!drop":
            server.drop()

    def finish(self) -> None:
        for index in self.clients:
            if self.unread(index):
                raise self.fail(None, f"client {'c' if index == 1 else f'c{index}'} has unread output: {_show(self.unread(index))}")
        mentioned = {step.index for step in self.t.steps if step.side == "u"}
        for number, server in enumerate(self.upstream.connections, 1):
            name = "u" if number == 1 else f"u{number}"
            if number not in mentioned:
                what = [line.text.decode("ascii", "backslashreplace") for line in server.lines]
                raise self.fail(None, f"the proxy opened upstream connection {name}, which the transcript does not show (it received {what})")
            unread = self.unread_upstream(number)
            if unread:
                raise self.fail(None, f"upstream {name} received lines the transcript does not show: {unread}")


def client_bytes(transcript: Transcript, step: Step) -> bytes:
    """What a ``c ->``, ``c =>``, ``c ~>`` or ``c *>`` step sends."""
    if step.op == "~>":
        return unescape(step.text)
    if step.op == "*>":
        count, _, text = step.text.partition(" ")
        if not count.isdigit():
            raise TranscriptError(f"{transcript.path}:{step.number}: `*>` takes a count and the bytes to repeat")
        return unescape(text) * int(count)
    return step.text.encode("utf-8") + b"\r\n"


def sent(path: Path, block: int = 0) -> bytes:
    """The bytes of the transcript's ``block``-th block of client bytes (for tests that replay it)."""
    transcript = parse(path)
    blocks: dict[int, list[Step]] = {}
    for step in transcript.steps:
        if step.side == "c" and step.op in ("->", "=>", "~>", "*>"):
            blocks.setdefault(step.block, []).append(step)
    steps = list(blocks.values())[block]
    return b"".join(client_bytes(transcript, step) for step in steps)


def _units(steps: list[Step]) -> list[tuple[bytes, bool, Step]]:
    """One unit per reply: ``->`` lines up to a final line (code and a space, or the code alone); each ``~>`` alone."""
    units: list[tuple[bytes, bool, Step]] = []
    pending = b""
    first: Step | None = None
    for step in steps:
        if step.op == "~>":
            units.append((unescape(step.text), False, step))
            continue
        line = step.text.encode("utf-8")
        first = first or step
        pending += line + b"\r\n"
        if line[3:4] != b"-":
            units.append((pending, True, first))
            pending, first = b"", None
    if pending:
        assert first is not None
        raise TranscriptError(f"{first.number}: the upstream's reply ends in a continuation line")
    return units


def run(path: Path, mode: str, max_piece: int = 24) -> None:
    """Run the transcript at ``path`` in ``mode``; raises Mismatch naming file:line on the first difference."""
    transcript = parse(path)
    Run(transcript, mode, max_piece).run()
