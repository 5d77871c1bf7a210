"""What an SMTP reply means and what to do about it, for operators.

The texts are data: ``relayproxy/explain_<language>.json`` holds the catalogue of replies the proxy
composes or relays (keyed by basic code, optional enhanced code and optional command), provider
notes chosen by the upstream's host name, and the templates of the one-line log hints. Another
language is another such file; this module only selects and formats.

- :func:`explain` answers "what does 535 5.7.8 mean" (``relayproxy explain 535 5.7.8``).
- :func:`hint` gives one short line for a log ``hint=`` field, chosen by who sent the reply and
  in which situation; it never raises.
- :func:`entries` lists the catalogue (tests, ``relayproxy explain --list``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import lru_cache
from importlib import resources
from typing import Any, Literal

from relayproxy.errors import UpstreamError
from relayproxy.smtp.reply import Reply

__all__ = [
    "COMMANDS",
    "HINT_TARGET",
    "MAX_HINT",
    "SITUATIONS",
    "CatalogueError",
    "Explanation",
    "codes_of",
    "entries",
    "explain",
    "hint",
    "labels",
    "languages",
    "normalize_command",
    "provider_name",
]

COMMANDS: tuple[str, ...] = (
    "greeting", "EHLO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "end-of-data",
    "QUIT", "RSET", "NOOP", "VRFY", "HELP",
)
"""The commands an entry can be keyed by; ``normalize_command`` maps spellings onto them."""

SITUATIONS: tuple[str, ...] = (
    "data-timeout", "data-disconnect", "data-rate", "command-timeout", "session-timeout", "unauthenticated-timeout",
    "upstream-no-smtputf8",
)
"""Values of ``hint(situation=...)`` with a dedicated hint; others are ignored."""

HINT_TARGET = 160
"""A hint with a provider note longer than this keeps only the first clause of its base text."""

MAX_HINT = 200
"""Hard cap on a hint's length (longer lines are cut with "...")."""

_ALIASES = {
    "helo": "EHLO", "lhlo": "EHLO", "banner": "greeting", "connect": "greeting",
    "end-of-data": "end-of-data", "end_of_data": "end-of-data", "end of data": "end-of-data",
    "eod": "end-of-data", "dot": "end-of-data", ".": "end-of-data", "body": "end-of-data",
    "mail from": "MAIL", "rcpt to": "RCPT",
}
_ANY = ("", "any", "*")
_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_LEADING_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})(?: |$)")
_LANGUAGE = re.compile(r"^[a-z]{2,3}(?:_[A-Z]{2})?$")


@dataclass(frozen=True)
class Explanation:
    """What a reply means, when it is seen and how to fix it.

    ``enhanced`` and ``command`` are those of the catalogue entry that matched, which may be less
    specific than what was asked (``None`` = any). ``provider_note`` is set when the upstream's host
    name belongs to a known provider with a note for this reply; ``provider`` names that provider.
    """

    code: int
    enhanced: str | None
    meaning: str
    when: str
    fix: str
    provider_note: str | None = None
    command: str | None = None
    hint: str = ""
    provider: str | None = None


# -- the data -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Note:
    codes: frozenset[int]
    enhanced: str | None
    command: str | None
    note: str
    short: str


@dataclass(frozen=True)
class _Provider:
    name: str
    hosts: tuple[str, ...]
    notes: tuple[_Note, ...]


@dataclass(frozen=True)
class _Catalogue:
    language: str
    labels: Mapping[str, Any]
    hints: Mapping[str, Any]
    entries: tuple[Explanation, ...]
    index: Mapping[tuple[int, str | None, str | None], Explanation]
    providers: tuple[_Provider, ...]


class CatalogueError(ValueError):
    """A language file is missing or malformed."""


def languages() -> tuple[str, ...]:
    """The languages with a data file (``explain_<language>.json``), sorted."""
    found = []
    for item in resources.files("relayproxy").iterdir():
        name = item.name
        if name.startswith("explain_") and name.endswith(".json"):
            found.append(name[len("explain_"):-len(".json")])
    return tuple(sorted(found))


