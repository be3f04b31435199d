"""Event delivery: its own thread, bounded queue, and a close() that a stuck listener cannot hang."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

import dwcp
from dwcp._events import _Dispatcher
from tests.conftest import wait_until


def test_full_queue_drops_and_counts_and_close_is_bounded() -> None:
    release = threading.Event()
    seen: list[dwcp.Event] = []

    def stuck(event: dwcp.Event) -> None:
        seen.append(event)
        release.wait(30)

    dispatcher = _Dispatcher(maxsize=3)
    dispatcher.add(stuck)
    dispatcher.open()
    try:
        dispatcher.publish(dwcp.SendRejected("open"))
        wait_until(lambda: len(seen) == 1)
        for _ in range(10):
            dispatcher.publish(dwcp.SendRejected("open"))
        assert dispatcher.dropped == 10 - 3
        began = time.monotonic()
        dispatcher.close(timeout=0.2)
        assert time.monotonic() - began < 5.0  # the stuck listener would hold it 10 s
    finally:
        release.set()
    wait_until(lambda: not any(t.name == "dwcp-events" for t in threading.enumerate()))


def test_a_restarted_dispatcher_does_not_share_events_with_an_abandoned_thread() -> None:
    release = threading.Event()
    first_run: list[dwcp.Event] = []
    dispatcher = _Dispatcher()

    def stuck(event: dwcp.Event) -> None:
        first_run.append(event)
        release.wait(10)

    dispatcher.add(stuck)
    dispatcher.open()
    dispatcher.publish(dwcp.SendRejected("open"))
    wait_until(lambda: len(first_run) == 1)
    dispatcher.close(timeout=0.1)  # the stuck thread is abandoned with the old queue
    dispatcher.open()
    later = dwcp.SendRejected("half-open")
    dispatcher.publish(later)
    release.set()
    wait_until(lambda: later in first_run)  # delivered once, by the new thread
    dispatcher.close()
    assert first_run.count(later) == 1
    wait_until(lambda: not any(t.name == "dwcp-events" for t in threading.enumerate()))


def test_every_event_names_its_manager_and_peer_keyword_only() -> None:
    events = [
        dwcp.ComponentUnhealthy("transport", "down"),
        dwcp.ComponentEscalated("transport", 3, 60.0),
        dwcp.RecoveryStarted("transport", None),
        dwcp.RecoveryAttempt("transport", 1, 1.0),
        dwcp.RecoverySucceeded("transport", 1, 0.5),
        dwcp.RecoveryFailed("transport", 3, None),
        dwcp.BreakerStateChanged("closed", "open"),
        dwcp.SendRejected("open"),
    ]
    for event in events:
        assert (event.manager, event.peer) == ("", ""), event
        named = dataclasses.replace(event, manager="payments", peer="10.0.0.7:7400")
        assert named != event  # the manager is part of an event's identity
        assert (named.manager, named.peer) == ("payments", "10.0.0.7:7400")
    with pytest.raises(TypeError):
        dwcp.SendRejected("open", 1.0, "payments")  # type: ignore[call-arg]


def test_breaker_events_say_from_state_and_to_state_and_keep_old_and_new() -> None:
    event = dwcp.BreakerStateChanged("half-open", "open")
    assert (event.from_state, event.to_state) == ("half-open", "open")
    assert (event.old, event.new) == ("half-open", "open")
    assert event == dwcp.BreakerStateChanged(from_state="half-open", to_state="open")


def test_the_dispatcher_stamps_its_manager_and_peer_on_delivery() -> None:
    seen: list[dwcp.Event] = []
    dispatcher = _Dispatcher(manager="payments", peer="10.0.0.7:7400")
    dispatcher.add(seen.append)
    dispatcher.open()
    try:
        dispatcher.publish(dwcp.SendRejected("open"))
        dispatcher.publish(dwcp.SendRejected("open", manager="other", peer="::1"))
        wait_until(lambda: len(seen) == 2)  # stamped on delivery, so wait before changing it
        dispatcher.peer = "10.0.0.8:7400"  # the transport moved on
        dispatcher.publish(dwcp.SendRejected("half-open"))
        wait_until(lambda: len(seen) == 3)
    finally:
        dispatcher.close()
    assert [(e.manager, e.peer) for e in seen] == [
        ("payments", "10.0.0.7:7400"),
        ("other", "::1"),
        ("payments", "10.0.0.8:7400"),
    ]
