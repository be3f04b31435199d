"""The guarded path: admit through the breaker, run the I/O with no lock held, record the result.

Failures are classified once, here: ``OSError`` and ``TransportError`` are the peer or the
network failing and count against the breaker; anything else is the caller's and does not.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable
from time import perf_counter
from typing import Any, TypeVar

from dwcp._breaker import Breaker
from dwcp._errors import DWCPError, TransportError
from dwcp._events import SendRejected, _Dispatcher
from dwcp._latency import SEND_BUCKETS
from dwcp._slots import PEER_FAILURES
from dwcp._status import Counters, SendTallies
from dwcp._validation import describe

__all__ = ["Guard"]

R = TypeVar("R")
SEND_SAMPLE = 16
SUSPICION_SAMPLE = 128  # a multiple of SEND_SAMPLE
_BYTES_LIKE = (bytes, bytearray, memoryview)


class Guard:
    """Sends and guarded calls through one breaker, with their counters."""

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
        self._local = self.tallies.local

    def send(self, transport: Any, data: bytes | bytearray | memoryview) -> None:
        """``transport.send(data)``; a peer failure is raised as ``TransportError``."""
        if not isinstance(data, _BYTES_LIKE):
            raise TypeError(
                f"data must be bytes, bytearray or memoryview, got {type(data).__name__} "
                "(wrap other buffers in memoryview())"
            )
        breaker = self._breaker
        try:
            ticket = breaker.admit()
        except DWCPError:
            self._rejected()
            raise
        # The tally (SendTallies, inlined: this is the library's hottest path).  One send in
        # SEND_SAMPLE per thread, successful or not, is timed into the histogram: a steady
        # sample gives the distribution, where timing every send cost about a tenth of a
        # 1 KiB send.
        try:
            tally = self._local.value
        except AttributeError:
            tally = self._local.value = self.tallies.new_tally()
        tally[-1] += 1
        timed = not tally[-1] % SEND_SAMPLE
        began = perf_counter() if timed else 0.0
        try:
            transport.send(data)
        except PEER_FAILURES as exc:
            # A transport that recovery closed and could not restart fails too: while the
            # manager runs, that is the peer being down, so it counts like any other failure.
            seconds = perf_counter() - began if timed else 0.0
            if timed:
                self.tallies.failed(seconds)
            self._failed(ticket, exc)
            if self._on_send is not None:
                self._on_send(seconds, False)  # every failure raises the suspicion
            if isinstance(exc, TransportError):
                raise
            raise TransportError(f"send failed: {describe(exc)}") from exc
        except BaseException:
            breaker.release(ticket)
            raise
        breaker.record_success(ticket)
        tally[0] += 1
        tally[1] += data.nbytes if type(data) is memoryview else len(data)
        if timed:
            seconds = perf_counter() - began
            tally[2] += seconds
            tally[3 + bisect_left(SEND_BUCKETS, seconds)] += 1
            # The suspicion update takes the manager's lock (about 3 us): a sparser sample.
            if not tally[-1] % SUSPICION_SAMPLE and self._on_send is not None:
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
            self._rejected()
            raise

    def _rejected(self) -> None:
        if self._events.active:
            self._events.publish(SendRejected(self._breaker.state))

    def _failed(self, ticket: int, error: BaseException) -> None:
        self._breaker.record_failure(ticket, error)
        with self._lock:
            self._counters.send_errors += 1