@lru_cache(maxsize=None)
def _catalogue(language: str) -> _Catalogue:
    if not _LANGUAGE.match(language):
        raise CatalogueError(f"invalid language {language!r}")
    resource = resources.files("relayproxy").joinpath(f"explain_{language}.json")
    try:
        raw = json.loads(resource.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CatalogueError(
            f"no reply catalogue for language {language!r}; available: {', '.join(languages())}"
        ) from None
    except json.JSONDecodeError as e:
        raise CatalogueError(f"explain_{language}.json: not valid JSON: {e}") from None
    return _parse(language, raw)


def _parse(language: str, raw: Any) -> _Catalogue:
    where = f"explain_{language}.json"

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise CatalogueError(f"{where}: {what}")

    need(isinstance(raw, dict), "not a JSON object")
    for key in ("labels", "hints", "entries", "providers"):
        need(key in raw, f"missing {key!r}")
    need(isinstance(raw["labels"], dict) and isinstance(raw["hints"], dict), "labels and hints must be objects")

    def text(item: dict[str, Any], key: str, at: str) -> str:
        value = item.get(key)
        need(isinstance(value, str) and bool(value.strip()), f"{at}: {key!r} must be a non-empty string")
        return str(value)

    def key_of(item: dict[str, Any], at: str) -> tuple[str | None, str | None]:
        enhanced = item.get("enhanced")
        need(enhanced is None or (isinstance(enhanced, str) and _ENHANCED.match(enhanced) is not None),
             f"{at}: bad enhanced code {enhanced!r}")
        command = item.get("command")
        need(command is None or command in COMMANDS, f"{at}: unknown command {command!r}")
        return enhanced, command

    index: dict[tuple[int, str | None, str | None], Explanation] = {}
    for i, item in enumerate(raw["entries"]):
        at = f"entries[{i}]"
        need(isinstance(item, dict), f"{at}: not an object")
        code = item.get("code")
        need(isinstance(code, int) and 200 <= code <= 599, f"{at}: bad code {code!r}")
        enhanced, command = key_of(item, at)
        need(enhanced is None or enhanced[0] == str(code)[0], f"{at}: {enhanced} does not fit {code}")
        entry_key = (code, enhanced, command)
        need(entry_key not in index, f"{at}: duplicate entry for {entry_key}")
        index[entry_key] = Explanation(
            code=code, enhanced=enhanced, command=command,
            meaning=text(item, "meaning", at), when=text(item, "when", at), fix=text(item, "fix", at),
            hint=text(item, "hint", at),
        )

    providers = []
    for i, item in enumerate(raw["providers"]):
        at = f"providers[{i}]"
        need(isinstance(item, dict), f"{at}: not an object")
        hosts = item.get("hosts")
        need(isinstance(hosts, list) and all(isinstance(h, str) and h for h in hosts), f"{at}: bad hosts")
        notes = []
        for j, note in enumerate(item.get("notes", [])):
            nat = f"{at}.notes[{j}]"
            codes = note.get("codes")
            need(isinstance(codes, list) and bool(codes) and all(isinstance(c, int) for c in codes), f"{nat}: bad codes")
            enhanced, command = key_of(note, nat)
            notes.append(_Note(frozenset(codes), enhanced, command, text(note, "note", nat), text(note, "short", nat)))
        providers.append(_Provider(text(item, "name", at), tuple(h.lower() for h in hosts), tuple(notes)))

    return _Catalogue(
        language=language, labels=raw["labels"], hints=raw["hints"],
        entries=tuple(index.values()), index=index, providers=tuple(providers),
    )


# -- lookups ------------------------------------------------------------------------------------


def normalize_command(command: str | None) -> str | None:
    """The catalogue's name for ``command`` (case-insensitive; HELO -> EHLO, "." -> end-of-data).

    ``None``, ``""``, ``"any"`` and ``"*"`` mean any command (``None``). Raises ValueError for a
    command the catalogue does not know.
    """
    if command is None:
        return None
    word = " ".join(command.split()).lower()
    if word in _ANY:
        return None
    if word in _ALIASES:
        return _ALIASES[word]
    for known in COMMANDS:
        if word == known.lower():
            return known
    raise ValueError(f"unknown command {command!r}; use one of: {', '.join(COMMANDS)}, any")


def _normalize_enhanced(enhanced: str | None) -> str | None:
    if enhanced is None or not enhanced.strip():
        return None
    enhanced = enhanced.strip()
    if not _ENHANCED.match(enhanced):
        raise ValueError(f"invalid enhanced status code {enhanced!r} (expected a form like 5.7.8)")
    return enhanced


def _provider(catalogue: _Catalogue, host: str | None) -> _Provider | None:
    if not host:
        return None
    host = host.strip().rstrip(".").lower()
    for provider in catalogue.providers:
        if any(fnmatchcase(host, pattern) for pattern in provider.hosts):
            return provider
    return None


def provider_name(upstream_host: str | None, language: str = "en") -> str | None:
    """The known provider (e.g. "Amazon SES") an upstream host name belongs to, or None."""
    provider = _provider(_catalogue(language), upstream_host)
    return provider.name if provider else None


def _provider_note(provider: _Provider, code: int, enhanced: str | None, command: str | None) -> _Note | None:
    best: tuple[int, _Note] | None = None
    for note in provider.notes:
        if code not in note.codes:
            continue
        if note.enhanced is not None and note.enhanced != enhanced:
            continue
        if note.command is not None and note.command != command:
            continue
        score = (2 if note.enhanced else 0) + (1 if note.command else 0)
        if best is None or score > best[0]:
            best = (score, note)
    return best[1] if best else None


def _lookup(catalogue: _Catalogue, code: int, enhanced: str | None, command: str | None) -> Explanation | None:
    # Most specific first: code+enhanced+command > code+enhanced > code+command > code.
    for key in ((code, enhanced, command), (code, enhanced, None), (code, None, command), (code, None, None)):
        found = catalogue.index.get(key)
        if found is not None:
            return found
    return None


def explain(
    code: int,
    enhanced: str | None = None,
    command: str | None = None,
    upstream_host: str | None = None,
    language: str = "en",
) -> Explanation | None:
    """Explain reply ``code`` (with its RFC 3463 ``enhanced`` code and the ``command`` it answered).

    The most specific entry wins: code+enhanced+command > code+enhanced > code+command > code;
    ``None`` when the catalogue has no entry for ``code`` at all. With ``upstream_host`` naming a
    known provider (smtp.gmail.com, smtp.office365.com, email-smtp.REGION.amazonaws.com ...), the
    provider's note for this reply, if any, is set as ``provider_note``.

    Raises ValueError for an invalid enhanced code, an unknown command (see ``normalize_command``)
    or a language without a data file.
    """
    catalogue = _catalogue(language)
    enhanced = _normalize_enhanced(enhanced)
    command = normalize_command(command)
    found = _lookup(catalogue, code, enhanced, command)
    if found is None:
        return None
    provider = _provider(catalogue, upstream_host)
    note = _provider_note(provider, code, enhanced, command) if provider else None
    if note is None:
        return found
    return Explanation(
        code=found.code, enhanced=found.enhanced, meaning=found.meaning, when=found.when, fix=found.fix,
        provider_note=note.note, command=found.command, hint=found.hint, provider=provider.name if provider else None,
    )


def entries(language: str = "en") -> tuple[Explanation, ...]:
    """Every catalogue entry in file order, without provider notes."""
    return _catalogue(language).entries


def labels(language: str = "en") -> Mapping[str, Any]:
    """The display labels of ``language`` ("Meaning", "What to do", command names ...)."""
    return _catalogue(language).labels


def codes_of(reply: Reply) -> tuple[int, str | None]:
    """The basic and enhanced code of a reply, composed or relayed.

    Relayed replies keep the enhanced code inside their text ("5.7.8 Username and Password not
    accepted"); it is taken from the first line when it fits the basic code.
    """
    if reply.enhanced is not None:
        return reply.code, reply.enhanced
    m = _LEADING_ENHANCED.match(reply.lines[0])
    if m is not None and m.group(1)[0] == str(reply.code)[0]:
        return reply.code, m.group(1)
    return reply.code, None


# -- hints --------------------------------------------------------------------------------------


def hint(
    reply_code: int,
    enhanced: str | None,
    *,
    side: Literal["client", "upstream"],
    command: str,
    upstream_name: str | None = None,
    upstream_host: str | None = None,
    sender: str | None = None,
    allowed_senders: Sequence[str] = (),
    situation: str | None = None,
    user: str | None = None,
    language: str = "en",
) -> str:
    """One short line (at most ``MAX_HINT`` characters, usually <= 160) for a log ``hint=`` field.

    ``side`` says who sent the reply: ``"client"`` for a reply the proxy composed for its client,
    ``"upstream"`` for a reply an upstream sent (to the proxy's own greeting/EHLO/STARTTLS/AUTH, or
    relayed to the client for MAIL/RCPT/DATA/end-of-data). ``command`` is what it answered (any
    spelling ``normalize_command`` knows; unknown ones count as any). Chosen by context:

    - ``situation`` in ``SITUATIONS`` (e.g. "data-timeout": the client got 354 but never sent the
      final dot line) wins over the code;
    - an upstream 534/535 (or any upstream 5xx to AUTH) is the provider refusing the proxy's own
      credentials for ``upstream_name`` - never the client's fault - plus the provider's short note;
      an upstream 530/538 means the proxy's upstream settings lack AUTH or TLS;
    - a 553 from the proxy names ``sender``, ``user`` and the user's ``allowed_senders``; a 550/553/
      554 from an upstream to MAIL names the sender the provider refused;
    - otherwise the catalogue entry's short hint, plus the provider's short note for upstream
      replies when ``upstream_host`` belongs to a known provider.

    Never raises: a logging path must not fail because of a hint.
    """
    try:
        return _hint(reply_code, enhanced, side, command, upstream_name, upstream_host, sender,
                     tuple(allowed_senders), situation, user, language)
    except Exception:
        return f"see: relayproxy explain {reply_code}{' ' + enhanced if enhanced else ''}"


def _hint(
    code: int,
    raw_enhanced: str | None,
    side: str,
    raw_command: str | None,
    upstream_name: str | None,
    upstream_host: str | None,
    sender: str | None,
    allowed: tuple[str, ...],
    situation: str | None,
    user: str | None,
    language: str,
) -> str:
    try:
        catalogue = _catalogue(language)
    except CatalogueError:
        catalogue = _catalogue("en")
    templates = catalogue.hints
    try:
        enhanced = _normalize_enhanced(raw_enhanced)
    except ValueError:
        enhanced = None
    try:
        command = normalize_command(raw_command)
    except ValueError:
        command = None
    upstream = upstream_name or upstream_host or str(templates.get("unnamed_upstream", "?"))
    provider = _provider(catalogue, upstream_host) if side == "upstream" else None
    note = _provider_note(provider, code, enhanced, command) if provider else None
    separator = str(templates.get("separator", "; "))

    def with_note(line: str) -> str:
        if note is None:
            return _clip(line)
        # The provider's note is the most useful part: shorten the general text to make room.
        if len(line) + len(separator) + len(note.short) > HINT_TARGET:
            line = line.split(separator, 1)[0]
        return _clip(line + separator + note.short)

    situations = templates.get("situations", {})
    if situation is not None and situation in situations:
        return _clip(str(situations[situation]).format(upstream=upstream))
    if side == "upstream" and (code in (534, 535) or (command == "AUTH" and code >= 500 and code not in (530, 538))):
        return with_note(str(templates["upstream_auth"]).format(upstream=upstream))
    if side == "upstream" and code in (530, 538):
        return with_note(str(templates["upstream_auth_required"]).format(upstream=upstream))
    # 5.6.7 is about the characters of an address (RFC 6531), not whose it is.
    if side == "client" and code == 553 and enhanced != "5.6.7":
        listed = _list(allowed, templates)
        key = "sender_not_allowed" if user else "sender_not_allowed_nouser"
        return _clip(str(templates[key]).format(sender=sender or "", user=user or "", allowed=listed))
    if side == "upstream" and code in (550, 553, 554) and command == "MAIL" and sender:
        return with_note(str(templates["upstream_sender_refused"]).format(upstream=upstream, sender=sender))
    found = _lookup(catalogue, code, enhanced, command)
    if found is not None:
        return with_note(found.hint)
    classes = templates.get("class", {})
    return with_note(str(classes.get(str(code)[0], "")) or f"{code}")


def _list(allowed: tuple[str, ...], templates: Mapping[str, Any], shown: int = 3) -> str:
    if not allowed:
        return str(templates.get("none", "(none)"))
    listed = ", ".join(allowed[:shown])
    if len(allowed) > shown:
        listed += " " + str(templates.get("more", "+{count} more")).format(count=len(allowed) - shown)
    return listed


def _clip(line: str) -> str:
    line = " ".join(line.split())
    return line if len(line) <= MAX_HINT else line[: MAX_HINT - 3].rstrip() + "..."


def upstream_failure_hint(error: UpstreamError, upstream_name: str, upstream_host: str | None) -> str:
    """The hint for a failed upstream step: the upstream's own reply when it refused something
    (so a 535 there blames the proxy's credentials, not the client), else what the client was told."""
    if error.upstream_reply is not None:
        code, enhanced = codes_of(error.upstream_reply)
        side: Literal["client", "upstream"] = "upstream"
    else:
        code, enhanced = codes_of(error.reply)
        side = "client"
    return hint(code, enhanced, side=side, command=error.step, upstream_name=upstream_name, upstream_host=upstream_host)
