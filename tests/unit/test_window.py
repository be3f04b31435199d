"""The sender's window without sockets: its bounds, waiting for room, deadlines, endings.

Threads that wait in ``reserve`` are observed through the window's own count of waiters
(polled with a deadline); a waiter counted there is inside ``Condition.wait``, since it
counts itself under the lock that ``wait`` releases, so nothing here depends on timing.
"""

from __future__ import annotations

import threading
import time

from dwcp.transport._window import Window
from tests.conftest import wait_until

FAR = 30.0  # a deadline no passing test reaches


def never() -> bool:
    return False


def fill(window: Window, sizes: list[int]) -> None:
    """Reserve and add one message per size, ids 0, 1, ... (what a send does)."""
    for size in sizes:
        assert window.reserve(size, time.monotonic() + FAR, never)
        window.add(window.last + 1, bytes(size))


def waiting_reserve(
    window: Window, size: int, broken: threading.Event | None = None
) -> tuple[threading.Thread, list[bool]]:
    """A thread blocked in ``reserve``; its result lands in the list."""
    outcome: list[bool] = []
    before = window._room_waiting
    ended = never if broken is None else broken.is_set

    def run() -> None:
        outcome.append(window.reserve(size, time.monotonic() + FAR, ended))

    thread = threading.Thread(target=run, name="test-reserve", daemon=True)
    thread.start()
    wait_until(lambda: window._room_waiting > before)
    return thread, outcome


def test_the_window_is_bounded_by_messages_and_by_bytes() -> None:
    by_count = Window(2, 1 << 20)
    fill(by_count, [10, 10])
    assert not by_count.reserve(10, time.monotonic(), never)
    by_bytes = Window(100, 1000)
    fill(by_bytes, [600])
    assert not by_bytes.reserve(500, time.monotonic(), never)
    assert by_bytes.reserve(400, time.monotonic(), never)
    # A message larger than the whole byte window still goes, alone.
    alone = Window(100, 1000)
    assert alone.reserve(5000, time.monotonic(), never)
    assert not alone.reserve(1, time.monotonic(), never)


def test_room_freed_by_an_acknowledgement_goes_to_the_waiting_sends_at_once() -> None:
    # Not held back for a larger batch: a shut-until-a-quarter-is-free window was tried
    # (fewer wake-ups per ACK) and measured no faster, while a send near its send_timeout
    # spent more of it waiting for room, leaving less for its acknowledgement (wait=True).
    window = Window(8, 1 << 20)
    fill(window, [10] * 8)
    waiters = [waiting_reserve(window, 10) for _ in range(2)]
    assert window.ack(1) == 2
    for thread, outcome in waiters:
        thread.join(FAR)
        assert outcome == [True]
    assert window.count == 8 and window.bytes == 80


def test_a_message_too_large_for_the_room_left_waits_while_smaller_ones_pass() -> None:
    window = Window(100, 1000)
    fill(window, [300, 300])
    thread, outcome = waiting_reserve(window, 500)
    assert window.reserve(100, time.monotonic(), never)  # fits: not held up by the waiter
    window.add(2, bytes(100))
    window.ack(0)  # 400 bytes taken: 500 fit now
    thread.join(FAR)
    assert outcome == [True] and window.bytes == 900


def test_cancelled_room_goes_to_a_waiting_send() -> None:
    window = Window(4, 1 << 20)
    fill(window, [10] * 3)
    assert window.reserve(10, time.monotonic(), never)  # reserved, never added
    thread, outcome = waiting_reserve(window, 10)
    window.cancel(10)
    thread.join(FAR)
    assert outcome == [True] and window.count == 4


def test_a_waiter_gives_up_once_the_session_is_broken() -> None:
    window = Window(2, 1 << 20)
    fill(window, [10, 10])
    broken = threading.Event()
    thread, outcome = waiting_reserve(window, 10, broken)
    broken.set()
    window.wake()
    thread.join(FAR)
    assert outcome == [False] and window.count == 2


def test_acknowledgements_are_cumulative_and_replay_keeps_the_rest_in_order() -> None:
    window = Window(8, 1 << 20)
    fill(window, [10, 20, 30, 40])
    assert window.ack(1) == 2
    assert window.ack(0) == 0  # at or below one already taken: nothing
    assert [message_id for message_id, _ in window.replay()] == [2, 3]
    assert window.pending == 2 and window.pending_bytes == 70
