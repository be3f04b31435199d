"""Circuit-breaker adapter: pybreaker decides, and no lock is held across the guarded I/O.

pybreaker's ``CircuitBreaker.call()`` holds the breaker's lock for the whole guarded call, so
concurrent senders queue up behind each other and one hung send blocks them all.  This
adapter splits a call into three steps and lets pybreaker's state machine take every
decision:

*admit*
    Under pybreaker's lock: a closed breaker admits; an open one admits once its reset
    timeout (pybreaker's ``opened_at`` and ``reset_timeout``) has elapsed, moving it to
    half-open with pybreaker's ``half_open()``; half-open admits one trial at a time.
*the I/O*
    With no lock held.
*record*
    Under pybreaker's lock, through pybreaker's own state objects: ``_handle_success()``
    (resets the failure count; closes a half-open breaker) and ``_handle_error()`` (counts
    the failure; opens at ``fail_max`` or on a failed trial).  A caller error is *released*
    instead: pybreaker would count an excluded exception as a success.

A ``CircuitBreakerListener`` bumps a generation on every transition (it runs under
pybreaker's lock, so it only records); each admission carries the generation it saw, so a
slow call that started before the breaker moved on cannot change the new state.  A closed
breaker admits and records a success without any lock.

With shared storage (Redis) pybreaker works on an in-memory mirror, so nothing under its
lock touches the network: the mirror is refreshed from Redis at most every
``sync_interval`` seconds, outside the lock, and pybreaker's writes reach Redis after the
lock is released, in decision order.  Half-open admits one trial per open period across
every process: the claim is keyed by the period's ``opened_at`` and outlives the trial, so a
process whose own timer fires after another's trial failed is refused.  While Redis is
unreachable each process decides alone: each runs its own trial every period, and the
breaker stays open in each until its own trial succeeds; when Redis answers again the newer
decision wins (``dwcp._shared``): a close decided alone is not undone by an older open.

A trial still running ``trial_timeout`` after it was admitted counts as a failed trial: the
breaker opens from that deadline, and the hung call's late result is stale like any other.

A failure whose ``code`` is ``NOT_STARTED`` (this process's transport is closed),
``BACKPRESSURE`` or ``WINDOW_FULL`` (the peer is alive, only slower than the senders) is no
evidence that the peer is down: it is released, never counted.

The adapter relies on pybreaker internals (``_lock``, ``_handle_error``, ``_handle_success``,
``on_failure``); ``pybreaker~=1.4`` is pinned and ``tests/unit/test_breaker_contract.py`` fails if
any of them changes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pybreaker

from dwcp import _validation as check
from dwcp._errors import CircuitOpenError

__all__ = ["CLOSED", "HALF_OPEN", "NOT_INITIALIZED", "OPEN", "Breaker"]

CLOSED = pybreaker.STATE_CLOSED
OPEN = pybreaker.STATE_OPEN
HALF_OPEN = pybreaker.STATE_HALF_OPEN
NOT_INITIALIZED = "not_initialized"

TransitionHook = Callable[[str, str], None]


class _PeerFailure(Exception):
    """What pybreaker is told failed when the caller gave no exception."""


def _utcnow() -> datetime:
    # pybreaker stamps ``opened_at`` with ``datetime.now(UTC)``; reading the same clock keeps
    # the two comparable and lets freezegun move the reset timeout in tests.
    return datetime.now(timezone.utc)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MS = timedelta(milliseconds=1)


def epoch_ms(moment: datetime) -> int:
    """``moment`` in whole epoch milliseconds (floored), computed exactly (no float)."""
    if moment.tzinfo is None:  # pybreaker stamps aware UTC; a naive one is taken as UTC
        moment = moment.replace(tzinfo=timezone.utc)
    return (moment - _EPOCH) // _MS


def from_epoch_ms(ms: int) -> datetime:
    """The aware UTC datetime of ``ms`` epoch milliseconds, exactly."""
    return _EPOCH + ms * _MS


class _Mirror(pybreaker.CircuitBreakerStorage):
    """Shared state as pybreaker sees it under its lock: memory, written back to Redis later.

    Every write pybreaker makes is applied here at once and queued in ``writes``; the breaker
    replays the queue against the remote storage once pybreaker's lock is released.
    """

    def __init__(self, remote: pybreaker.CircuitBreakerStorage) -> None:
        super().__init__("dwcp-mirror")
        self._state = str(remote.state)
        self._opened_at: datetime | None = remote.opened_at
        self._counter = int(remote.counter)
        self._successes = 0
        self.writes: list[tuple[str, Any]] = []
        # While the breaker adopts what it read from Redis, pybreaker's bookkeeping (its
        # counter reset on a transition) must not be written back over other processes' work.
        self.adopting = False

    def _queue(self, op: str, value: Any = None) -> None:
        if not self.adopting:
            self.writes.append((op, value))

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, state: str) -> None:
        self._state = state
        self._queue("state", state)

    def increment_counter(self) -> None:
        self._counter += 1
        self._queue("incr")

    def reset_counter(self) -> None:
        self._counter = 0
        self._queue("reset")

    def increment_success_counter(self) -> None:
        self._successes += 1

    def reset_success_counter(self) -> None:
        self._successes = 0

    @property
    def counter(self) -> int:
        return self._counter

    @property
    def success_counter(self) -> int:
        return self._successes

    @property
    def opened_at(self) -> datetime | None:
        return self._opened_at

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:
        self._opened_at = value
        self._queue("opened_at", value)

    def adopt(self, state: str, opened_at: datetime | None, counter: int) -> None:
        self._state, self._counter = state, counter
        if opened_at is not None and (self._opened_at is None or opened_at > self._opened_at):
            self._opened_at = opened_at


class _Listener(pybreaker.CircuitBreakerListener):
    """Records pybreaker's transitions; called under pybreaker's lock, so it only records."""

    def __init__(self, breaker: Breaker) -> None:
        self._breaker = breaker

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        old = old_state.name if old_state is not None else CLOSED
        self._breaker._transitioned(old, new_state.name)


#: Failure codes that say nothing about the peer being down; released, never counted.
NOT_EVIDENCE = frozenset({"NOT_STARTED", "BACKPRESSURE", "WINDOW_FULL"})


class Breaker:
    """Thread-safe breaker whose admission and bookkeeping never wrap the guarded I/O.

    Args:
        max_failures: consecutive failures that open the breaker (pybreaker's ``fail_max``).
        reset_timeout: seconds an open breaker waits before a trial (``reset_timeout``).
        storage: pybreaker storage shared between processes; None keeps the state local.
        name: the breaker's name, and its key in shared storage.
        on_transition: called with ``(old, new)`` after each transition, outside any lock.
        sync_interval: how often (seconds) shared state is read back from the storage.
        trial_timeout: seconds (or a ``timedelta``) a half-open trial may run; one still
            running then counts as a failed trial: the breaker opens from that deadline, the
            next trial is admitted a ``reset_timeout`` later, and the late result is ignored.
            None (the default) uses ``reset_timeout``.
    """

    def __init__(
        self,
        *,
        max_failures: int,
        reset_timeout: float,
        storage: pybreaker.CircuitBreakerStorage | None = None,
        name: str = "dwcp",
        on_transition: TransitionHook | None = None,
        sync_interval: float = 0.05,
        trial_timeout: float | timedelta | None = None,
    ) -> None:
        self._trial_timeout = timedelta(
            seconds=check.seconds(
                "trial_timeout", reset_timeout if trial_timeout is None else trial_timeout
            )
        )
        self._remote = storage
        self._mirror = _Mirror(storage) if storage is not None else None
        self._shared = self._mirror is not None  # read per call: one attribute, no compare
        self._store: pybreaker.CircuitBreakerStorage = self._mirror or (
            pybreaker.CircuitMemoryStorage(CLOSED)
        )
        self._generation = 0
        self._state: str = self._store.state
        self._trial_in_flight = False
        # When the trial in flight counts as failed, and (shared) the period it was claimed for.
        self._trial_deadline: datetime | None = None
        self._trial_period = 0
        # Whether pybreaker may hold a failure count a success must reset: read without the
        # lock on the success path, so a closed breaker with nothing counted costs no lock.
        self._counted = self._store.counter != 0
        # The ticket of the trial holding this period's shared (cross-process) claim, if any.
        self._claim_ticket: int | None = None
        self._notices: list[tuple[str, str]] = []
        self._on_transition = on_transition
        self._sync_interval = sync_interval
        self._next_sync = 0.0
        # Serialises the write-back and the notifications so they happen in decision order.
        self._flush_lock = threading.Lock()
        #: Transitions counted by (from, to) state, e.g. ("closed", "open").
        self.transition_counts: dict[tuple[str, str], int] = {}
        self.rejections = 0
        self._cb = pybreaker.CircuitBreaker(
            fail_max=max_failures,
            reset_timeout=reset_timeout,
            state_storage=self._store,
            listeners=[_Listener(self)],
            name=name,
            # A trip re-raises the failure itself, which record_failure() expects and drops.
            throw_new_error_on_trip=False,
        )
        # pybreaker's own lock: every decision is taken under it, as in its call().
        self._lock: threading.RLock = self._cb._lock

    @classmethod
    def build(cls, storage: object, name: str, **options: Any) -> Breaker:
        """A breaker named ``name``, shared through Redis when ``storage`` is given."""
        if storage is None:
            return cls(name=name, **options)
        from dwcp._shared import FailoverStorage, connect

        shared = FailoverStorage(connect(storage), name, owns_client=isinstance(storage, str))
        return cls(name=name, storage=shared, **options)

    # -- the guarded path -------------------------------------------------------------------

    def admit(self, action: str = "send") -> int:
        """Return a ticket for one guarded call, or raise ``CircuitOpenError`` saying that
        the ``action`` ("send", "call") was rejected."""
        if self._shared:
            self._refresh()
        # Closed needs no lock.  The listener stores the state before bumping the generation,
        # so reading the generation first can only yield an older ticket than the state seen
        # (its result is then ignored as stale), never a newer one.
        generation = self._generation
        if self._state == CLOSED:
            return generation
        with self._lock:
            self._expire_trial()
            state = self._cb.state.name
            if state == CLOSED:
                return self._generation
            if state == OPEN:
                if not self._reset_elapsed():
                    self.rejections += 1
                    raise CircuitOpenError(f"circuit breaker is open; {action} rejected")
                self._local_half_open()
            if self._trial_in_flight:
                self.rejections += 1
                raise CircuitOpenError(
                    "circuit breaker is half-open and its trial call is in flight"
                )
            self._trial_in_flight = True
            deadline = self._trial_deadline = _utcnow() + self._trial_timeout
            opened_at = self._store.opened_at
            period = epoch_ms(opened_at) if opened_at is not None else 0
            ticket = self._generation
        self._flush()
        if self._mirror is not None:
            self._claim_shared_trial(ticket, period, deadline)
        return ticket

    @property
    def closed(self) -> bool:
        """Whether the breaker reads closed here, now, without asking shared storage: after
        ``admit()``, False means the ticket is a half-open trial (or the breaker just
        opened)."""
        return self._state == CLOSED

    def record_success(self, ticket: int) -> None:
        """Account a call that succeeded; pybreaker closes a half-open breaker after its trial."""
        # Racy read on purpose: in the common case (closed, no failures counted) pybreaker
        # would write nothing, and skipping the lock keeps the send path short.
        if self._state == CLOSED and not self._counted and self._claim_ticket is None:
            return
        with self._lock:
            self._expire_trial()  # a trial past its deadline failed: this result is stale
            if ticket == self._generation:
                self._cb.state._handle_success()
                self._counted = self._store.counter != 0
        self._flush()
        self._end_shared_trial(ticket, give_back=False)

    def record_failure(self, ticket: int, error: BaseException | None = None) -> None:
        """Account a peer failure; pybreaker opens at ``fail_max`` or on a failed trial.

        An ``error`` whose code is in ``NOT_EVIDENCE`` says nothing about the peer being down
        and is released instead: ``NOT_STARTED`` (a transport this process has closed, such
        as one its own recovery has not restarted yet; the spec says "not started" never
        counts), ``BACKPRESSURE`` and ``WINDOW_FULL`` (a slow peer slows senders and breaks
        nothing).
        """
        if getattr(error, "code", None) in NOT_EVIDENCE:
            self.release(ticket)
            return
        failure = error if error is not None else _PeerFailure("peer failure")
        with self._lock:
            self._expire_trial()
            if ticket == self._generation and self._cb.state.name != OPEN:
                self._tell_pybreaker(failure)
        self._flush()
        self._end_shared_trial(ticket, give_back=False)

    def release(self, ticket: int) -> None:
        """Forget a call whose outcome says nothing about the peer (a caller error, an interrupt)."""
        with self._lock:
            self._expire_trial()
            if ticket == self._generation and self._state == HALF_OPEN:
                self._trial_in_flight = False
                self._trial_deadline = None
        self._flush()
        # The call never reached the peer: this period's trial is still to be run.
        self._end_shared_trial(ticket, give_back=True)

    # -- state ------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """The current state; an open breaker whose reset timeout elapsed reads ``half-open``."""
        if self._mirror is not None:
            self._refresh()
        with self._lock:
            self._expire_trial()
            if self._cb.state.name == OPEN and self._reset_elapsed():
                self._local_half_open()
            state = self._state
        self._flush()
        return state

    @property
    def failure_count(self) -> int:
        """Consecutive failures counted towards the threshold (pybreaker's ``fail_counter``)."""
        return int(self._cb.fail_counter)

    @property
    def storage_mode(self) -> str:
        """``local``, or for shared storage ``shared`` (Redis answers) or ``fallback``."""
        if self._remote is None:
            return "local"
        return "shared" if getattr(self._remote, "shared", True) else "fallback"

    @property
    def storage_errors(self) -> int:
        """How many shared-storage operations failed (0 for local storage)."""
        return int(getattr(self._remote, "errors", 0)) if self._remote is not None else 0

    def half_open(self) -> None:
        """Move an open breaker to half-open now, so the next send is a trial (after recovery)."""
        with self._lock:
            if self._cb.state.name == OPEN:
                self._local_half_open()
        self._flush()

    def watch(self) -> None:
        """Hear other processes' transitions as they happen, where the storage can tell.

        The shared storage calls ``remote_changed()`` from its own subscriber thread; the
        poll every ``sync_interval`` stays as the fallback.
        """
        subscribe = getattr(self._remote, "on_remote_change", None)
        if subscribe is not None:
            subscribe(self.remote_changed)

    def remote_changed(self) -> None:
        """Another process changed the shared state: read it back now, not at the next poll."""
        if self._mirror is None:
            return
        self._next_sync = 0.0
        self._refresh()

    def close(self) -> None:
        """Stop hearing of remote changes (the storage's subscriber thread); idempotent."""
        close = getattr(self._remote, "close", None)
        if close is not None:
            close()

    # -- internals ----------------------------------------------------------------------------

    def _tell_pybreaker(self, failure: BaseException) -> None:
        # Caller holds the lock.  With throw_new_error_on_trip=False pybreaker re-raises the
        # failure itself when it trips, even with reraise=False: that raise is expected.
        self._counted = True
        try:
            self._cb.state._handle_error(failure, reraise=False)
        except pybreaker.CircuitBreakerError:
            pass
        except BaseException as exc:
            if exc is not failure:
                raise

    def _expire_trial(self) -> None:
        """Fail a half-open trial that ran past its deadline (caller holds the lock).

        The breaker opens from the deadline, as if the trial had failed then, so every
        process that shares it computes the same next period; the transition bumps the
        generation, so the hung call's late result is ignored.  With shared storage the
        re-open is written as one Redis step that applies only if that period's trial still
        holds the breaker (``FailoverStorage.expire_trial``), never over a newer state.
        """
        deadline = self._trial_deadline
        if not self._trial_in_flight or deadline is None or self._state != HALF_OPEN:
            return
        if _utcnow() < deadline:
            return
        mirror = self._mirror
        if mirror is not None:
            mirror.adopting = True
        try:
            self._tell_pybreaker(_PeerFailure("the half-open trial ran past its deadline"))
            self._store.opened_at = deadline
        finally:
            if mirror is not None:
                mirror.adopting = False
        if mirror is not None:
            mirror.writes.append(("expire", (self._trial_period, epoch_ms(deadline))))

    def _local_half_open(self) -> None:
        """Open -> half-open, after the reset timeout or a recovery (caller holds the lock).

        With shared storage this move stays local: every process computes the timeout from
        the shared ``opened_at``, and a recovery only makes this process's next send the
        trial.  Written back from a stale view, the move could land after another process's
        trial had closed the breaker and undo that close.  Only a trial's result is written.
        """
        if self._mirror is None:
            self._cb.half_open()
            return
        self._mirror.adopting = True
        try:
            self._cb.half_open()
        finally:
            self._mirror.adopting = False

    def _reset_elapsed(self) -> bool:
        # The test pybreaker's CircuitOpenState.before_call() makes; that method also runs
        # the guarded call, so the adapter reads the same two values itself.
        opened_at = self._store.opened_at
        timeout = timedelta(seconds=self._cb.reset_timeout)
        return opened_at is None or _utcnow() >= opened_at + timeout

    def _transitioned(self, old: str, new: str) -> None:
        # Called by the listener, under the lock.
        self._state = new
        self._generation += 1
        self._trial_in_flight = False
        self._trial_deadline = None
        key = (old, new)
        self.transition_counts[key] = self.transition_counts.get(key, 0) + 1
        self._notices.append(key)

    def _flush(self) -> None:
        """Write pybreaker's decisions back to shared storage, then notify, in order."""
        if not self._notices and (self._mirror is None or not self._mirror.writes):
            return
        with self._flush_lock:
            for _ in range(8):  # a count read back may trip the breaker once more
                with self._lock:
                    notices, self._notices = self._notices, []
                    writes: list[tuple[str, Any]] = []
                    if self._mirror is not None:
                        writes, self._mirror.writes = self._mirror.writes, []
                count = self._write_back(writes)
                if count is not None:
                    self._adopt_count(count)
                if self._on_transition is not None:
                    for old, new in notices:
                        self._on_transition(old, new)
                with self._lock:
                    if not self._notices and (self._mirror is None or not self._mirror.writes):
                        return

    def _write_back(self, writes: list[tuple[str, Any]]) -> int | None:
        """Replay ``writes`` on the remote storage; returns the shared count after an INCR."""
        remote = self._remote
        count: int | None = None
        if remote is None:
            return None
        for op, value in writes:
            if op == "state":
                remote.state = value
            elif op == "opened_at":
                remote.opened_at = value
            elif op == "incr":
                remote.increment_counter()
                count = int(remote.counter)
            elif op == "reset":
                remote.reset_counter()
                count = None
            elif op == "expire":
                expire = getattr(remote, "expire_trial", None)
                if expire is not None:
                    expire(*value)
        return count

    def _adopt_count(self, count: int) -> None:
        # Failures from every process add up: the shared count read back after our INCR may
        # reach the threshold that our local view had not.
        assert self._mirror is not None
        with self._lock:
            if count <= self._mirror.counter or self._cb.state.name != CLOSED:
                return
            self._counted = True
            self._mirror.adopting = True
            try:
                self._mirror.adopt(CLOSED, None, count)
            finally:
                self._mirror.adopting = False
            if count >= self._cb.fail_max:
                failure = _PeerFailure("shared failure count reached the threshold")
                try:
                    self._cb.state.on_failure(failure)
                except BaseException as exc:
                    if exc is not failure:
                        raise

    def _refresh(self) -> None:
        """Adopt state other processes stored, at most every ``sync_interval`` seconds."""
        now = time.monotonic()
        if now < self._next_sync:
            return
        self._next_sync = now + self._sync_interval
        remote, mirror = self._remote, self._mirror
        assert remote is not None and mirror is not None
        generation = self._generation
        state, opened_at, counter = remote.state, remote.opened_at, int(remote.counter)
        with self._lock:
            # A decision taken while we read (or not yet written back) is newer than the read.
            if generation != self._generation or mirror.writes or self._notices:
                return
            if state not in (CLOSED, OPEN, HALF_OPEN):
                return
            if state == OPEN and self._state == HALF_OPEN:
                if not (
                    opened_at is not None
                    and mirror.opened_at is not None
                    and opened_at > mirror.opened_at
                ):
                    return  # the same open period, timed out here: not a fresh trip
                if not self._trial_in_flight and _utcnow() >= opened_at + timedelta(
                    seconds=self._cb.reset_timeout
                ):
                    # A later period that has timed out too (another process's open decided
                    # alone during an outage, written back): half-open stays right, and the
                    # next trial is that period's.  Re-opening would reject calls and alert
                    # for nothing, and a newer close may be about to be written back.  (With
                    # our trial in flight, its claim is the older period's: re-open, so that
                    # its result is ignored and the new period gets one trial in total.)
                    mirror.adopt(HALF_OPEN, opened_at, counter)
                    return
            if counter:
                self._counted = True
            mirror.adopting = True
            try:
                mirror.adopt(state, opened_at, counter)
                # pybreaker notices the stored state differs from its cached one and moves
                # to it, notifying the listener like any transition.
                self._cb.state  # noqa: B018
            finally:
                mirror.adopting = False
        self._flush()

    def _claim_shared_trial(self, ticket: int, period: int, deadline: datetime) -> None:
        """Claim the trial of the open period ``period`` across every process, or give the
        local claim back and reject.

        The claim is keyed by the period and outlives the trial (``FailoverStorage.
        claim_trial``), so a process that timed out on its own clock after another's trial
        ended is refused too: one trial per period in total, not just one at a time.
        """
        claim = getattr(self._remote, "claim_trial", None)
        answer = "local" if claim is None else claim(period, epoch_ms(deadline))
        if answer in ("granted", "local"):
            with self._lock:
                self._claim_ticket = ticket
                self._trial_period = period
            return
        with self._lock:
            if ticket == self._generation and self._state == HALF_OPEN:
                self._trial_in_flight = False
                self._trial_deadline = None
            self.rejections += 1
        if answer == "stale":
            self.remote_changed()  # the breaker moved on elsewhere: read it now
            raise CircuitOpenError("circuit breaker is open; another process moved it on")
        raise CircuitOpenError(
            "circuit breaker is half-open and this period's trial belongs to another process"
        )

    def _end_shared_trial(self, ticket: int, *, give_back: bool) -> None:
        # After the trial's result is recorded the claim stays in Redis (the period had its
        # trial); a call that never reached the peer gives it back.
        if self._claim_ticket is None:
            return
        with self._lock:
            if self._claim_ticket != ticket:
                return
            self._claim_ticket = None
        end = getattr(self._remote, "release_trial" if give_back else "end_trial", None)
        if end is not None:
            end()
