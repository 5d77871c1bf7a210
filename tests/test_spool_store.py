"""The spool directory's files: what a commit leaves, what a crash leaves, locks, corrupt files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from relayproxy.spool.store import Envelope, Spool, new_id


def envelope(spool_id: str, **changes: object) -> Envelope:
    fields: dict[str, object] = dict(
        id=spool_id, user="app1", upstream="default", sender="app1@example.org", recipients=("bob@example.net",),
        received=1000.0, size=5, pending=("bob@example.net",),
    )
    fields.update(changes)
    return Envelope(**fields)  # type: ignore[arg-type]


def committed(spool: Spool, text: bytes = b"body\r\n", **changes: object) -> Envelope:
    made = envelope(new_id(1000.0), **changes)
    out = spool.open_new(made.id)
    out.write(text)
    spool.commit(out, made)
    return made


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    return spool


def test_a_commit_leaves_two_private_files_in_queue_and_nothing_in_tmp(spool: Spool) -> None:
    made = committed(spool)
    names = sorted(p.name for p in spool.queue.iterdir())
    assert names == [f"{made.id}.env", f"{made.id}.msg"]
    assert all(stat.S_IMODE((spool.queue / n).stat().st_mode) == 0o600 for n in names)
    assert list(spool.tmp.iterdir()) == []
    assert (spool.queue / f"{made.id}.msg").read_bytes() == b"body\r\n"
    assert spool.list().envelopes == [made]


def test_prepare_removes_what_a_crash_left_before_the_250(spool: Spool) -> None:
    kept = committed(spool)
    (spool.tmp / "half.msg").write_bytes(b"Subject: half")
    orphan = new_id(1001.0)
    (spool.queue / f"{orphan}.msg").write_bytes(b"renamed, envelope never was")
    assert sorted(spool.prepare()) == [f"{orphan}.msg", "half.msg"]
    assert [e.id for e in spool.list().envelopes] == [kept.id]


def test_a_message_is_locked_by_one_holder_at_a_time(spool: Spool) -> None:
    made = committed(spool)
    first = spool.lock(made.id)
    assert first is not None
    assert spool.lock(made.id) is None
    first.close()
    again = spool.lock(made.id)
    assert again is not None
    again.close()


@pytest.mark.parametrize(
    "damage",
    ["not json", "wrong format", "id mismatch", "no message file"],
)
def test_unreadable_envelopes_are_moved_to_corrupt_with_the_reason(spool: Spool, damage: str) -> None:
    good = committed(spool)
    bad = committed(spool)
    env = spool.queue / f"{bad.id}.env"
    if damage == "not json":
        env.write_bytes(b"{")
    elif damage == "wrong format":
        env.write_bytes(json.dumps({**json.loads(env.read_bytes()), "format": 9}).encode())
    elif damage == "id mismatch":
        env.write_bytes(json.dumps({**json.loads(env.read_bytes()), "id": good.id}).encode())
    else:
        os.unlink(spool.queue / f"{bad.id}.msg")
    listing = spool.list()
    assert [e.id for e in listing.envelopes] == [good.id]
    assert [name for name, _ in listing.corrupt] == [f"{bad.id}.env"]
    assert (spool.corrupt / f"{bad.id}.env").exists() and (spool.corrupt / f"{bad.id}.why").read_text().strip()
    assert not (spool.queue / f"{bad.id}.env").exists()


def test_give_up_and_restore(spool: Spool) -> None:
    made = committed(spool)
    spool.give_up(envelope(made.id, pending=(), bounced=(("bob@example.net", "550 5.1.1 no"),)))
    assert spool.list().envelopes == []
    folder, found = spool.find(made.id)
    assert folder == spool.failed and found.bounced == (("bob@example.net", "550 5.1.1 no"),)
    again = spool.restore(made.id, 2000.0)
    assert again.pending == ("bob@example.net",) and again.bounced == () and again.next_attempt == 2000.0
    assert [e.id for e in spool.list().envelopes] == [made.id]


def test_a_failed_commit_leaves_nothing_to_deliver(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    made = envelope(new_id(1000.0))
    out = spool.open_new(made.id)
    out.write(b"body")
    real = os.rename

    def rename(source: object, target: object) -> None:
        if str(target).endswith(".env"):
            raise OSError(28, "No space left on device")
        real(source, target)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        spool.commit(out, made)
    monkeypatch.undo()
    spool.discard(made.id, None)
    assert list(spool.queue.iterdir()) == [] and list(spool.tmp.iterdir()) == []
