"""Pacing an upstream to the provider's limits: max_sessions and max_messages_per_minute.

The Pacer on twisted's Clock (a burst of 100 held to the rate, patient and impatient waiters), and
the proxy on real sockets against a scripted upstream whose final reply is slow: the sessions the
upstream sees at once, and the 451 4.7.0 a pass-through client gets after pacing_timeout.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from conftest import ProxyFactory
from harness import CLIENT_USER, login, wait_for
from peers import ScriptedUpstream, delayed
from relayproxy.smtp.reply import Catalogue
from relayproxy.upstream.pacing import WINDOW, Pacer, Paced

MESSAGE = b"Subject: paced\r\n\r\nhello\r\n"


def burst(clock: Clock, pacer: Pacer, count: int, patient: bool) -> tuple[list[float], list[Failure], list[int]]:
    times: list[float] = []
    refused: list[Failure] = []
    order: list[int] = []
    for i in range(count):
        d = defer.Deferred.fromCoroutine(pacer.message(patient))
        d.addCallbacks(lambda _, i=i: (times.append(clock.seconds()), order.append(i)), refused.append)
    return times, refused, order


def test_a_burst_of_100_is_held_to_30_a_minute_in_order() -> None:
    clock = Clock()
    pacer = Pacer(clock, "m365", None, 30, timeout=30)
    times, refused, order = burst(clock, pacer, 100, patient=True)
    for _ in range(4 * 60):
        clock.advance(1)
    assert len(times) == 100 and refused == [] and order == list(range(100))
    # No 60-second window holds more than 30 starts.
    assert max(sum(1 for t in times if start <= t < start + WINDOW) for start in times) == 30
    assert times[:30] == [0.0] * 30 and times[30] == 60.0 and times[99] == 180.0


def test_impatient_waiters_give_up_after_pacing_timeout_and_patient_ones_go_on() -> None:
    clock = Clock()
    pacer = Pacer(clock, "m365", None, 2, timeout=5)
    first, _, _ = burst(clock, pacer, 2, patient=True)
    impatient, refused, _ = burst(clock, pacer, 1, patient=False)
    patient, never, _ = burst(clock, pacer, 1, patient=True)
    clock.advance(5)
    assert len(first) == 2 and impatient == [] and len(refused) == 1
    error = refused[0].value
    assert isinstance(error, Paced) and error.reply == Catalogue.upstream_rate("m365")
    clock.advance(55)
    assert patient == [60.0] and never == []


def test_sessions_wait_in_line_for_a_release() -> None:
    clock = Clock()
    pacer = Pacer(clock, "smarthost", 1, None, timeout=10)
    assert pacer.take_session()
    assert not pacer.take_session()
    woken: list[str] = []
    refused: list[Failure] = []
    for name, patient in (("patient", True), ("impatient", False)):
        defer.Deferred.fromCoroutine(pacer.wait_session(patient)).addCallbacks(lambda _, n=name: woken.append(n), refused.append)
    clock.advance(10)
    assert woken == [] and len(refused) == 1 and refused[0].value.reply == Catalogue.upstream_busy("smarthost")
    pacer.session_ended()
    assert woken == ["patient"]
    # The woken one is first in line: it takes the slot though others may be waiting.
    assert pacer.take_session(woken=True) and pacer.sessions == 1


# -- through the proxy --------------------------------------------------------------------------


def paced_proxy(make_proxy: ProxyFactory, upstream: ScriptedUpstream, pacing: str) -> int:
    return make_proxy(upstream.toml() + pacing + "\n").port


def test_max_sessions_holds_the_upstream_to_two_connections(
    make_proxy: ProxyFactory, make_upstream: Callable[..., ScriptedUpstream], pki: Any
) -> None:
    open_at_greeting: list[int] = []

    def greet(sock: Any) -> bytes:
        open_at_greeting.append(upstream.connections - upstream.closed)
        return b"220 scripted ESMTP\r\n"

    upstream = make_upstream({"greeting": greet, "DATA-END": delayed(0.5, b"250 2.0.0 Ok\r\n")})
    port = paced_proxy(make_proxy, upstream, "max_sessions = 2")
    sent: list[dict[str, Any]] = []

    def client() -> None:
        with login(port, pki) as smtp:
            sent.append(smtp.sendmail(f"{CLIENT_USER}@example.org", ["bob@example.net"], MESSAGE))

    clients = [threading.Thread(target=client) for _ in range(3)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(timeout=30)
    assert sent == [{}] * 3 and upstream.final_dots == 3
    # The third waited; it may have been handed a session another client had just finished with.
    assert max(open_at_greeting) <= 2 and upstream.connections in (2, 3)


def test_a_client_waits_pacing_timeout_then_gets_451_naming_the_upstream(
    make_proxy: ProxyFactory, make_upstream: Callable[..., ScriptedUpstream], pki: Any
) -> None:
    upstream = make_upstream({"DATA-END": delayed(3, b"250 2.0.0 Ok\r\n")})
    port = paced_proxy(make_proxy, upstream, "max_sessions = 1\npacing_timeout = 0.5")

    def slow() -> None:
        with login(port, pki) as smtp:
            smtp.sendmail(f"{CLIENT_USER}@example.org", ["a@example.net"], MESSAGE)

    holder = threading.Thread(target=slow)
    holder.start()
    wait_for(lambda: b"DATA" in upstream.commands)
    with login(port, pki) as smtp:
        code, text = smtp.mail(f"{CLIENT_USER}@example.org")
    assert (code, text) == (451, b"4.7.0 Upstream default is at its max_sessions, try again later")
    holder.join(timeout=10)
    assert upstream.connections == 1 and upstream.final_dots == 1


def test_the_third_mail_in_a_minute_waits_then_gets_451(make_proxy: ProxyFactory, upstream: ScriptedUpstream, pki: Any) -> None:
    port = paced_proxy(make_proxy, upstream, "max_messages_per_minute = 2\npacing_timeout = 0.5")
    with login(port, pki) as smtp:
        for _ in range(2):
            assert smtp.sendmail(f"{CLIENT_USER}@example.org", ["bob@example.net"], MESSAGE) == {}
        code, text = smtp.mail(f"{CLIENT_USER}@example.org")
    assert (code, text) == (451, b"4.7.0 Upstream default is at its max_messages_per_minute, try again later")
    assert upstream.final_dots == 2


def test_a_failed_graph_session_gives_its_slot_back(make_proxy: ProxyFactory, graph: Any, tmp_path: Any, pki: Any) -> None:
    from graph_standin import drop

    # A dropped request is a session failure (the relay then drops the session), not a verdict.
    graph.script("sendMail", drop())
    port = make_proxy(graph.upstream_toml(tmp_path, extra="max_sessions = 1\npacing_timeout = 0.5\n"),
                      extra=f'[users.{CLIENT_USER}]\nupstream = "m365"\n').port
    message = b"From: alerts@example.org\r\nSubject: x\r\n\r\nx\r\n"
    for expected in (451, 250):
        with login(port, pki) as smtp:
            smtp.mail("alerts@example.org")
            smtp.rcpt("alice@example.net")
            assert smtp.data(message)[0] == expected
