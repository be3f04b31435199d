"""The delivery outbox against a guarded send that keeps failing: the pause before each retry."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence

from dwcp._delivery import Delivery, DeliveryError
from dwcp._errors import DWCPError, TransportError
from dwcp._outbox import Outbox
from tests.conftest import wait_until


def _opened(
    send: Callable[[bytes], None],
    window: object,
    *,
    budget: int,
    timeout: float,
    max_block: float,
    send_run: Callable[[Sequence[bytes]], int] | None = None,
) -> Outbox:
    """An open outbox over ``send`` (and ``send_run``, if given) reading ``window``'s marks
    (a closed breaker)."""
    outbox = Outbox(
        send,
        lambda: "closed",
        window,  # type: ignore[arg-type]
        send_run=send_run,
        budget=budget,
        timeout=timeout,
        max_block=max_block,
        name="test",
    )
    outbox.open()
    return outbox


class Window:
    """What the outbox reads from an acknowledged transport: its window's marks."""

    def _delivery_marks(self) -> tuple[int, int]:
        return (-1, -1)


class Unconfirmed:
    """A window that holds every message sent and confirms none."""

    def __init__(self) -> None:
        self.last = -1

    def _delivery_marks(self) -> tuple[int, int]:
        return (self.last, -1)


def test_a_failed_send_is_retried_after_a_pause_doubling_from_50_ms_to_1_s() -> None:
    tries: list[float] = []
    enough = threading.Event()

    def send(data: bytes) -> None:
        tries.append(time.monotonic())
        if len(tries) >= 8:
            enough.set()
        raise TransportError("peer down")

    outbox = _opened(send, Window(), budget=1024, timeout=60.0, max_block=1.0)
    handle = outbox.deliver(b"x", None, None)
    try:
        assert enough.wait(30.0)
    finally:
        outbox.close()
        outbox.join(time.monotonic() + 10.0)
    gaps = [later - earlier for earlier, later in itertools.pairwise(tries)]
    # Waits can only run late on a busy machine: each gap is at least its pause.
    for gap, pause in zip(gaps, [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]):
        assert gap >= pause * 0.99, (gaps, pause)
    error = handle.exception(timeout=10.0)
    assert error is not None and (error.code, error.sent) == ("STOPPED", False)


def test_a_deadline_that_passes_while_its_caller_sends_fails_the_message_at_its_deadline() -> None:
    # Outside attack on #23: with the window full, deliver(timeout=0.5) sending the message
    # itself settled only when its send returned, send_timeout (4-10 s) after the deadline.
    # It fails at its deadline (sent=True: part of it may be on its way); the send that
    # returns later changes nothing.
    release = threading.Event()
    sending = threading.Event()
    settled = threading.Event()
    window = Unconfirmed()
    seen: list[Delivery] = []

    def send(data: bytes) -> None:
        sending.set()
        assert release.wait(30.0)
        window.last += 1

    def on_settled(handle: Delivery) -> None:
        seen.append(handle)
        settled.set()

    outbox = _opened(send, window, budget=1024, timeout=60.0, max_block=1.0)
    handles = []
    caller = threading.Thread(target=lambda: handles.append(outbox.deliver(b"x", 0.05, on_settled)))
    caller.start()
    try:
        assert sending.wait(30.0)
        assert settled.wait(30.0), "the message did not fail while its send was held"
        assert caller.is_alive()  # deliver() itself still waits for its send
        error = seen[0].exception(timeout=0)
        assert error is not None and (error.code, error.sent) == ("DELIVERY_TIMEOUT", True)
        assert outbox._used == 0  # its bytes are back in the budget
        release.set()
        caller.join(30.0)
        assert handles == [seen[0]]
        outbox.flush(10.0)  # nothing left to wait for: it settled once
        assert seen == [handles[0]] and outbox._used == 0 and not outbox._unstamped
    finally:
        release.set()
        caller.join(30.0)
        outbox.close()
        outbox.join(time.monotonic() + 10.0)


