"""Test doubles for applications that use dwcp: a fake transport, a fake layer, a fake clock.

``Manager(FakeTransport(), clock=FakeClock())`` runs recovery cycles with no real waiting,
and every wait is recorded in ``FakeClock.slept``.
"""

from __future__ import annotations

import threading

__all__ = ["FakeClock", "FakeLayer", "FakeTransport"]


class FakeTransport:
    """An in-memory transport whose health and send behaviour a test switches.

    Set ``healthy = False`` to fail health checks, ``fail_sends`` to an exception to fail
    sends, ``start_error`` to fail starts, or ``send_gate`` to an event that sends wait on.
    ``sent`` holds what was sent; ``calls`` the lifecycle and check calls, in order.
    """

    def __init__(self) -> None:
        self.healthy = True
        self.fail_sends: BaseException | None = None
        self.send_gate: threading.Event | None = None
        self.start_error: BaseException | None = None
        self.started = 0
        self.closed = 0
        self.sent: list[bytes] = []
        self.send_calls = 0
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        """Count the start; raise ``start_error`` if set."""
        with self._lock:
            self.calls.append("start")
            self.started += 1
        if self.start_error is not None:
            raise self.start_error

    def close(self) -> None:
        """Count the close."""
        with self._lock:
            self.calls.append("close")
            self.closed += 1

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Record ``data``, after waiting on ``send_gate`` (10 s at most) and unless failing."""
        with self._lock:
            self.send_calls += 1
        if self.send_gate is not None:
            self.send_gate.wait(10)
        if self.fail_sends is not None:
            raise self.fail_sends
        with self._lock:
            self.sent.append(bytes(data))

    def health_check(self) -> None:
        """Raise ``ConnectionError`` while ``healthy`` is False."""
        with self._lock:
            self.calls.append("health_check")
        if not self.healthy:
            raise ConnectionError("peer unreachable")

    def __repr__(self) -> str:
        return f"<FakeTransport healthy={self.healthy} sent={len(self.sent)}>"


class FakeLayer:
    """A protocol layer with a switchable health and a record of lifecycle calls.

    ``heal_on_restart`` makes a stop/start cycle set ``healthy``; ``hang`` makes
    ``is_healthy()`` wait on an event (a hung check).
    """

    def __init__(self, name: str = "layer") -> None:
        self.name = name
        self.healthy = True
        self.heal_on_restart = False
        self.hang: threading.Event | None = None
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        """Record the start; heal if ``heal_on_restart`` and it was stopped before."""
        with self._lock:
            self.calls.append("start")
            if self.heal_on_restart and "stop" in self.calls:
                self.healthy = True

    def stop(self) -> None:
        """Record the stop."""
        with self._lock:
            self.calls.append("stop")

    def is_healthy(self) -> bool:
        """``healthy``, after waiting on ``hang`` if set."""
        if self.hang is not None:
            self.hang.wait()
        return self.healthy

    def __repr__(self) -> str:
        return f"<FakeLayer {self.name!r} healthy={self.healthy}>"


class FakeClock:
    """A clock that moves only when told to or when something sleeps on it.

    ``sleep(seconds, interrupt)`` records ``seconds`` in ``slept``, moves the clock on by
    that much and returns at once, unless ``interrupt`` is already set (then it returns
    False without moving). A wait listed with ``block_on(seconds)`` really waits on
    ``interrupt`` instead, so a test can stop the manager in the middle of that backoff.

    Args:
        start: the initial reading of ``now()``.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._lock = threading.Lock()
        self._blocking: set[float] = set()
        self.slept: list[float] = []
        self.blocked = threading.Event()

    def now(self) -> float:
        """The current fake time, in seconds."""
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock on by ``seconds``."""
        if seconds < 0:
            raise ValueError(f"seconds must be non-negative, got {seconds!r}")
        with self._lock:
            self._now += seconds

    def block_on(self, seconds: float) -> None:
        """Make every later wait of exactly ``seconds`` block until it is interrupted."""
        with self._lock:
            self._blocking.add(float(seconds))

    def sleep(self, seconds: float, interrupt: threading.Event) -> bool:
        """Record the wait and move the clock on; False when ``interrupt`` ends it."""
        with self._lock:
            self.slept.append(seconds)
            blocking = seconds in self._blocking
        if blocking:
            self.blocked.set()
            interrupt.wait()
            return False
        if interrupt.is_set():
            return False
        self.advance(seconds)
        return True

    def __repr__(self) -> str:
        return f"<FakeClock now={self.now():g}>"
