"""The guarded path: admit through the breaker, run the I/O with no lock held, record the result.

Failures are classified once, here: ``OSError`` and ``TransportError`` are the peer or the
network failing and count against the breaker; anything else is the caller's and does not.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from time import perf_counter
from typing import Any, TypeVar

from dwcp._breaker import Breaker
from dwcp._errors import DWCPError, TransportError
from dwcp._events import SendRejected, _Dispatcher
from dwcp._slots import PEER_FAILURES
from dwcp._status import Counters, SendTallies
from dwcp._validation import describe

__all__ = ["Guard"]

R = TypeVar("R")
SEND_SAMPLE = 16
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

    def send(self, transport: Any, data: bytes | bytearray | memoryview) -> None:
        """``transport.send(data)``; a peer failure is raised as ``TransportError``."""
        if not isinstance(data, _BYTES_LIKE):
            raise TypeError(
                f"data must be bytes, bytearray or memoryview, got {type(data).__name__} "
                "(wrap other buffers in memoryview())"
            )
        ticket = self._admit()
        began = perf_counter()
        try:
            transport.send(data)
        except PEER_FAILURES as exc:
            # A transport that recovery closed and could not restart fails too: while the
            # manager runs, that is the peer being down, so it counts like any other failure.
            seconds = perf_counter() - began
            self.tallies.failed(seconds)
            self._failed(ticket, exc)
            if self._on_send is not None:
                self._on_send(seconds, False)
            if isinstance(exc, TransportError):
                raise
            raise TransportError(f"send failed: {describe(exc)}") from exc
        except BaseException:
            self.tallies.failed(perf_counter() - began)
            self._breaker.release(ticket)
            raise
        seconds = perf_counter() - began
        self._breaker.record_success(ticket)
        sent = self.tallies.add(data.nbytes if type(data) is memoryview else len(data), seconds)
        # One success in SAMPLE feeds the transport's suspicion: its latency distribution
        # needs a steady sample, not every send paying for the manager's lock.
        if not sent % SEND_SAMPLE and self._on_send is not None:
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
            if self._events.active:
                self._events.publish(SendRejected(self._breaker.state))
            raise

    def _failed(self, ticket: int, error: BaseException) -> None:
        self._breaker.record_failure(ticket, error)
        with self._lock:
            self._counters.send_errors += 1
