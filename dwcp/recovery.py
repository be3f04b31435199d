"""Recovery cycles as tenacity retry policies: back off, act, verify, at most N attempts."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import tenacity

__all__ = ["RecoveryOutcome", "RecoveryPolicy", "RestartSupervisor", "run_recovery"]


@dataclass(frozen=True)
class RecoveryPolicy:
    """How one component is recovered: attempt ``i`` (from 0) first waits ``backoff(i)``.

    The default reproduces the specified schedule exactly: 1 s, 2 s, 4 s before three attempts.
    Restart intensity (as in Erlang/OTP supervisors): with ``max_cycles`` set, more than that
    many recovery cycles within ``cycle_window`` seconds escalate: the component stays failed
    and no cycle runs until ``Manager.reset_component()`` or, if set, ``cooldown`` seconds.
    With ``adaptive_backoff``, a component that fails again within ``stable_period`` of its last
    recovery starts its next cycle with a first wait ``multiplier`` times longer (at most
    ``max_backoff``, or 60 s when that is unbounded); one that stays healthy for
    ``stable_period`` returns to ``initial_backoff`` and its cycle count is cleared.
    """

    attempts: int = 3
    initial_backoff: float = 1.0
    multiplier: float = 2.0
    max_backoff: float = math.inf
    jitter: float = 0.0
    max_cycles: int | None = None
    cycle_window: float = 60.0
    cooldown: float | None = None
    stable_period: float = 60.0
    adaptive_backoff: bool = False

    def __post_init__(self) -> None:
        for name in ("attempts", "max_cycles"):
            count = getattr(self, name)
            if count is None and name == "max_cycles":
                continue
            if isinstance(count, bool) or not isinstance(count, int):
                raise TypeError(f"{name} must be an int, got {type(count).__name__}")
            if count < 1:
                raise ValueError(f"{name} must be at least 1, got {count}")
        if self.cooldown is not None:
            _non_negative("cooldown", self.cooldown)
        for field in ("cycle_window", "stable_period"):
            if _non_negative(field, getattr(self, field)) == 0:
                raise ValueError(f"{field} must be positive")
        for field in ("initial_backoff", "multiplier", "max_backoff", "jitter"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{field} must be a number, got {type(value).__name__}")
            if math.isnan(value) or value < 0:
                raise ValueError(f"{field} must be a non-negative number, got {value!r}")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be at least 1, got {self.multiplier!r}")
        if math.isinf(self.initial_backoff) or math.isinf(self.jitter):
            raise ValueError("initial_backoff and jitter must be finite")

    def _wait_strategy(self) -> tenacity.wait.wait_base:
        """The tenacity wait strategy giving the backoff before attempt number n (from 1)."""
        base = tenacity.wait_exponential(
            multiplier=self.initial_backoff, exp_base=self.multiplier, max=self.max_backoff
        )
        return base + tenacity.wait_random(0, self.jitter) if self.jitter else base

    def backoff(self, attempt: int) -> float:
        """The wait before attempt ``attempt`` (0-based), without jitter."""
        return float(min(self.initial_backoff * self.multiplier**attempt, self.max_backoff))


def _non_negative(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


_ADAPTIVE_CAP = 60.0

Admission = Literal["run", "escalate", "blocked"]


class RestartSupervisor:
    """Restart intensity and adaptive backoff for one component; times come from the caller.

    Not thread-safe: the manager calls it under its lock.
    """

    def __init__(self, policy: RecoveryPolicy) -> None:
        self.policy = policy
        self._cycles: deque[float] = deque()
        self._escalated_at: float | None = None
        self._recovered_at: float | None = None
        self._first_wait = policy.initial_backoff

    @property
    def escalated(self) -> bool:
        """Whether the component exceeded its restart intensity and waits for a reset."""
        return self._escalated_at is not None

    def admit(self, now: float) -> Admission:
        """Decide whether a recovery cycle may start now, and account it if so."""
        policy = self.policy
        if self._escalated_at is not None:
            if policy.cooldown is None or now - self._escalated_at < policy.cooldown:
                return "blocked"
            self.reset()
        if self._recovered_at is not None and now - self._recovered_at >= policy.stable_period:
            # Healthy for a stable period: the past no longer counts against it.
            self._cycles.clear()
            self._first_wait = policy.initial_backoff
            self._recovered_at = None
        elif self._recovered_at is not None and policy.adaptive_backoff:
            # Failed again soon after the last recovery: start the next cycle more slowly.
            cap = policy.max_backoff if math.isfinite(policy.max_backoff) else _ADAPTIVE_CAP
            self._first_wait = min(max(self._first_wait, 1e-3) * policy.multiplier, cap)
        while self._cycles and now - self._cycles[0] >= policy.cycle_window:
            self._cycles.popleft()
        if policy.max_cycles is not None and len(self._cycles) >= policy.max_cycles:
            self._escalated_at = now
            return "escalate"
        self._cycles.append(now)
        return "run"

    def recovered(self, now: float) -> None:
        """Note a verified recovery; the stable period counts from here."""
        self._recovered_at = now

    def reset(self) -> None:
        """Forget escalation, cycle history and adaptive backoff."""
        self._cycles.clear()
        self._escalated_at = None
        self._recovered_at = None
        self._first_wait = self.policy.initial_backoff

    def cycle_policy(self) -> RecoveryPolicy:
        """The policy for the cycle just admitted: the first wait may be adapted."""
        if self._first_wait == self.policy.initial_backoff:
            return self.policy
        return replace(self.policy, initial_backoff=self._first_wait)


@dataclass(frozen=True)
class RecoveryOutcome:
    """What one recovery cycle did."""

    recovered: bool
    attempts: int
    cancelled: bool
    error: BaseException | None


class _AttemptFailed(Exception):
    """One attempt's action raised or its health re-check failed; tenacity retries these only."""


