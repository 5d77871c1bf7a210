"""The upstream side of SMTP as pure machines: replies framed strictly and matched, in order, to the
commands that asked for them, each checked against the codes that command may get; and the
handshake from the greeting to an authenticated session.

A reply nobody asked for (an injection, a server out of step) or one that does not fit its command
(221 after the final dot, 250 to DATA, 354 to RCPT) means the upstream cannot be trusted with the
next command: the caller fails the session and never reuses it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from relayproxy.smtp import sasl
from relayproxy.smtp.lines import LineBuffer, TooLong
from relayproxy.smtp.reply import MAX_LINE, Reply, ReplyError, ReplyParser

FITTING: dict[str, frozenset[int]] = {
    "greeting": frozenset({220}),
    "EHLO": frozenset({250}),
    "STARTTLS": frozenset({220}),
    "AUTH": frozenset({235, 334}),
    "RSET": frozenset({250}),
    "MAIL": frozenset({250}),
    "RCPT": frozenset({250, 251}),
    "DATA": frozenset({354}),
    "end-of-data": frozenset({250}),
    "QUIT": frozenset({221}),
}
"""The positive codes each step may get (RFC 5321 4.3.2, RFC 3207, RFC 4954); any 4xx or 5xx fits every step."""


class Unsolicited(ReplyError):
    """A reply arrived while no command waited for one."""


class Unfitting(ReplyError):
    """A reply code the command cannot get."""


class ClientSession:
    def __init__(self) -> None:
        self._lines = LineBuffer(MAX_LINE)
        self._parser = ReplyParser()
        self._expected: deque[str] = deque(["greeting"])

    def command(self, step: str) -> None:
        """A command of ``step`` (a key of FITTING) is being sent: its reply comes after the others'."""
        self._expected.append(step)

    def feed(self, data: bytes) -> None:
        self._lines.feed(data)

    def next_reply(self) -> tuple[str, Reply] | None:
        """The next complete reply and the step it answers, or None until one is complete.

        One at a time, so the caller can act on a reply (start TLS after 220) before reading what
        followed it: bytes after the 220 to STARTTLS came in plaintext and must not be trusted.
        """
        while True:
            line = self._lines.next_line()
            if isinstance(line, TooLong) or self._lines.overflowing:
                # Bounded memory: a hostile upstream's 60 MB line fails as it arrives.
                raise ReplyError("reply line too long")
            if line is None:
                return None
            reply = self._parser.line(line)
            if reply is None:
                if not self._expected:
                    raise Unsolicited("a reply began while no command was waiting")
                continue
            if not self._expected:
                raise Unsolicited(f"reply {reply} while no command was waiting")
            step = self._expected.popleft()
            if reply.code < 400 and reply.code not in FITTING[step]:
                raise Unfitting(f"reply {reply} does not fit {step}")
            return step, reply

    @property
    def waiting(self) -> int:
        """Commands sent whose replies have not come."""
        return len(self._expected)

    @property
    def partial(self) -> bool:
        """Bytes that are not a complete reply yet, or a multi-line reply begun."""
        return self._lines.partial or self._parser.in_progress


# -- the handshake: greeting to an authenticated session ---------------------------------------


@dataclass(frozen=True)
class Command:
    step: str
    line: bytes


@dataclass(frozen=True)
class StartTLS:
    """Start the TLS handshake, then call ``Handshake.secured``."""


@dataclass(frozen=True)
class NeedToken:
    """Fetch an access token, then call ``Handshake.token``."""

    revoked: str | None = None
    """A token the upstream just refused: not to be handed out again."""


@dataclass(frozen=True)
class Ready:
    extensions: dict[str, str]


@dataclass(frozen=True)
class Refused:
    """The session cannot be had. ``kind`` names what failed for the client's reply: "unreachable",
    "tls" or "auth"; ``failover``: another host of the upstream may do better."""

    kind: str
    step: str
    detail: str
    failover: bool
    reply: Reply | None = None
    revoked: str | None = None
    """A token the upstream refused: not to be handed out again."""


HandshakeStep = Command | StartTLS | NeedToken | Ready | Refused


@dataclass(frozen=True)
class Login:
    """The central credentials: a password for PLAIN or LOGIN, or a user for XOAUTH2's token."""

    username: str
    password: str | None = field(default=None, repr=False)
    """None: XOAUTH2 (RFC 7628 as Google and Microsoft take it)."""


