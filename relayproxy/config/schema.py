"""How a table of the configuration is declared, and the one reader that checks every table.

A table is a ``@section`` class: a frozen dataclass whose TOML keys are the fields declared with
``setting()``. The field's annotation is the key's type and its default the key's default; the
declaration adds the allowed range, a parser for values that need more than a type, and the fix.
``Table.read`` checks every declared key and reports each problem as one line naming the file, the
key, what is wrong and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, dataclass_transform, get_args, get_origin, get_type_hints

from relayproxy.errors import ConfigError

T = TypeVar("T")


class Invalid(ValueError):
    """A value of the right type that cannot be used: what is wrong, and a fix if not the key's own."""

    def __init__(self, what: str, fix: str | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.fix = fix


@dataclass(frozen=True)
class Setting:
    """One TOML key. ``hint`` is str, int, float (seconds), bool, Path, a Literal of strings or
    tuple[str, ...] (an array of strings), each possibly ``| None``."""

    name: str = ""
    """The TOML key; a field's setting may leave it empty for the field's own name."""
    hint: Any = None
    # dataclasses.MISSING: required. A factory, since a plain MISSING default would make this field required.
    default: Any = dataclasses.field(default_factory=lambda: dataclasses.MISSING)
    fix: str | None = None
    """What to write instead; bool, Literal and seconds have a standard one."""
    low: int | None = None
    """int: the smallest allowed; seconds: 0 allows 0, which is otherwise refused."""
    high: int | None = None
    parse: Callable[[Any], Any] | None = None
    """Turns the string (each item of an array) into what the field holds; raises Invalid."""
    required: bool | None = None
    """None: required exactly when there is no default; False: a rule decides."""
    readable: bool = False
    """A path to a file that must be readable now."""
    secret: tuple[str, ...] = ()
    """A secret is never written in its own key but comes from one of the keys NAME_file, NAME_env or
    NAME_credential that this lists (by their suffix); rules.py reads it."""

    @property
    def names(self) -> list[str]:
        return [f"{self.name}_{source}" for source in self.secret] or [self.name]


def setting(*, default: Any = dataclasses.MISSING, repr: bool = True, **declared: Any) -> Any:
    """A field that is a TOML key of its table; ``declared``: the other attributes of its Setting."""
    return dataclasses.field(default=default, repr=repr, metadata={"setting": Setting(**declared)})


@dataclass_transform(frozen_default=True, field_specifiers=(setting, dataclasses.field))
def section(cls: type[T]) -> type[T]:
    return dataclasses.dataclass(frozen=True)(cls)


Schema = type | Setting
"""The keys of (part of) a table: a @section class, or a Setting that is no field of one."""


def settings(cls: type) -> dict[str, Setting]:
    """The settings of a @section class by field name, with their names, types and defaults filled in."""
    hints = get_type_hints(cls)
    return {
        f.name: dataclasses.replace(s, name=s.name or f.name, hint=hints[f.name], default=f.default)
        for f in dataclasses.fields(cls)
        if (s := f.metadata.get("setting")) is not None
    }


def key_names(*schemas: Schema) -> list[str]:
    """Every TOML key the schemas declare, in the order declared."""
    found = (s for schema in schemas for s in ([schema] if isinstance(schema, Setting) else settings(schema).values()))
    return [name for s in found for name in s.names]


class Source:
    """One configuration file being read, and the problems found in it so far."""

    def __init__(self, path: Path, environ: Mapping[str, str]) -> None:
        self.file = str(path)
        # Relative paths in the file are relative to the file, not to wherever the
        # daemon happens to be started; absolute so a later chdir cannot change them.
        self.base = path.absolute().parent
        self.environ = environ
        self.problems: list[str] = []
        self.reported: set[str] = set()

    def add(self, key: str, what: str, fix: str) -> None:
        self.problems.append(f"{self.file}: {key}: {what}; {fix}")
        self.reported.add(key)

    def raise_problems(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)


@dataclass(frozen=True)
class Table:
    """One TOML table of a Source.

    A value with a problem is reported and replaced by its default (or a placeholder for a
    required key): the report then stops a Config being built, while reading goes on so that
    every problem is reported at once.
    """

    source: Source
    key: str
    data: Mapping[str, object]

    def key_of(self, name: str) -> str:
        # Quoted as TOML would need it, so that the key can be found in the file.
        part = name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)
        return f"{self.key}.{part}" if self.key else part

    def problem(self, name: str, what: str, fix: str) -> None:
        self.source.add(self.key_of(name), what, fix)

    def ok(self, name: str) -> bool:
        """Is key ``name`` set, and no problem reported about it?"""
        return name in self.data and self.key_of(name) not in self.source.reported

    def check_known(self, known: Sequence[str]) -> None:
        for name in self.data:
            if name not in known:
                self.problem(name, "unknown key", f"remove it or check the spelling (known keys: {', '.join(known)})")

    def table(self, name: str) -> Table:
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            self.problem(name, f"expected a table, got {_show(value)}", f"write it as a [{self.key_of(name)}] section")
            value = {}
        return Table(self.source, self.key_of(name), value)

    def subtables(self) -> list[tuple[str, Table]]:
        """The named tables inside this one, such as each [upstream.NAME]."""
        found = []
        for name, value in self.data.items():
            table = self.table(name)  # which reports a value that is no table
            if isinstance(value, dict):
                found.append((name, table))
        return found

    def array_of_tables(self, name: str) -> list[Table]:
        value = self.data.get(name, [])
        fix = f"write each entry as a [[{self.key_of(name)}]] section"
        if not isinstance(value, list):
            self.problem(name, f"expected an array of tables, got {_show(value)}", fix)
            return []
        found = []
        # Counted from 1, as a reader counts the [[...]] sections in the file.
        for number, item in enumerate(value, 1):
            key = f"{self.key_of(name)}[{number}]"
            if isinstance(item, dict):
                found.append(Table(self.source, key, item))
            else:
                self.source.add(key, f"expected a table, got {_show(item)}", fix)
        return found

    def read(self, cls: type[T], **given: Any) -> T:
        """A ``cls`` of this table's values of its settings (but secrets), and ``given`` for its other fields."""
        return cls(**{field: self.value(s) for field, s in settings(cls).items() if not s.secret}, **given)

    def value(self, s: Setting) -> Any:
        raw = self.data.get(s.name)
        fallback = _PLACEHOLDERS.get(_base(s.hint)) if s.default is dataclasses.MISSING else s.default
        if raw is None:
            if s.required or (s.required is None and s.default is dataclasses.MISSING):
                self.problem(s.name, "missing", fix_of(s))
            return fallback
        try:
            return self._convert(s, raw)
        except Invalid as e:
            self.problem(s.name, e.what, e.fix or fix_of(s))
            return fallback

    def _convert(self, s: Setting, raw: object) -> Any:
        base = _base(s.hint)
        if get_origin(base) is tuple:
            if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
                raise _expected("an array of strings", raw)
            items = []
            for item in raw:
                try:
                    items.append(s.parse(item) if s.parse else item)
                except Invalid as e:
                    self.problem(s.name, e.what, e.fix or fix_of(s))
            return tuple(items)
        if s.parse is not None:
            return s.parse(_string(raw))
        if base is bool:
            if not isinstance(raw, bool):
                raise _expected("true or false", raw)
            return raw
        # bool is an int subclass in Python, but true and false are no numbers in TOML.
        if base is int:
            if isinstance(raw, bool) or not isinstance(raw, int):
                raise _expected("an integer", raw)
            assert s.low is not None and s.high is not None, f"{s.name}: an integer setting declares low and high"
            if not s.low <= raw <= s.high:
                raise _expected(f"an integer from {s.low} to {s.high}", raw)
            return raw
        if base is float:
            zero = s.low == 0
            if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw) or raw < 0 or raw == 0 and not zero:
                raise _expected("a number of seconds, 0 or more" if zero else "a number of seconds greater than 0", raw)
            return float(raw)
        if get_origin(base) is Literal:
            if raw not in get_args(base):
                raise _expected(_choices(base), raw)
            return raw
        if base is str:
            return _string(raw)
        path = self.source.base / _string(raw)
        if s.readable:
            self.read_file(s.name, path)
        return path

    def read_file(self, name: str, path: Path, fix: str = "check the path and that the relayproxy user may read it") -> bytes | None:
        try:
            return path.read_bytes()
        except OSError as e:
            self.problem(name, f"cannot read {path}: {e.strerror}", fix)
            return None


_PLACEHOLDERS: dict[Any, Any] = {str: "", Path: Path(), int: 0}


def _base(hint: Any) -> Any:
    """``hint`` without its ``| None``."""
    if get_origin(hint) in (Union, types.UnionType):
        rest = [arg for arg in get_args(hint) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return hint


def _choices(literal: Any) -> str:
    return f"one of {', '.join(json.dumps(choice) for choice in get_args(literal))}"


def fix_of(s: Setting) -> str:
    base = _base(s.hint)
    if s.fix is not None:
        return s.fix
    if base is bool:
        return "write true or false without quotes"
    if base is float:
        return "write a number such as 30 or 2.5"
    assert get_origin(base) is Literal, f"{s.name}: a setting of this type declares its fix"
    return f"write {_choices(base)}"


def _string(raw: object) -> str:
    if not isinstance(raw, str) or not raw:
        raise _expected("a non-empty string", raw)
    return raw


def _expected(what: str, raw: object) -> Invalid:
    return Invalid(f"expected {what}, got {_show(raw)}")


def _show(value: object) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str | bool | int | float):
        return json.dumps(value)
    # TOML dates and times.
    return f"a {type(value).__name__}"