class Confirming:
    """A window that confirms what the test says (``acked``)."""

    def __init__(self) -> None:
        self.last = -1
        self.acked = -1

    def _delivery_marks(self) -> tuple[int, int]:
        return (self.last, self.acked)


def test_deliver_from_a_done_callback_with_no_room_raises_buffer_full_at_once() -> None:
    # Outside attack on #23: a deliver() in a done callback waited for room in the budget
    # that only the dwcp-delivery thread (running that callback) frees: every handle stopped
    # settling for delivery_max_block (60 s by default).
    window = Confirming()
    outcome: list[tuple[str, float]] = []

    def send(data: bytes) -> None:
        window.last += 1

    def again(handle: Delivery) -> None:
        began = time.monotonic()
        try:
            outbox.deliver(bytes(250), None, None)
        except DeliveryError as exc:
            outcome.append((exc.code, time.monotonic() - began))
        else:
            outcome.append(("accepted", time.monotonic() - began))

    outbox = _opened(send, window, budget=300, timeout=600.0, max_block=600.0)
    try:
        outbox.deliver(bytes(100), None, again)  # id 0, confirmed below
        wait_until(lambda: bool(outbox._inflight))  # marked with id 0 alone
        outbox.deliver(bytes(100), None, None)  # id 1, never confirmed: 100 of 300 held
        wait_until(lambda: window.last == 1)
        window.acked = 0
        wait_until(lambda: bool(outcome), timeout=60.0)
        code, waited = outcome[0]
        assert code == "BUFFER_FULL" and waited < 30.0  # 100 + 250 > 300: no waiting
    finally:
        outbox.close()
        outbox.join(time.monotonic() + 10.0)


def test_a_callback_that_raises_system_exit_does_not_stop_the_delivery_thread() -> None:
    # Outside attack on #23: sys.exit() in a done callback ended dwcp-delivery: no handle
    # settled after it, and flush() without a timeout would never return.
    window = Confirming()

    def send(data: bytes) -> None:
        window.last += 1
        window.acked = window.last  # confirmed at once

    def leave(handle: Delivery) -> None:
        raise SystemExit(1)

    outbox = _opened(send, window, budget=1 << 20, timeout=600.0, max_block=1.0)
    try:
        handles = [outbox.deliver(b"x", None, leave if n % 2 else None) for n in range(20)]
        outbox.flush(30.0)
        later = [outbox.deliver(b"y", None, None) for _ in range(5)]
        outbox.flush(30.0)
        assert all(handle.done() for handle in handles + later)
    finally:
        outbox.close()
        outbox.join(time.monotonic() + 10.0)


def test_a_lone_message_its_caller_still_sends_fails_at_its_deadline_after_the_thread_slept() -> (
    None
):
    # Outside attack on #23: the thread, asleep with nothing to do, was not told of a lone
    # message's deadline; a 30 MB deliver(timeout=0.5) to a paused receiver settled 4.5 s
    # late, when something else woke the thread.
    window = Confirming()
    release = threading.Event()
    settled = threading.Event()

    def send(data: bytes) -> None:
        if data == b"held":
            assert release.wait(60.0)
        window.last += 1
        window.acked = window.last

    outbox = _opened(send, window, budget=1 << 20, timeout=600.0, max_block=1.0)
    caller = threading.Thread(
        target=outbox.deliver, args=(b"held", 0.2, lambda handle: settled.set())
    )
    try:
        outbox.deliver(b"first", None, None).result(timeout=30.0)
        wait_until(lambda: outbox._asleep, timeout=30.0)  # nothing left to poll for
        began = time.monotonic()
        caller.start()
        assert settled.wait(30.0)  # at its deadline, not when the send returns
        assert time.monotonic() - began < 20.0
    finally:
        release.set()
        caller.join(30.0)
        outbox.close()
        outbox.join(time.monotonic() + 10.0)


