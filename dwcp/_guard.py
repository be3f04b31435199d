"""Guarded calls: admit through the breaker, run the I/O with no lock held, record the result.

Failures are classified by ``PEER_FAILURES``: ``OSError`` and ``TransportError`` are the peer
or the network failing and count against the breaker; anything else is the caller's and does
not.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from time import perf_counter
from typing import Any, TypeVar

from dwcp._breaker import Breaker
from dwcp._errors import DWCPError
from dwcp._events import SendRejected, _Dispatcher
from dwcp._slots import PEER_FAILURES
from dwcp._status import Counters, SendTallies

__all__ = ["Guard"]

R = TypeVar("R")
#: A send is timed when its thread's success count is a multiple of SEND_SAMPLE (a power of
#: two: the test is a mask), so about one in SEND_SAMPLE is.
SEND_SAMPLE = 64
#: One timed send in SUSPICION_SAMPLE // SEND_SAMPLE also feeds the transport's suspicion.
SUSPICION_SAMPLE = 128


class Guard:
    """Guarded calls through one breaker, and the slow paths of the guarded send.

    The send's hot path itself is ``Manager.send_with_circuit_breaker``: a 1 KiB send costs a
    few microseconds, and every Python frame between the caller and the transport is a
    measurable share of that (benchmark scenario 1).
    """

    def __init__(
        self,
        breaker: Breaker,
        events: _Dispatcher,
        lock: threading.RLock,
        counters: Counters,
        on_send: Callable[[float, bool], None] | None = None,
    ) -> None:
        self._on_send = on_send
        self._breaker = breaker
        self._events = events
        self._lock = lock
        self._counters = counters
        self.tallies = SendTallies()

    def rejected(self) -> None:
        """A call the breaker refused: tell the listeners."""
        if self._events.active:
            self._events.publish(SendRejected(self._breaker.state))

    def send_failed(
        self, ticket: int, exc: BaseException, tally: list[float], began: float | None
    ) -> None:
        """Account a send the peer failed, timed from ``began`` when it was sampled."""
        seconds = 0.0
        if began is not None:
            seconds = perf_counter() - began
            self.tallies.observe(tally, seconds)
        self._failed(ticket, exc)
        if self._on_send is not None:
            self._on_send(seconds, False)  # every failure raises the suspicion

    def send_timed(self, tally: list[float], seconds: float) -> None:
        """Record a sampled successful send's duration; a sparser sample feeds the suspicion."""
        self.tallies.observe(tally, seconds)
        # The suspicion update takes the manager's lock (about 3 us).
        if not tally[0] % SUSPICION_SAMPLE and self._on_send is not None:
            self._on_send(seconds, True)

    def call(self, fn: Callable[..., R], args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
        """``fn(*args, **kwargs)``; its exceptions propagate unchanged."""
        ticket = self._admit()
        try:
            result = fn(*args, **kwargs)
        except PEER_FAILURES as exc:
            self._failed(ticket, exc)
            raise
        except BaseException:
            self._breaker.release(ticket)
            raise
        self._breaker.record_success(ticket)
        return result

    def _admit(self) -> int:
        try:
            return self._breaker.admit()
        except DWCPError:
            self.rejected()
            raise

    def _failed(self, ticket: int, error: BaseException) -> None:
        self._breaker.record_failure(ticket, error)
        with self._lock:
            self._counters.send_errors += 1
