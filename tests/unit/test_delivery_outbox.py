"""The delivery outbox against a guarded send that keeps failing: the pause before each retry."""

from __future__ import annotations

import itertools
import threading
import time

from dwcp._delivery import Outbox
from dwcp._errors import TransportError


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

    outbox = Outbox(
        send,
        lambda: "closed",
        Window(),  # type: ignore[arg-type]
        budget=1024,
        timeout=60.0,
        max_block=1.0,
        name="test",
    )
    outbox.open()
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


def test_a_deadline_that_passes_while_its_caller_sends_still_fails_the_message() -> None:
    # The thread's deadline pass skips the message a caller is sending; deliver() puts its
    # deadline back once the send returned, so the message still fails in time.
    release = threading.Event()
    sending = threading.Event()
    window = Unconfirmed()

    def send(data: bytes) -> None:
        sending.set()
        assert release.wait(30.0)
        window.last += 1

    outbox = Outbox(
        send,
        lambda: "closed",
        window,  # type: ignore[arg-type]
        budget=1024,
        timeout=60.0,
        max_block=1.0,
        name="test",
    )
    outbox.open()
    handles = []
    caller = threading.Thread(target=lambda: handles.append(outbox.deliver(b"x", 0.05, None)))
    caller.start()
    try:
        assert sending.wait(30.0)
        # The thread's pass at the deadline found nothing else to wait for.
        deadline = time.monotonic() + 30.0
        while outbox._next_expiry != float("inf"):
            assert time.monotonic() < deadline, "the deadline pass did not run"
            sending.wait(0.01)
        release.set()
        caller.join(30.0)
        error = handles[0].exception(timeout=30.0)
        assert error is not None and (error.code, error.sent) == ("DELIVERY_TIMEOUT", True)
    finally:
        release.set()
        caller.join(30.0)
        outbox.close()
        outbox.join(time.monotonic() + 10.0)
