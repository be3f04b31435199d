"""Circuit-breaker adapter: pybreaker keeps the state, we decide admission without its lock.

pybreaker's ``CircuitBreaker.call()`` holds the breaker's lock for the whole guarded call, so
concurrent senders queue up behind each other and one hung send blocks them all.  This
adapter keeps pybreaker's storage and state transitions (``open``/``half_open``/``close``,
``opened_at``, the failure counter) but splits a call into *admit*, the I/O itself (no lock
held), and *record*.  Each admission carries the breaker's generation, which changes on every
transition, so a slow call that started before the breaker moved on cannot change the new
state.  Half-open admits exactly one trial call at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import pybreaker

from dwcp.errors import CircuitOpenError

__all__ = ["CLOSED", "HALF_OPEN", "NOT_INITIALIZED", "OPEN", "Breaker", "BreakerState"]

CLOSED = pybreaker.STATE_CLOSED
OPEN = pybreaker.STATE_OPEN
HALF_OPEN = pybreaker.STATE_HALF_OPEN
NOT_INITIALIZED = "not_initialized"
BreakerState = str

TransitionHook = Callable[[str, str], None]


def _utcnow() -> datetime:
    # pybreaker stamps ``opened_at`` with ``datetime.now(UTC)``; reading the same clock keeps
    # the two comparable and lets freezegun move the reset timeout in tests.
    return datetime.now(timezone.utc)


class Breaker:
    """Thread-safe breaker whose admission and bookkeeping never wrap the guarded I/O."""

    def __init__(
        self,
        *,
        max_failures: int,
        reset_timeout: float,
        storage: pybreaker.CircuitBreakerStorage | None = None,
        name: str = "dwcp",
        on_transition: TransitionHook | None = None,
    ) -> None:
        self._storage = storage or pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        self._cb = pybreaker.CircuitBreaker(
            fail_max=max_failures,
            reset_timeout=reset_timeout,
            state_storage=self._storage,
            name=name,
        )
        self._reset_after = timedelta(seconds=reset_timeout)
        self._lock = threading.Lock()
        self._state: str = self._storage.state
        self._generation = 0
        self._trial_in_flight = False
        self._pending: list[tuple[str, str]] = []
        self._on_transition = on_transition
        self.transitions = 0
        self.rejections = 0

    # -- the send path -------------------------------------------------------------------

    def admit(self) -> int:
        """Return a ticket for one guarded call, or raise ``CircuitOpenError``."""
        with self._lock:
            if self._state == CLOSED:
                return self._generation
            try:
                ticket = self._admit_slow()
            except CircuitOpenError:
                self.rejections += 1
                raise
        self._flush()
        return ticket

    def record_success(self, ticket: int) -> None:
        """Account a call that succeeded; closes a half-open breaker after its trial."""
        # Racy read on purpose: in the common case (closed, no failures counted) nothing needs
        # writing, and skipping the lock keeps the send path short.  Any interleaving with a
        # concurrent failure is a valid ordering of the two calls.
        if self._state == CLOSED and self._storage.counter == 0:
            return
        with self._lock:
            if ticket != self._generation:
                return
            if self._state == HALF_OPEN:
                self._move(CLOSED)
            elif self._state == CLOSED:
                self._storage.reset_counter()
        self._flush()

    def record_failure(self, ticket: int) -> None:
        """Account a transport failure; opens the breaker at the threshold or on a failed trial."""
        with self._lock:
            if ticket != self._generation:
                return
            if self._state == HALF_OPEN:
                self._move(OPEN)
            elif self._state == CLOSED:
                self._storage.increment_counter()
                if self._storage.counter >= self._cb.fail_max:
                    self._move(OPEN)
        self._flush()

    def release(self, ticket: int) -> None:
        """Forget a call whose outcome says nothing about the peer (a caller error, an interrupt)."""
        with self._lock:
            if ticket == self._generation and self._state == HALF_OPEN:
                self._trial_in_flight = False

    # -- state ------------------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The current state; an open breaker whose reset timeout elapsed reads ``half-open``."""
        with self._lock:
            if self._state == OPEN and self._reset_elapsed():
                self._move(HALF_OPEN)
            state = self._state
        self._flush()
        return state

    @property
    def failure_count(self) -> int:
        """Consecutive failures counted towards the threshold."""
        return int(self._storage.counter)

    def half_open(self) -> None:
        """Move an open breaker to half-open now, so the next send is a trial (after recovery)."""
        with self._lock:
            if self._state == OPEN:
                self._move(HALF_OPEN)
        self._flush()

    # -- internals ----------------------------------------------------------------------------

    def _admit_slow(self) -> int:
        if self._state == OPEN:
            if not self._reset_elapsed():
                raise CircuitOpenError("circuit breaker is open; send rejected")
            self._move(HALF_OPEN)
        if self._trial_in_flight:
            raise CircuitOpenError("circuit breaker is half-open and its trial call is in flight")
        self._trial_in_flight = True
        return self._generation

    def _reset_elapsed(self) -> bool:
        opened_at = self._storage.opened_at
        return opened_at is None or _utcnow() >= opened_at + self._reset_after

    def _move(self, new: str) -> None:
        # Caller holds self._lock.  pybreaker's transition methods update storage, stamp
        # opened_at and reset the counters exactly as its own state machine would.
        old = self._state
        if new == OPEN:
            self._cb.open()
        elif new == HALF_OPEN:
            self._cb.half_open()
        else:
            self._cb.close()
        self._state = new
        self._generation += 1
        self._trial_in_flight = False
        self.transitions += 1
        self._pending.append((old, new))

    def _flush(self) -> None:
        # Listeners run outside the lock: take the queued transitions, then call out.
        if not self._pending:
            return
        with self._lock:
            pending, self._pending = self._pending, []
        if self._on_transition is not None:
            for old, new in pending:
                self._on_transition(old, new)