class _Cancelled(Exception):
    """The backoff wait was interrupted by shutdown; no further attempt may start."""


def run_recovery(
    action: Callable[[], None],
    verify: Callable[[], None],
    policy: RecoveryPolicy,
    *,
    sleep: Callable[[float], bool],
    on_attempt: Callable[[int, float], None] | None = None,
    on_failure: Callable[[int, BaseException], None] | None = None,
) -> RecoveryOutcome:
    """Run one recovery cycle in the calling thread.

    ``sleep(seconds)`` waits and returns False when interrupted (shutdown); then no further
    attempt starts.  An attempt succeeds only when ``action()`` and then ``verify()`` both
    return without raising.  ``on_attempt(number, backoff)`` runs before each wait and
    ``on_failure(number, error)`` after each failed attempt.
    """
    wait = policy._wait_strategy()
    last_error: list[BaseException] = []

    def back_off(state: tenacity.RetryCallState) -> None:
        delay = float(wait(state))
        if on_attempt is not None:
            on_attempt(state.attempt_number, delay)
        if not sleep(delay):
            raise _Cancelled

    # A fresh Retrying per cycle: tenacity keeps per-run statistics on the object, so one is
    # never shared between threads.  The backoff runs in ``before`` because the spec waits
    # before every attempt, including the first; tenacity's own between-attempt wait is zero.
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(policy.attempts),
        wait=tenacity.wait_none(),
        retry=tenacity.retry_if_exception_type(_AttemptFailed),
        before=back_off,
        sleep=lambda _seconds: None,
        reraise=True,
    )
    attempts = 0
    try:
        for attempt in retrying:
            with attempt:
                attempts = attempt.retry_state.attempt_number
                try:
                    action()
                    verify()
                except Exception as exc:
                    last_error[:] = [exc]
                    if on_failure is not None:
                        on_failure(attempts, exc)
                    raise _AttemptFailed(str(exc)) from exc
    except _Cancelled:
        return RecoveryOutcome(False, attempts, True, last_error[0] if last_error else None)
    except _AttemptFailed:
        return RecoveryOutcome(False, attempts, False, last_error[0] if last_error else None)
    return RecoveryOutcome(True, attempts, False, None)
