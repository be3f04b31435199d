"""Circuit-breaker adapter: pybreaker keeps the state, we decide admission without its lock.

pybreaker's ``CircuitBreaker.call()`` holds the breaker's lock for the whole guarded call, so
concurrent senders queue up behind each other and one hung send blocks them all.  This
adapter keeps pybreaker's storage and state transitions (``open``/``half_open``/``close``,
``opened_at``, the failure counter) but splits a call into *admit*, the I/O itself (no lock
held), and *record*.  Each admission carries the breaker's generation, which changes on every
transition, so a slow call that started before the breaker moved on cannot change the new
state.  Half-open admits exactly one trial call at a time; with shared storage, one across
every process (a lease in Redis that expires if its holder dies).

Decisions are taken under a small lock on a local mirror of the state; writes to pybreaker's
storage happen after the lock is released, in decision order.  With shared storage (Redis)
those writes are network calls, and the mirror is refreshed from the storage at most every
``sync_interval`` seconds, so other processes' decisions arrive within that delay.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pybreaker

from dwcp.errors import CircuitOpenError

__all__ = ["CLOSED", "HALF_OPEN", "NOT_INITIALIZED", "OPEN", "Breaker"]

CLOSED = pybreaker.STATE_CLOSED
OPEN = pybreaker.STATE_OPEN
HALF_OPEN = pybreaker.STATE_HALF_OPEN
NOT_INITIALIZED = "not_initialized"

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
        sync_interval: float = 0.05,
    ) -> None:
        self._shared = storage is not None
        self._storage = storage or pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        self._cb = pybreaker.CircuitBreaker(
            fail_max=max_failures,
            reset_timeout=reset_timeout,
            state_storage=self._storage,
            name=name,
        )
        self._max_failures = max_failures
        self._reset_after = timedelta(seconds=reset_timeout)
        self._lock = threading.Lock()
        # Serialises storage writes and notifications so they happen in decision order.
        self._write_lock = threading.Lock()
        self._state: str = self._storage.state
        self._opened_at: datetime | None = self._storage.opened_at
        # Consecutive failures: authoritative for local storage, a cached copy when shared.
        self._failures = int(self._storage.counter)
        self._generation = 0
        self._trial_in_flight = False
        # The ticket of the trial holding the shared (cross-process) lease, if any.
        self._lease_ticket: int | None = None
        self._pending: list[tuple[str, str, bool]] = []
        self._on_transition = on_transition
        self._sync_interval = sync_interval
        self._next_sync = 0.0
        #: Transitions counted by (from, to) state, e.g. ("closed", "open").
        self.transition_counts: dict[tuple[str, str], int] = {}
        self.rejections = 0

    # -- the send path -------------------------------------------------------------------

    @classmethod
    def build(cls, storage: object, name: str, **options: Any) -> Breaker:
        """A breaker named ``name``, shared through Redis when ``storage`` is given."""
        if storage is None:
            return cls(name=name, **options)
        from dwcp.shared import FailoverStorage, connect

        return cls(name=name, storage=FailoverStorage(connect(storage), name), **options)

    def admit(self) -> int:
        """Return a ticket for one guarded call, or raise ``CircuitOpenError``."""
        if self._shared:
            self._sync()
        # Closed needs no lock.  _move() stores the state before the generation, so reading
        # the generation first can only yield an older ticket than the state seen (its
        # result is then ignored as stale), never a newer one.
        generation = self._generation
        if self._state == CLOSED:
            return generation
        with self._lock:
            if self._state == CLOSED:
                return self._generation
            try:
                ticket = self._admit_slow()
            except CircuitOpenError:
                self.rejections += 1
                raise
            trial = self._state == HALF_OPEN
        self._flush()
        if trial and self._shared:
            self._claim_shared_trial(ticket)
        return ticket

    def _claim_shared_trial(self, ticket: int) -> None:
        """Half-open admits one trial across every process: take the shared lease (a Redis
        key with an expiry, so a holder that dies frees it), or give the local claim back."""
        claim = getattr(self._storage, "claim_trial", None)
        if claim is None or claim():
            with self._lock:
                self._lease_ticket = ticket
            return
        with self._lock:
            if ticket == self._generation and self._state == HALF_OPEN:
                self._trial_in_flight = False
            self.rejections += 1
        raise CircuitOpenError("circuit breaker is half-open and another process holds its trial")

    def _release_shared_trial(self, ticket: int) -> None:
        # After the trial's result is recorded: the lease's job is done either way.
        with self._lock:
            if self._lease_ticket != ticket:
                return
            self._lease_ticket = None
        release = getattr(self._storage, "release_trial", None)
        if release is not None:
            release()

    def record_success(self, ticket: int) -> None:
        """Account a call that succeeded; closes a half-open breaker after its trial."""
        # Racy read on purpose: in the common case (closed, no failures counted) nothing needs
        # writing, and skipping the lock keeps the send path short.  Any interleaving with a
        # concurrent failure is a valid ordering of the two calls.
        if self._state == CLOSED and self._failures == 0 and self._lease_ticket is None:
            return
        reset_shared = False
        with self._lock:
            if ticket != self._generation:
                return
            if self._state == HALF_OPEN:
                self._move(CLOSED)
            elif self._state == CLOSED and self._failures:
                self._failures = 0
                if self._shared:
                    reset_shared = True
                else:
                    self._storage.reset_counter()
        if reset_shared:
            self._storage.reset_counter()
        self._flush()
        if self._shared:
            self._release_shared_trial(ticket)

    def record_failure(self, ticket: int) -> None:
        """Account a transport failure; opens the breaker at the threshold or on a failed trial."""
        with self._lock:
            if ticket != self._generation:
                return
            if self._state == HALF_OPEN:
                self._move(OPEN)
            elif self._state == CLOSED and not self._shared:
                # The local count decides; pybreaker's memory storage is kept in step with it.
                self._failures += 1
                self._storage.increment_counter()
                if self._failures >= self._max_failures:
                    self._move(OPEN)
        if self._shared:
            self._record_shared_failure(ticket)
        self._flush()
        if self._shared:
            self._release_shared_trial(ticket)

    def release(self, ticket: int) -> None:
        """Forget a call whose outcome says nothing about the peer (a caller error, an interrupt)."""
        with self._lock:
            if ticket == self._generation and self._state == HALF_OPEN:
                self._trial_in_flight = False
        if self._shared:
            self._release_shared_trial(ticket)

    # -- state ------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """The current state; an open breaker whose reset timeout elapsed reads ``half-open``."""
        if self._shared:
            self._sync()
        with self._lock:
            if self._state == OPEN and self._reset_elapsed():
                self._move(HALF_OPEN)
            state = self._state
        self._flush()
        return state

    @property
    def storage_mode(self) -> str:
        """``local``, or for shared storage ``shared`` (Redis answers) or ``fallback``."""
        if not self._shared:
            return "local"
        return "shared" if getattr(self._storage, "shared", True) else "fallback"

    @property
    def storage_errors(self) -> int:
        """How many shared-storage operations failed (0 for local storage)."""
        return int(getattr(self._storage, "errors", 0)) if self._shared else 0

    @property
    def failure_count(self) -> int:
        """Consecutive failures counted towards the threshold."""
        return self._failures

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
        opened_at = self._opened_at
        return opened_at is None or _utcnow() >= opened_at + self._reset_after

    def _move(self, new: str, *, write: bool = True) -> None:
        # Caller holds self._lock.  The mirror changes now; the storage write and the
        # notification wait for _flush(), outside the lock.
        old = self._state
        self._state = new
        if new == OPEN:
            self._opened_at = _utcnow()
        self._failures = 0
        self._generation += 1
        self._trial_in_flight = False
        key = (old, new)
        self.transition_counts[key] = self.transition_counts.get(key, 0) + 1
        self._pending.append((old, new, write))

    def _flush(self) -> None:
        if not self._pending:
            return
        with self._write_lock:
            with self._lock:
                pending, self._pending = self._pending, []
            for old, new, write in pending:
                if write:
                    # pybreaker's own transitions: they stamp opened_at, reset the counters and
                    # store the state exactly as its state machine would.
                    {OPEN: self._cb.open, HALF_OPEN: self._cb.half_open, CLOSED: self._cb.close}[
                        new
                    ]()
                if self._on_transition is not None:
                    self._on_transition(old, new)

    def _record_shared_failure(self, ticket: int) -> None:
        # Shared storage: the counter lives in Redis and adds up failures from every process.
        self._storage.increment_counter()
        count = int(self._storage.counter)
        with self._lock:
            if ticket != self._generation or self._state != CLOSED:
                return
            self._failures = count
            if count >= self._max_failures:
                self._move(OPEN)

    def _sync(self) -> None:
        """Adopt state that other processes stored, at most every ``sync_interval`` seconds."""
        now = time.monotonic()
        if now < self._next_sync:
            return
        self._next_sync = now + self._sync_interval
        with self._lock:
            generation = self._generation
        state = self._storage.state
        opened_at = self._storage.opened_at
        failures = int(self._storage.counter)
        with self._lock:
            # A local decision made while we read (or not yet written) is newer than what we read.
            if generation != self._generation or self._pending:
                return
            self._failures = failures
            if opened_at is not None and (self._opened_at is None or opened_at > self._opened_at):
                self._opened_at = opened_at
            if state != self._state and state in (CLOSED, OPEN, HALF_OPEN):
                self._move(state, write=False)
                if state == OPEN and opened_at is not None:
                    self._opened_at = opened_at
        self._flush()
