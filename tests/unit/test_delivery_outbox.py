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
