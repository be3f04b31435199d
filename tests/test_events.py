"""Event delivery: its own thread, bounded queue, and a close() that a stuck listener cannot hang."""

from __future__ import annotations

import threading
import time

import dwcp
from dwcp.events import _Dispatcher
from tests.conftest import wait_until


def test_full_queue_drops_and_counts_and_close_is_bounded() -> None:
    release = threading.Event()
    seen: list[dwcp.Event] = []

    def stuck(event: dwcp.Event) -> None:
        seen.append(event)
        release.wait(10)

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
        assert time.monotonic() - began < 1.0
    finally:
        release.set()
    wait_until(lambda: not any(t.name == "dwcp-events" for t in threading.enumerate()))


def test_a_restarted_dispatcher_does_not_share_events_with_an_abandoned_thread() -> None:
    release = threading.Event()
    first_run: list[dwcp.Event] = []
    dispatcher = _Dispatcher()
    dispatcher.add(lambda e: (first_run.append(e), release.wait(10)))
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