class Handshake:
    """Greeting, EHLO, STARTTLS (RFC 3207), EHLO again, AUTH (RFC 4954): each reply in, the next step out."""

    def __init__(self, where: str, ehlo: bytes, starttls: bool, login: Login | None) -> None:
        self._where = where
        self._ehlo = ehlo
        self._starttls = starttls
        self._login = login
        self._expect = "greeting"
        self._extensions: dict[str, str] = {}
        self._secured = False
        self._token = ""
        self._attempt = 0
        self._login_fields: list[str] = []

    def receive(self, reply: Reply) -> HandshakeStep:
        expect = self._expect
        if expect == "greeting":
            if reply.code != 220:
                return self._refused("unreachable", "greeting", reply)
            return self._send("EHLO", self._ehlo)
        if expect == "EHLO":
            if reply.code != 250:
                return self._refused("unreachable", "EHLO after STARTTLS" if self._secured else "EHLO", reply)
            self._extensions = _extensions(reply)
            if self._starttls and not self._secured:
                if "STARTTLS" not in self._extensions:
                    # Also what a downgrade attack looks like: never continue in plaintext.
                    return Refused("tls", "STARTTLS", f"{self._where} does not offer STARTTLS", True)
                return self._send("STARTTLS", b"STARTTLS")
            return self._authenticate()
        if expect == "STARTTLS":
            if reply.code != 220:
                return self._refused("tls", "STARTTLS", reply)
            return StartTLS()
        return self._auth_reply(reply)

    def secured(self) -> HandshakeStep:
        self._secured = True
        return self._send("EHLO", self._ehlo)

    def token(self, token: str) -> HandshakeStep:
        self._token = token
        self._attempt += 1
        self._expect = "XOAUTH2"
        # Sent after the 334, not on the AUTH line: a long token would pass 512 octets.
        return Command("AUTH", b"AUTH XOAUTH2")

    @property
    def extensions(self) -> dict[str, str]:
        return self._extensions

    def _send(self, step: str, line: bytes) -> Command:
        self._expect = step
        return Command(step, line)

    def _refused(self, kind: str, step: str, reply: Reply) -> Refused:
        # A 4xx may go better at the next host; a 5xx would be the same there.
        return Refused(kind, step.split()[0], f"{self._where}: {step} refused: {reply}", reply.is_temporary, reply)

    def _authenticate(self) -> HandshakeStep:
        login = self._login
        if login is None:
            return Ready(self._extensions)
        offered = self._extensions.get("AUTH", "")
        mechanisms = offered.split()
        if login.password is None:
            if "XOAUTH2" not in mechanisms:
                return Refused("auth", "AUTH", f"upstream does not offer AUTH XOAUTH2 (AUTH {offered or 'absent'})", False)
            return NeedToken()
        # Details name the reply only: the command lines carry the secret.
        if "PLAIN" in mechanisms:
            self._expect = "AUTH"
            return Command("AUTH", b"AUTH PLAIN " + sasl.encode_plain(login.username, login.password).encode())
        if "LOGIN" in mechanisms:
            self._expect = "AUTH"
            self._login_fields = [login.username, login.password]
            return Command("AUTH", b"AUTH LOGIN")
        return Refused("auth", "AUTH", f"upstream offers no PLAIN or LOGIN (AUTH {' '.join(mechanisms) or 'absent'})", False)

    def _auth_reply(self, reply: Reply) -> HandshakeStep:
        assert self._login is not None
        username = self._login.username
        if reply.code == 235:
            return Ready(self._extensions)
        if self._expect == "XOAUTH2":
            if reply.code == 334:
                self._expect = "XOAUTH2 error"
                return Command("AUTH", sasl.xoauth2_initial_response(username, self._token).encode("ascii"))
        elif self._expect == "XOAUTH2 error":
            if reply.code == 334:
                # RFC 7628 3.2.3: the server's error comes as a challenge; an empty line ends it.
                self._expect = "XOAUTH2 end"
                return Command("AUTH", b"")
        elif self._login_fields and reply.code == 334:
            return Command("AUTH", sasl.encode(self._login_fields.pop(0)).encode())
        if self._login.password is not None:
            return Refused("auth", "AUTH", f"upstream refused the credentials for {username}: {reply}", reply.is_temporary, reply)
        if self._attempt == 1 and not reply.is_temporary:
            # A cached token the provider revoked before its expiry: one fresh one.
            return NeedToken(revoked=self._token)
        detail = f"upstream refused the access token for {username}: {reply}"
        return Refused("auth", "AUTH", detail, reply.is_temporary, reply, revoked=self._token)


def _extensions(ehlo: Reply) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in ehlo.lines[1:]:
        keyword, _, params = line.partition(" ")
        found[keyword.upper()] = params.upper()
    return found
