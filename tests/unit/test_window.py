"""The sender's window without sockets: its bounds, waiting for room, deadlines, endings.

Threads that wait in ``wait_room`` are observed through the window's own count of waiters
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
    """Add one message per size, ids last + 1, ... (what a send does under its order lock)."""
    for size in sizes:
        assert window.fits(size)
        window.add(window.last + 1, bytes(size))


def waiting_for_room(
    window: Window, size: int, broken: threading.Event | None = None
) -> tuple[threading.Thread, list[bool]]:
    """A thread blocked in ``wait_room``; its result lands in the list."""
    outcome: list[bool] = []
    before = window._room_waiting
    ended = never if broken is None else broken.is_set

    def run() -> None:
        outcome.append(window.wait_room(size, time.monotonic() + FAR, ended))

    thread = threading.Thread(target=run, name="test-wait-room", daemon=True)
    thread.start()
    wait_until(lambda: window._room_waiting > before)
    return thread, outcome


def test_the_window_is_bounded_by_messages_and_by_bytes() -> None:
    by_count = Window(2, 1 << 20)
    fill(by_count, [10, 10])
    assert not by_count.fits(10)
    assert not by_count.wait_room(10, time.monotonic(), never)
    by_bytes = Window(100, 1000)
    fill(by_bytes, [600])
    assert not by_bytes.fits(500)
    assert by_bytes.fits(400)
    # A message larger than the whole byte window still goes, alone.
    alone = Window(100, 1000)
    assert alone.fits(5000)
    alone.add(0, bytes(5000))
    assert not alone.fits(1)
    assert alone.pending == 1 and (alone.added - alone.freed) == 5000


def test_room_freed_by_an_acknowledgement_goes_to_the_waiting_sends_at_once() -> None:
    # Not held back for a larger batch: a shut-until-a-quarter-is-free window was tried
    # (fewer wake-ups per ACK) and measured no faster, while a send near its send_timeout
    # spent more of it waiting for room, leaving less for its acknowledgement (wait=True).
    window = Window(8, 1 << 20)
    fill(window, [10] * 8)
    waiters = [waiting_for_room(window, 10) for _ in range(2)]
    assert window.ack(1) == 2
    for thread, outcome in waiters:
        thread.join(FAR)
        assert outcome == [True]
    assert window.pending == 6 and (window.added - window.freed) == 60


def test_a_message_too_large_for_the_room_left_waits_while_smaller_ones_pass() -> None:
    window = Window(100, 1000)
    fill(window, [300, 300])
    thread, outcome = waiting_for_room(window, 500)
    fill(window, [100])  # fits: not held up by the waiter
    window.ack(0)  # 400 bytes taken: 500 fit now
    thread.join(FAR)
    assert outcome == [True] and (window.added - window.freed) == 400


def test_a_waiter_gives_up_once_the_session_is_broken() -> None:
    window = Window(2, 1 << 20)
    fill(window, [10, 10])
    broken = threading.Event()
    thread, outcome = waiting_for_room(window, 10, broken)
    broken.set()
    window.wake()
    thread.join(FAR)
    assert outcome == [False] and window.pending == 2


def test_acknowledgements_are_cumulative_and_replay_keeps_the_rest_in_order() -> None:
    window = Window(8, 1 << 20)
    fill(window, [10, 20, 30, 40])
    assert window.ack(1) == 2
    assert window.ack(0) == 0  # at or below one already taken: nothing
    assert window.replay() == [(2, bytes(30)), (3, bytes(40))]
    assert window.pending == 2 and (window.added - window.freed) == 70
    assert window.ack(3) == 2 and window.pending == 0 and (window.added - window.freed) == 0
    assert window.replay() == [] and window.waiting_since() is None


def test_the_ack_timeout_runs_from_when_the_head_of_the_window_began_to_wait() -> None:
    # Measured from the last acknowledgement that made progress (or from when the window
    # filled from empty, or a replay): a link whose ACKs keep coming is not timed out, however
    # long a large window takes to drain.
    window = Window(8, 1 << 20)
    assert window.waiting_since() is None
    before = time.monotonic()
    fill(window, [10, 10, 10])
    first = window.waiting_since()
    assert first is not None and first >= before
    fill(window, [10])  # not empty before: the head still waits since the first add
    assert window.waiting_since() == first
    window.ack(0)
    after_ack = window.waiting_since()
    assert after_ack is not None and after_ack >= first
    assert window.ack(0) == 0 and window.waiting_since() == after_ack  # no progress
    window.replay()
    replayed = window.waiting_since()
    assert replayed is not None and replayed >= after_ack


def test_room_too_small_for_the_first_waiter_still_reaches_a_smaller_one() -> None:
    # 500 + 480 of 1,000 bytes in flight; an 800-byte send waits, then a 50-byte one. The ACK
    # of the 500 leaves room for the 50 only: it must go, though the 800 waited first (a
    # wake-up taken by a waiter that cannot use it used to leave the 50 asleep until the
    # next ACK, and with a slow consumer, to WINDOW_FULL with room to spare).
    window = Window(100, 1000)
    fill(window, [500, 480])
    large, large_outcome = waiting_for_room(window, 800)
    small, small_outcome = waiting_for_room(window, 50)
    window.ack(0)
    small.join(FAR)
    assert small_outcome == [True] and large.is_alive()
    window.ack(1)
    large.join(FAR)
    assert large_outcome == [True]


def test_the_next_acknowledgement_that_frees_room_calls_the_room_hook_once() -> None:
    # For Manager.deliver()'s thread, which waits for room without blocking in wait_room:
    # it pauses, and the ACK ends the pause (it had waited up to 50 ms past the room).
    window = Window(4, 1 << 20)
    fill(window, [10] * 4)
    calls: list[int] = []
    window.call_on_room(lambda: calls.append(window.pending))
    assert window.ack(-1) == 0  # cumulative, below any message: frees nothing, no call
    assert calls == []
    assert window.ack(0) == 1
    assert calls == [3]  # called after the room was freed, the lock released
    assert window.ack(2) == 2
    assert calls == [3]  # once: the next wait registers again