def test_deliver_waits_for_room_no_longer_than_the_messages_own_timeout() -> None:
    # Outside attack on #23: deliver(timeout=0.5) blocked for room until delivery_max_block
    # (or until room came, 2.5 s past its deadline) and returned a handle already failed.
    window = Unconfirmed()

    def send(data: bytes) -> None:
        window.last += 1

    outbox = _opened(send, window, budget=100, timeout=600.0, max_block=600.0)
    try:
        outbox.deliver(bytes(100), None, None)  # the budget is full, never confirmed
        began = time.monotonic()
        try:
            outbox.deliver(bytes(50), 0.3, None)
        except DeliveryError as exc:
            assert exc.code == "BUFFER_FULL"
        else:
            raise AssertionError("deliver() took a message that had no room by its deadline")
        assert time.monotonic() - began < 30.0  # its timeout, not delivery_max_block
    finally:
        outbox.close()
        outbox.join(time.monotonic() + 10.0)


def test_flush_and_result_in_a_done_callback_do_not_wait_for_the_thread_running_it() -> None:
    # Outside attack on #23: flush() (no timeout) or a later handle's result() in a done
    # callback waited for the dwcp-delivery thread, which was running that callback: it hung
    # for good, and no handle settled again, not even at stop().
    window = Confirming()
    seen: list[str] = []
    later: list[Delivery] = []

    def send(data: bytes) -> None:
        window.last += 1

    def wait_in_callback(handle: Delivery) -> None:
        try:
            outbox.flush(None)
        except DeliveryError as exc:
            seen.append(exc.code)
        try:
            later[0].result(None)
        except TimeoutError:
            seen.append("TimeoutError")

    outbox = _opened(send, window, budget=1 << 20, timeout=600.0, max_block=1.0)
    try:
        first = outbox.deliver(b"first", None, wait_in_callback)
        wait_until(lambda: bool(outbox._inflight), timeout=30.0)  # marked with id 0 alone
        later.append(outbox.deliver(b"second", None, None))  # never confirmed
        wait_until(lambda: window.last == 1, timeout=30.0)
        window.acked = 0  # the first is confirmed: its callback runs
        wait_until(lambda: len(seen) == 2, timeout=30.0)
        assert seen == ["FLUSH_TIMEOUT", "TimeoutError"]
        assert first.exception(timeout=30.0) is None
        assert not later[0].done()
    finally:
        outbox.close()
        outbox.join(time.monotonic() + 10.0)
    error = later[0].exception(timeout=30.0)  # the thread went on, and failed it at stop
    assert error is not None and error.code == "STOPPED"


def test_a_deliver_waiting_for_room_is_refused_as_soon_as_the_manager_begins_to_stop() -> None:
    # Outside attack on #23: a deliver() blocked on the budget waited while stop() closed the
    # transport (up to the keepalive bound, 14.5 s) before it was refused.
    window = Unconfirmed()

    def send(data: bytes) -> None:
        window.last += 1

    outbox = _opened(send, window, budget=100, timeout=600.0, max_block=600.0)
    outcome: list[str] = []

    def blocked() -> None:
        try:
            outbox.deliver(bytes(50), None, None)
        except DWCPError as exc:
            outcome.append(exc.code)

    outbox.deliver(bytes(100), None, None)  # the budget is full, never confirmed
    waiter = threading.Thread(target=blocked)
    waiter.start()
    try:
        wait_until(lambda: outbox._waiters == 1, timeout=30.0)
        outbox.refuse()  # Manager.stop()'s first step
        waiter.join(30.0)
        assert outcome == ["NOT_STARTED"]
    finally:
        outbox.close()
        waiter.join(30.0)
        outbox.join(time.monotonic() + 10.0)


class FullWindow:
    """A transport whose window is full until an acknowledgement frees it (the test calls
    the hook the outbox left, as a reader thread does), and confirms what is sent."""

    def __init__(self) -> None:
        self.last = -1
        self.hooks: list[Callable[[], None]] = []
        self.full = True

    def _delivery_marks(self) -> tuple[int, int]:
        # While full, one more is in flight (so messages queue); after, all are confirmed.
        return (self.last + self.full, self.last)

    def _room_for_delivery(self, size: int, wake: Callable[[], None] | None = None) -> bool:
        if self.full and wake is not None:
            self.hooks.append(wake)
        return not self.full


