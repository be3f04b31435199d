"""The sender's window without sockets: bounds, the shut window's reopening mark, deadlines.

Threads that wait in ``reserve`` are observed through the window's own count of waiters
(polled with a deadline), and every state asserted while one waits is one that no
notification has left it since, so nothing here depends on thread timing.
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


def waiting_reserve(window: Window, size: int) -> tuple[threading.Thread, list[bool]]:
    """A thread blocked in ``reserve``; its result lands in the list."""
    outcome: list[bool] = []
    before = window._room_waiting

    def run() -> None:
        outcome.append(window.reserve(size, time.monotonic() + FAR, never))

    thread = threading.Thread(target=run, name="test-reserve", daemon=True)
    thread.start()
    wait_until(lambda: window._room_waiting > before)
    return thread, outcome


def test_a_full_window_stays_shut_until_a_quarter_of_it_is_acknowledged() -> None:
    window = Window(8, 1 << 20)
    fill(window, [10] * 8)
    threads = [waiting_reserve(window, 10) for _ in range(2)]
    assert window.full
    # One slot free: not handed out (the mark is 8 - 8 // 4 = 6 messages).
    assert window.ack(0) == 1
    assert window.full and window.count == 7
    assert all(not outcome for _, outcome in threads)
    assert window._room_waiting == 2
    # Down to the mark: reopened, and both waiters get room at once.
    assert window.ack(1) == 1
    for thread, outcome in threads:
        thread.join(FAR)
        assert outcome == [True]
    assert not window.full
    assert window.count == 8 and window.bytes == 80


def test_new_sends_wait_too_while_the_window_is_shut() -> None:
    window = Window(8, 1 << 20)
    fill(window, [10] * 8)
    _, first = waiting_reserve(window, 10)
    window.ack(0)
    # Room for one, but the window is shut: a later send queues behind the first.
    late, second = waiting_reserve(window, 10)
    assert not first and not second
    window.ack(2)
    late.join(FAR)
    assert second == [True] and window.count == 7


def test_the_byte_bound_shuts_and_reopens_the_window_as_well() -> None:
    window = Window(100, 1000)  # reopening mark: 750 bytes
    fill(window, [250] * 4)
    thread, outcome = waiting_reserve(window, 250)
    assert window.full
    window.ack(0)  # 750 bytes: at the mark
    thread.join(FAR)
    assert outcome == [True] and window.bytes == 1000


def test_at_its_deadline_a_send_takes_the_room_there_is_while_shut() -> None:
    window = Window(8, 1 << 20)
    fill(window, [10] * 8)
    assert not window.reserve(10, time.monotonic(), never)  # full: fails at once
    assert window.full
    window.ack(0)  # one slot, window still shut
    assert window.reserve(10, time.monotonic(), never)
    assert window.count == 8
    assert not window.reserve(10, time.monotonic(), never)


def test_a_message_too_large_for_the_room_left_is_woken_by_every_acknowledgement() -> None:
    # Under the reopening mark the window is not shut: a large message waits for its own
    # room, and smaller ones still pass it.
    window = Window(100, 1000)
    fill(window, [300, 300])
    thread, outcome = waiting_reserve(window, 500)
    assert not window.full
    assert window.reserve(100, time.monotonic(), never)  # fits: not held up by the waiter
    window.add(2, bytes(100))
    window.ack(0)  # 400 bytes taken: 500 fit now
    thread.join(FAR)
    assert outcome == [True] and window.bytes == 900


def test_a_window_of_one_hands_out_its_slot_as_soon_as_it_is_acknowledged() -> None:
    window = Window(1, 1 << 20)
    fill(window, [10])
    thread, outcome = waiting_reserve(window, 10)
    window.ack(0)
    thread.join(FAR)
    assert outcome == [True]


def test_cancelled_room_counts_towards_reopening() -> None:
    window = Window(4, 1 << 20)  # mark: 3 messages
    fill(window, [10] * 3)
    assert window.reserve(10, time.monotonic(), never)  # reserved, never added
    thread, outcome = waiting_reserve(window, 10)
    assert window.full
    window.cancel(10)
    thread.join(FAR)
    assert outcome == [True] and window.count == 4


def test_a_waiter_gives_up_once_the_session_is_broken() -> None:
    window = Window(2, 1 << 20)
    fill(window, [10, 10])
    broken = threading.Event()
    outcome: list[bool] = []
    thread = threading.Thread(
        target=lambda: outcome.append(window.reserve(10, time.monotonic() + FAR, broken.is_set)),
        name="test-reserve",
        daemon=True,
    )
    thread.start()
    wait_until(lambda: window._room_waiting == 1)
    broken.set()
    window.wake()
    thread.join(FAR)
    assert outcome == [False] and window.count == 2
