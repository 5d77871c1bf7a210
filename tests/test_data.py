"""BodyDecoder: where DATA ends, what goes upstream, and that neither depends on how TCP split the bytes.

Expected semantics (checked against a simple per-line reference implementation below):

* the body ends only at CRLF "." CRLF, or at ".\r\n" right at the start of DATA;
* the client's dot-stuffing is undone only for lines that start after a real CRLF;
* every output line ends in CRLF: CRLF, bare CR and bare LF each end one line;
* every output line that begins with "." is dot-stuffed;
* a NUL is fault NUL, a line over 998 octets (without the stuffing dot) is LINE_TOO_LONG, more than
  ``max_size`` octets is TOO_BIG; once a fault is set no more output is produced;
* the bytes after the end of data are returned as ``rest``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from relayproxy.smtp.data import MAX_BODY_LINE, BodyDecoder, BodyFault

END = b"\r\n.\r\n"
BIG = 50 * 1024 * 1024
PIPELINED = b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\n"


# -- reference implementation ------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    data: bytes
    done: bool
    rest: bytes
    faults: frozenset[BodyFault]
    size: int


def _lines(body: bytes) -> list[tuple[bytes, str | None]]:
    """Split into (content, terminator) with terminator CRLF, CR (bare), LF (bare) or None."""
    lines: list[tuple[bytes, str | None]] = []
    current = bytearray()
    i = 0
    while i < len(body):
        byte = body[i]
        if byte == 13:
            if body[i + 1 : i + 2] == b"\n":
                lines.append((bytes(current), "CRLF"))
                i += 2
            else:
                lines.append((bytes(current), "CR"))
                i += 1
            current = bytearray()
        elif byte == 10:
            lines.append((bytes(current), "LF"))
            current = bytearray()
            i += 1
        else:
            current.append(byte)
            i += 1
    if current:
        lines.append((bytes(current), None))
    return lines


def reference(data: bytes, max_size: int = BIG) -> Expected:
    """The whole input at once, line by line; faults are all those present (not only the first)."""
    if data.startswith(b".\r\n"):
        body_end, rest_start = 0, 3
    else:
        found = data.find(END)
        if found < 0:
            raise ValueError("reference() wants a complete body")
        body_end, rest_start = found + 2, found + 5
    body = data[:body_end]
    out = []
    faults: set[BodyFault] = set()
    after_crlf = True
    for content, terminator in _lines(body):
        assert terminator is not None  # a complete body ends in CRLF
        if after_crlf and content.startswith(b"."):
            content = content[1:]
        after_crlf = terminator == "CRLF"
        if b"\x00" in content:
            faults.add(BodyFault.NUL)
        if len(content) > MAX_BODY_LINE:
            faults.add(BodyFault.LINE_TOO_LONG)
        out.append((b"." + content if content.startswith(b".") else content) + b"\r\n")
    if len(body) > max_size:
        faults.add(BodyFault.TOO_BIG)
    return Expected(b"".join(out), True, data[rest_start:], frozenset(faults), len(body))


# -- feeding ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    data: bytes
    done: bool
    rest: bytes
    fault: BodyFault | None
    size: int
    chunks: tuple[bytes, ...]


def feed(pieces: list[bytes], max_size: int = BIG) -> Result:
    decoder = BodyDecoder(max_size)
    out: list[bytes] = []
    done, rest = False, b""
    faulted = False
    for i, piece in enumerate(pieces):
        chunk = decoder.feed(piece)
        assert len(decoder._pending) <= 4
        if faulted:
            assert chunk.data == b"", "output after a fault"
        faulted = decoder.fault is not None
        out.append(chunk.data)
        if chunk.done:
            done, rest = True, chunk.rest + b"".join(pieces[i + 1 :])
            break
        assert chunk.rest == b""
    return Result(b"".join(out), done, rest, decoder.fault, decoder.size, tuple(out))


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def random_split(data: bytes, rng: random.Random, max_piece: int | None = None) -> list[bytes]:
    pieces = []
    i = 0
    limit = max_piece or max(1, min(len(data), 64))
    while i < len(data):
        n = rng.randint(0, limit)  # empty pieces too
        pieces.append(data[i : i + n])
        i += n
    return pieces


def check_wire_form(out: bytes, complete: bool = True) -> None:
    """What we send upstream is unambiguous for any reader (``complete``: no fault cut it short)."""
    assert b"\r" not in out.replace(b"\r\n", b""), "bare CR in output"
    assert b"\n" not in out.replace(b"\r\n", b""), "bare LF in output"
    assert END not in out, "CRLF.CRLF in output"
    assert not out.startswith(b".\r\n"), "output starts with an end of data"
    if complete:
        assert out == b"" or out.endswith(b"\r\n")
    for line in out.split(b"\r\n")[: -1 if complete else None]:
        if line.startswith(b"."):
            assert line.startswith(b".."), f"unstuffed dot line {line[:20]!r}"
        assert len(line) <= MAX_BODY_LINE + 1
    assert b"\x00" not in out


def check_all_ways(data: bytes, max_size: int = BIG, seed: int = 0, splits: int = 20) -> Result:
    """Feed whole, byte by byte and in random splits; all must agree with each other and the reference."""
    expected = reference(data, max_size)
    rng = random.Random(seed)
    ways = [whole(data), bytewise(data)] + [random_split(data, rng) for _ in range(splits)]
    results = [feed(p, max_size) for p in ways]
    first = results[0]
    for way, result in zip(ways, results):
        label = f"split {[len(p) for p in way][:40]}"
        assert result.done == expected.done, label
        assert result.rest == expected.rest, label
        assert result.size == expected.size, label
        assert result.fault == first.fault, f"fault depends on the split: {result.fault} vs {first.fault}; {label}"
        if expected.faults:
            assert result.fault in expected.faults, label
            # What went out before the fault is a prefix of the correct conversion.
            assert expected.data.startswith(result.data), label
        else:
            assert result.fault is None, label
            assert result.data == expected.data, label
        check_wire_form(result.data, complete=result.fault is None)
    return first


# -- end of data --------------------------------------------------------------------------------


def test_simple_body() -> None:
    r = check_all_ways(b"Subject: hi\r\n\r\nHello\r\n.\r\n")
    assert r.data == b"Subject: hi\r\n\r\nHello\r\n"
    assert r.done and r.rest == b"" and r.fault is None


def test_empty_body() -> None:
    r = check_all_ways(b".\r\n")
    assert r.data == b"" and r.done and r.rest == b"" and r.size == 0


def test_empty_body_then_pipelined() -> None:
    r = check_all_ways(b".\r\n" + PIPELINED)
    assert r.data == b"" and r.done and r.rest == PIPELINED


def test_one_empty_line() -> None:
    r = check_all_ways(b"\r\n.\r\n")
    assert r.data == b"\r\n" and r.done


def test_rest_after_end() -> None:
    r = check_all_ways(b"hello\r\n.\r\nQUIT\r\n")
    assert r.data == b"hello\r\n" and r.rest == b"QUIT\r\n"


def test_not_done_without_terminator() -> None:
    for data in [b"", b".", b".\r", b"hello", b"hello\r\n", b"hello\r\n.", b"hello\r\n.\r", b"a\r\n..\r\n"]:
        for pieces in (whole(data), bytewise(data)):
            r = feed(pieces)
            assert not r.done and r.rest == b"", data


def test_first_line_dot_stuffed() -> None:
    r = check_all_ways(b"..\r\n.\r\n")
    assert r.data == b"..\r\n"  # one "." line, stuffed again for the upstream
    r = check_all_ways(b"..hidden\r\n.\r\n")
    assert r.data == b"..hidden\r\n"


def test_first_line_single_dot_unstuffed_text() -> None:
    # ".x" at the start is a stuffed "x" (RFC 5321 4.5.2: the first dot is always removed).
    r = check_all_ways(b".x\r\n.\r\n")
    assert r.data == b"x\r\n"


@pytest.mark.parametrize("dots", [1, 2, 3, 4, 10])
def test_lines_of_only_dots(dots: int) -> None:
    line = b"." * (dots + 1)  # stuffed on the wire
    r = check_all_ways(b"a\r\n" + line + b"\r\n" + line + b"\r\n.\r\n")
    assert r.data == b"a\r\n" + line + b"\r\n" + line + b"\r\n"


def test_dot_lines_are_restuffed() -> None:
    r = check_all_ways(b"a\r\n..b\r\n...\r\n.\r\n")
    assert r.data == b"a\r\n..b\r\n...\r\n"


def test_bare_line_ends_become_crlf() -> None:
    r = check_all_ways(b"a\rb\nc\r\n.\r\n")
    assert r.data == b"a\r\nb\r\nc\r\n"


def test_cr_cr_lf() -> None:
    r = check_all_ways(b"a\r\r\nb\r\n.\r\n")
    assert r.data == b"a\r\n\r\nb\r\n"


LOOKALIKES = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\n",
    b"\r.\r\n",
    b"\r.\r",
    b"\n.\r",
    b"\r\n.\n",
    b"\r\n.\r",
    b"\r\n.\r\r\n",
    b"\r\r\n.\r\r\n",
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
]


@pytest.mark.parametrize("lookalike", LOOKALIKES, ids=repr)
def test_smuggling_lookalikes_do_not_end_data(lookalike: bytes) -> None:
    data = b"Subject: x\r\n\r\nbody" + lookalike + PIPELINED + b"tail" + END + b"QUIT\r\n"
    r = check_all_ways(data, seed=hash(lookalike) & 0xFFFF, splits=60)
    assert r.done
    assert r.rest == b"QUIT\r\n"
    # The smuggled commands stay inside the body, on lines of their own terminated with CRLF.
    if r.fault is None:
        assert b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\n" in r.data
        assert r.data.endswith(b"tail\r\n")
    else:
        assert b"\x00" in lookalike and r.fault is BodyFault.NUL


# Right after DATA, each lookalike minus its leading line end (those that become ".\r\n" are a
# real end of data there: see test_empty_body).
STARTS = sorted({x.lstrip(b"\r\n") for x in LOOKALIKES} - {b".\r\n"})


@pytest.mark.parametrize("start", STARTS, ids=repr)
def test_lookalike_at_start_of_body(start: bytes) -> None:
    data = start + PIPELINED + END
    check_all_ways(data, splits=30)


def test_lookalike_outputs() -> None:
    assert check_all_ways(b"x\n.\nMAIL\r\n.\r\n").data == b"x\r\n..\r\nMAIL\r\n"
    assert check_all_ways(b"x\r.\r\nMAIL\r\n.\r\n").data == b"x\r\n..\r\nMAIL\r\n"
    # After a real CRLF the dot is the client's stuffing whatever ends the line.
    assert check_all_ways(b"x\r\n.\nMAIL\r\n.\r\n").data == b"x\r\n\r\nMAIL\r\n"
    assert check_all_ways(b"x\r\n.\rMAIL\r\n.\r\n").data == b"x\r\n\r\nMAIL\r\n"
    assert check_all_ways(b"x\r\n.\r\r\nMAIL\r\n.\r\n").data == b"x\r\n\r\n\r\nMAIL\r\n"


@pytest.mark.parametrize("boundary", [16 * 1024, 64 * 1024])
@pytest.mark.parametrize("shift", range(-6, 7))
def test_dot_at_chunk_boundary(boundary: int, shift: int) -> None:
    """A dot-stuffed line, a lookalike and the real end each straddle the read size."""
    filler_line = b"x" * 70 + b"\r\n"
    target = boundary + shift
    prefix = filler_line * (target // len(filler_line) - 1)
    prefix += b"y" * (target - len(prefix) - 2) + b"\r\n"
    assert len(prefix) == target
    for tail in (b"..dot\r\nmore" + END, END + b"NOOP\r\n", b".\r\n.\r\n" + END, b"\n.\r\nx" + END):
        data = prefix + tail
        pieces = [data[i : i + boundary] for i in range(0, len(data), boundary)]
        expected = reference(data)
        r = feed(pieces)
        assert (r.data, r.done, r.rest, r.fault) == (expected.data, True, expected.rest, None)
        check_wire_form(r.data)
        # And with the boundary moved by one each way.
        for cut in (boundary - 1, boundary + 1):
            pieces = [data[i : i + cut] for i in range(0, len(data), cut)]
            r = feed(pieces)
            assert (r.data, r.done, r.rest, r.fault) == (expected.data, True, expected.rest, None)


# -- faults -------------------------------------------------------------------------------------


def test_nul_is_a_fault() -> None:
    r = check_all_ways(b"a\r\nb\x00c\r\nd\r\n.\r\nNOOP\r\n")
    assert r.fault is BodyFault.NUL and r.done and r.rest == b"NOOP\r\n"


def test_no_output_after_nul() -> None:
    decoder = BodyDecoder(BIG)
    assert decoder.feed(b"clean line\r\n").data == b"clean line"  # the CRLF is held back
    c = decoder.feed(b"with\x00nul\r\n")
    assert decoder.fault is BodyFault.NUL and c.data == b""
    c = decoder.feed(b"clean again\r\nand more\r\n")
    assert c.data == b""
    c = decoder.feed(b".\r\n")
    assert c.done and c.data == b""


def test_line_of_998_is_fine_999_is_not() -> None:
    ok = check_all_ways(b"a" * 998 + b"\r\n.\r\n", splits=5)
    assert ok.fault is None
    # The stuffing dot does not count (RFC 5321 4.5.3.1.6).
    ok = check_all_ways(b"x\r\n." + b"." * 998 + b"\r\n.\r\n", splits=5)
    assert ok.fault is None
    bad = check_all_ways(b"a" * 999 + b"\r\n.\r\n", splits=5)
    assert bad.fault is BodyFault.LINE_TOO_LONG


def test_long_line_with_bare_line_ends_is_several_lines() -> None:
    r = check_all_ways((b"a" * 900 + b"\r") * 5 + b"\r\n.\r\n", splits=5)
    assert r.fault is None
    r = check_all_ways((b"a" * 900 + b"\n") * 5 + b"\r\n.\r\n", splits=5)
    assert r.fault is None


@pytest.mark.parametrize("line_end", [b"\r\n", b"\n"], ids=["crlf", "bare-lf"])
@pytest.mark.parametrize("length", [997, 998, 999, 1000, 1998])
def test_one_long_line_among_short_ones(line_end: bytes, length: int) -> None:
    """Lines in the middle of a chunk are checked by windows, not one by one: a long line first,
    last or anywhere between, among lines of every length up to the limit, is found whatever the
    line ends and the split."""
    rng = random.Random(length)
    short = [b"x" * rng.choice([0, 1, 76, 500, 997, 998]) for _ in range(12)]
    for where in range(len(short) + 1):
        lines = short[:where] + [b"y" * length] + short[where:]
        data = b"\r\n".join(lines[:-1]) + line_end + lines[-1] + END
        r = check_all_ways(data, splits=1)
        assert r.fault is (BodyFault.LINE_TOO_LONG if length > MAX_BODY_LINE else None), where


def test_17k_line_then_commands() -> None:
    data = b"Subject: x\r\n\r\n" + b"A" * 17_000 + b"\r\n" + PIPELINED + b"QUIT\r\n" + END + b"NOOP\r\n"
    r = check_all_ways(data, splits=10)
    assert r.fault is BodyFault.LINE_TOO_LONG
    assert r.done and r.rest == b"NOOP\r\n"
    for lookalike in LOOKALIKES:
        data = b"A" * 17_000 + lookalike + PIPELINED + END + b"NOOP\r\n"
        r = feed(bytewise(data))
        assert r.done and r.rest == b"NOOP\r\n" and r.fault is not None


def test_30mb_without_line_end_in_64k_chunks() -> None:
    decoder = BodyDecoder(BIG)
    chunk = b"x" * (64 * 1024)
    total = 0
    while total < 30 * 1024 * 1024:
        out = decoder.feed(chunk)
        total += len(chunk)
        assert not out.done
        assert len(decoder._pending) <= 4
        if decoder.fault is not None:
            assert out.data == b""
    assert decoder.fault is BodyFault.LINE_TOO_LONG
    # Lookalikes do not end it either; the real end does.
    for lookalike in LOOKALIKES:
        out = decoder.feed(lookalike + PIPELINED)
        assert not out.done and out.data == b""
        assert len(decoder._pending) <= 4
    out = decoder.feed(END + b"QUIT\r\n")
    assert out.done and out.rest == b"QUIT\r\n" and out.data == b""
    assert decoder.fault is BodyFault.LINE_TOO_LONG


def test_30mb_ending_in_cr_chunks() -> None:
    """Chunks ending in a CR are the worst case for the hold-back: it must stay bounded."""
    decoder = BodyDecoder(BIG)
    chunk = b"x" * (64 * 1024 - 1) + b"\r"
    for _ in range(480):
        decoder.feed(chunk)
        assert len(decoder._pending) <= 4
    assert decoder.fault is BodyFault.LINE_TOO_LONG


def test_too_big() -> None:
    r = check_all_ways(b"a" * 50 + b"\r\n" + b"b" * 50 + b"\r\n.\r\nQUIT\r\n", max_size=100)
    assert r.fault is BodyFault.TOO_BIG and r.done and r.rest == b"QUIT\r\n"
    r = check_all_ways(b"a" * 48 + b"\r\n" + b"b" * 48 + b"\r\n.\r\n", max_size=100)
    assert r.fault is None and r.size == 100


def test_too_big_stops_output() -> None:
    decoder = BodyDecoder(10)
    assert decoder.feed(b"abc\r\n").data == b"abc"
    decoder.feed(b"0123456789\r\n")
    assert decoder.fault is BodyFault.TOO_BIG
    assert decoder.feed(b"more\r\n").data == b""
    c = decoder.feed(b".\r\n")
    assert c.done


MIXED_FAULTS = [
    # (body, max_size) with two faults; the one reported must not depend on how TCP split the bytes.
    (b"A" * 2000 + b"\r\nnul\x00here\r\n.\r\n", BIG),
    (b"nul\x00here\r\n" + b"A" * 2000 + b"\r\n.\r\n", BIG),
    (b"\x00" + b"a" * 200 + b"\r\n.\r\n", 100),
    (b"a" * 200 + b"\r\n\x00\r\n.\r\n", 100),
    (b"A" * 1500 + b"\r\n.\r\n", 1000),
]


@pytest.mark.parametrize("data,max_size", MIXED_FAULTS, ids=range(len(MIXED_FAULTS)))
def test_fault_kind_does_not_depend_on_split(data: bytes, max_size: int) -> None:
    expected = reference(data, max_size)
    assert len(expected.faults) >= 2
    faults = {
        "whole": feed(whole(data), max_size).fault,
        "bytewise": feed(bytewise(data), max_size).fault,
        "halves": feed([data[: len(data) // 2], data[len(data) // 2 :]], max_size).fault,
    }
    rng = random.Random(len(data))
    for n in range(30):
        faults[f"random {n}"] = feed(random_split(data, rng, 300), max_size).fault
    assert len(set(faults.values())) == 1, f"reported fault depends on the split: {faults}"
    assert faults["whole"] == first_by_precedence(expected.faults)


def first_by_precedence(faults: frozenset[BodyFault]) -> BodyFault:
    """The decoder reports one fault by a fixed precedence: the order of BodyFault."""
    return next(f for f in BodyFault if f in faults)


# -- against the reference, at random -----------------------------------------------------------

ALPHABET = [b"a", b".", b"\r", b"\n", b"\r\n", b"\r\n.", b".\r\n"]


def _random_body(rng: random.Random, alphabet: list[bytes], max_len: int) -> bytes:
    return b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_len)))


def test_random_against_reference() -> None:
    rng = random.Random(5321)
    checked = 0
    while checked < 3000:
        body = _random_body(rng, ALPHABET, 30)
        rest = _random_body(rng, ALPHABET + [b"QUIT\r\n"], 5)
        data = body + END + rest
        # Only inputs whose first end of data is the one we put there.
        if data.startswith(b".\r\n") or data.find(END) != len(body):
            continue
        checked += 1
        check_all_ways(data, seed=checked, splits=4)


def test_random_against_reference_with_faults() -> None:
    rng = random.Random(1870)
    alphabet = ALPHABET + [b"\x00", b"x" * 400, b"\r\n..", b"\r\r\n"]
    checked = 0
    while checked < 1500:
        body = _random_body(rng, alphabet, 12)
        data = body + END + b"RSET\r\n"
        if data.startswith(b".\r\n") or data.find(END) != len(body):
            continue
        checked += 1
        max_size = rng.choice([BIG, 600])
        result = check_all_ways(data, max_size=max_size, seed=checked, splits=4)
        expected = reference(data, max_size)
        if expected.faults:
            assert result.fault == first_by_precedence(expected.faults)


def test_random_split_invariance_of_any_input() -> None:
    """Including inputs whose terminator comes early or at the very start."""
    rng = random.Random(4)
    for n in range(2000):
        data = _random_body(rng, ALPHABET + [END], 25) + END
        expected = reference(data)
        for pieces in (whole(data), bytewise(data), random_split(data, rng, 7)):
            r = feed(pieces)
            assert (r.data, r.done, r.rest, r.fault) == (expected.data, True, expected.rest, None), (n, data)