def test_the_thread_sends_as_soon_as_an_acknowledgement_frees_room_in_a_full_window() -> None:
    # It polled for room instead, from 1 ms doubling to 50 ms per full window: a stream of
    # 1 KiB messages filled the window 9-69 times in 20,000 and the link idled meanwhile.
    # The poll here is an hour: only the acknowledgement's hook can end the pause in time.
    window = FullWindow()
    sent = threading.Event()

    def send(data: bytes) -> None:
        window.last += 1
        sent.set()

    # A run takes none of them: each goes on its own, after a look for room.
    outbox = _opened(
        send, window, budget=1024, timeout=600.0, max_block=1.0, send_run=lambda messages: 0
    )
    outbox._room_poll = 3600.0
    try:
        handle = outbox.deliver(b"x", None, None)
        wait_until(lambda: bool(window.hooks), timeout=30.0)  # it found no room
        assert not sent.is_set()
        window.full = False
        window.hooks[0]()  # the acknowledgement that frees room
        assert sent.wait(30.0), "the thread slept out its poll after room was freed"
        assert handle.exception(timeout=30.0) is None
    finally:
        outbox.close()
        outbox.join(time.monotonic() + 10.0)


def test_a_message_queued_behind_a_long_retry_pause_still_fails_at_its_deadline() -> None:
    # deliver() wakes the idle thread only when the queue was empty or the new deadline
    # comes before the thread would wake: the second case is this one.
    def send(data: bytes) -> None:
        raise TransportError("peer down")

    outbox = _opened(send, Window(), budget=1024, timeout=600.0, max_block=1.0)
    outbox._retry = 30.0  # the first failure pauses the thread for 30 s
    try:
        first = outbox.deliver(b"x", None, None)  # sent inline, failed: queued, pausing
        wait_until(lambda: outbox._idle and outbox._wake_at > time.monotonic() + 10.0)
        failed = threading.Event()  # (waiting on the handle would wake the thread itself)
        late = outbox.deliver(b"y", 0.05, lambda handle: failed.set())
        assert failed.wait(10.0), "it failed only after the 30 s pause"
        error = late.exception(timeout=0)
        assert error is not None and (error.code, error.sent) == ("DELIVERY_TIMEOUT", False)
        assert not first.done()
    finally:
        outbox.close()
        outbox.join(time.monotonic() + 10.0)


def test_messages_confirmed_as_the_outbox_closes_still_run_their_callbacks_once() -> None:
    # Outside attack on #23: the messages Manager.stop()'s transport close confirmed were
    # settled by the thread's last look, which then ended without running their callbacks
    # (done() and confirmed, callback never called: 3 of 100, 5 of 5 runs).
    class ConfirmedAtClose(Confirming):
        """Confirms everything sent, seen only once the outbox is closing (as a transport
        whose close waited for the last confirmations)."""

        def _delivery_marks(self) -> tuple[int, int]:
            closing = bool(opened) and opened[0]._closing
            return (self.last, self.last if closing else -1)

    window = ConfirmedAtClose()
    opened: list[Outbox] = []
    ran: list[Delivery] = []

    def send(data: bytes) -> None:
        window.last += 1

    outbox = _opened(send, window, budget=1024, timeout=600.0, max_block=1.0)
    opened.append(outbox)
    handles = [outbox.deliver(b"x", None, ran.append) for _ in range(3)]
    wait_until(lambda: window.last == 2 and not outbox._queue and outbox._inline is None)
    outbox.close()
    outbox.join(time.monotonic() + 10.0)
    assert all(handle.done() and handle.exception(timeout=0) is None for handle in handles)
    assert sorted(map(id, ran)) == sorted(map(id, handles))  # each callback once
