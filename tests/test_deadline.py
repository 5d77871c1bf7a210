"""Deadline: fires when the latest start says; stopped, it leaves no call pending."""

from __future__ import annotations

from twisted.internet.task import Clock

from relayproxy.deadline import Deadline


def deadline() -> tuple[Deadline, Clock, list[float]]:
    clock = Clock()
    fired: list[float] = []
    return Deadline(clock, lambda: fired.append(clock.seconds())), clock, fired


def test_fires_after_the_time_given() -> None:
    d, clock, fired = deadline()
    d.start(300)
    clock.advance(299.9)
    assert fired == [] and d.running
    clock.advance(0.1)
    assert fired == [300] and not d.running
    assert clock.getDelayedCalls() == []


def test_started_again_it_fires_from_the_last_start() -> None:
    d, clock, fired = deadline()
    d.start(300)
    for _ in range(5):
        clock.advance(200)
        d.start(300)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(299)
    assert fired == []
    clock.advance(1)
    assert fired == [1300]


def test_a_shorter_time_moves_it_earlier() -> None:
    d, clock, fired = deadline()
    d.start(300)
    d.start(180)
    clock.advance(180)
    assert fired == [180]
    clock.advance(300)
    assert fired == [180]


def test_stopped_it_does_not_fire_until_started_again() -> None:
    d, clock, fired = deadline()
    d.start(300)
    clock.advance(100)
    d.stop()
    clock.advance(1000)
    assert fired == [] and clock.getDelayedCalls() == []
    d.start(300)
    clock.advance(300)
    assert fired == [1400]


def test_stopped_and_started_before_the_old_call_fires() -> None:
    d, clock, fired = deadline()
    d.start(300)
    d.stop()
    clock.advance(250)
    d.start(300)
    clock.advance(50)
    assert fired == []
    clock.advance(250)
    assert fired == [550]


def test_stop_leaves_no_call() -> None:
    d, clock, fired = deadline()
    d.start(300)
    d.stop()
    assert clock.getDelayedCalls() == []
    clock.advance(1000)
    assert fired == []
