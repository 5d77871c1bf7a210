"""Load: many concurrent sessions while another address hammers AUTH with wrong passwords."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter

from harness import wait_for
from peers import Client, Closed, ScriptedUpstream, auth_plain, expect, ready
from relayproxy.smtp.reply import Catalogue

from .support import Launch, read_wire

SESSIONS = 200
MESSAGES = 5
USERS = {"app1": "app1-password", "printer": "printer-password"}


def test_concurrent_sessions_while_auth_is_hammered(launch: Launch, upstream: ScriptedUpstream) -> None:
    """Attack: password spraying from 127.0.0.2 during 200 concurrent legitimate sessions of 5 messages each."""
    # 200 sessions connect at once, before any has logged in: more than the default max_unauthenticated.
    proxy = launch(upstream.toml(), users=USERS, limits="max_connections_per_ip = 1000\nmax_unauthenticated = 500")
    errors: list[str] = []
    queued: list[int] = []
    done = threading.Event()
    attack = Counter[bytes]()
    invalid = expect(Catalogue.AUTH_INVALID, b"535 5.7.8")
    throttled = expect(Catalogue.AUTH_TEMPORARY, b"454 4.7.0")
    too_many = expect(Catalogue.TOO_MANY_AUTH_FAILURES, b"421 4.7.0")

    def attacker() -> None:
        n = 0
        while not done.is_set():
            c = Client(proxy.plain_port, source="127.0.0.2")
            c.ehlo()
            failures = 0
            try:
                while not done.is_set():
                    n += 1
                    reply = c.command(auth_plain(("printer", "admin", "root")[n % 3], f"spray-{n}"))
                    attack[reply] += 1
                    failures += reply == invalid
                    if failures == 3:  # max_auth_failures_per_session: 421 and close
                        attack[c.reply()] += 1
                        break
                    if reply not in (invalid, throttled):
                        break
            except Closed as e:
                attack[e.partial] += 1
            finally:
                c.close()

    start_gate = threading.Barrier(SESSIONS + 1, timeout=60)

    def session(i: int) -> None:
        try:
            c = ready(proxy.plain_port)
            start_gate.wait()
            for j in range(MESSAGES):
                c.envelope()
                assert c.command(b"DATA") == b"354 go ahead\r\n"
                reply = c.command(
                    b"From: app1@example.org\r\nSubject: load %d/%d\r\nMessage-ID: <load-%d-%d@example.org>\r\n\r\nbody\r\n."
                    % (i, j, i, j)
                )
                assert reply == b"250 2.0.0 Ok: queued as REC1\r\n", reply
                queued.append(1)
            assert c.command(b"QUIT") == expect(Catalogue.closing("relay.test"), b"221 2.0.0")
            c.close()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(f"session {i}: {type(e).__name__}: {e}")
            try:
                start_gate.abort()
            except threading.BrokenBarrierError:
                pass

    spray = threading.Thread(target=attacker, daemon=True)
    spray.start()
    began = time.monotonic()
    threads = [threading.Thread(target=session, args=(i,), daemon=True) for i in range(SESSIONS)]
    for t in threads:
        t.start()
    try:
        start_gate.wait()
    except threading.BrokenBarrierError:
        pass  # a session failed to start; its error is reported below
    for t in threads:
        t.join(timeout=60)
    elapsed = time.monotonic() - began
    done.set()
    spray.join(timeout=10)

    assert errors == [], errors[:5]
    assert len(queued) == SESSIONS * MESSAGES
    wait_for(lambda: upstream.closed >= SESSIONS, timeout=20)
    ids = Counter(
        m for session_bytes in upstream.sessions for body in read_wire(bytes(session_bytes)).bodies
        for m in re.findall(rb"Message-ID: <(load-\d+-\d+)@example\.org>", body)
    )
    assert len(ids) == SESSIONS * MESSAGES, "messages missing at the upstream"
    assert set(ids.values()) == {1}, f"duplicated: {[k for k, v in ids.items() if v > 1][:5]}"
    # The sprayer was refused, then throttled without bcrypt; it never got in.
    assert attack[invalid] == 10
    assert attack[too_many] == 3
    assert attack[throttled] > 0
    assert set(attack) <= {invalid, throttled, too_many}, attack
    assert elapsed < 20, f"{SESSIONS}x{MESSAGES} messages took {elapsed:.1f}s"
    print(f"\n{SESSIONS * MESSAGES} messages in {elapsed:.1f}s; sprayer: {dict(attack)}")
