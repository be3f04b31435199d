"""Recovery cycles as tenacity retry policies: back off, act, verify, at most N attempts."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import tenacity

__all__ = ["RecoveryOutcome", "RecoveryPolicy", "run_recovery"]


@dataclass(frozen=True)
class RecoveryPolicy:
    """How one component is recovered: attempt ``i`` (from 0) first waits ``backoff(i)``.

    The default reproduces the specified schedule exactly: 1 s, 2 s, 4 s before three attempts.
    """

    attempts: int = 3
    initial_backoff: float = 1.0
    multiplier: float = 2.0
    max_backoff: float = math.inf
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise TypeError(f"attempts must be an int, got {type(self.attempts).__name__}")
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
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

    def wait_strategy(self) -> tenacity.wait.wait_base:
        """The tenacity wait strategy giving the backoff before attempt number n (from 1)."""
        base = tenacity.wait_exponential(
            multiplier=self.initial_backoff, exp_base=self.multiplier, max=self.max_backoff
        )
        return base + tenacity.wait_random(0, self.jitter) if self.jitter else base

    def backoff(self, attempt: int) -> float:
        """The wait before attempt ``attempt`` (0-based), without jitter."""
        return float(min(self.initial_backoff * self.multiplier**attempt, self.max_backoff))


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
    wait = policy.wait_strategy()
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
