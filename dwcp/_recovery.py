"""Recovery cycles as tenacity retry policies: back off, act, verify, at most N attempts."""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Literal

import tenacity

from dwcp import _validation as check
from dwcp._learning import LearnedTiming
from dwcp._prediction import RecoveryHistory, SchedulePlan

if TYPE_CHECKING:
    from dwcp._shared_history import SharedHistory

__all__ = ["RecoveryOutcome", "RecoveryPolicy", "RestartSupervisor", "run_recovery"]


@dataclass(frozen=True, kw_only=True, init=False)
class RecoveryPolicy:
    """How one component is recovered: attempt ``i`` (from 0) first waits ``backoff(i)``.

    Keyword-only; every time is seconds, given as a number or a ``datetime.timedelta`` and
    stored as a float.  The default reproduces the specified schedule exactly: 1 s, 2 s, 4 s
    before three attempts.

    Restart intensity (as in Erlang/OTP supervisors): with ``max_cycles`` set, more than that
    many recovery cycles within ``cycle_window`` seconds escalate: the component stays failed
    and no cycle runs until ``Manager.reset_component()`` or, if set, ``cooldown`` seconds.
    With ``adaptive_backoff``, a component that fails again within ``stable_period`` of its last
    recovery starts its next cycle with a first wait ``multiplier`` times longer (at most
    ``max_backoff``, or 60 s when that is unbounded); one that stays healthy for
    ``stable_period`` returns to ``initial_backoff`` and its cycle count is cleared.

    With ``predictive``, each outage is recorded (first unhealthy check, last failed attempt,
    successful attempt); once at least five are known, a cycle places its attempts where
    past outages suggest they fail least, with an expected delay no longer and a median
    delay no later than the configured schedule's (see ``dwcp._prediction``).  It never
    makes more than ``attempts`` attempts, never waits longer than ``max_backoff`` (60 s
    when unbounded) before one, never gives up before the configured cycle would, and falls
    back to the configured schedule with too little history and after a change of pattern;
    every fifth outage's cycle makes the configured first attempt.  With a cluster, the
    outages are shared through its Redis (``dwcp._shared_history``).  ``suspicion_threshold`` is the phi at which the component is reported
    suspected (``ComponentSuspected``); 8 is Akka's default.
    """

    attempts: int
    initial_backoff: float
    multiplier: float
    max_backoff: float
    jitter: float
    max_cycles: int | None
    cycle_window: float
    cooldown: float | None
    stable_period: float
    adaptive_backoff: bool
    predictive: bool
    suspicion_threshold: float

    def __init__(
        self,
        *,
        attempts: int = 3,
        initial_backoff: float | timedelta = 1.0,
        multiplier: float = 2.0,
        max_backoff: float | timedelta = math.inf,
        jitter: float | timedelta = 0.0,
        max_cycles: int | None = None,
        cycle_window: float | timedelta = 60.0,
        cooldown: float | timedelta | None = None,
        stable_period: float | timedelta = 60.0,
        adaptive_backoff: bool = False,
        predictive: bool = False,
        suspicion_threshold: float = 8.0,
    ) -> None:
        check.count("attempts", attempts)
        if max_cycles is not None:
            check.count("max_cycles", max_cycles)
        check.flag("adaptive_backoff", adaptive_backoff)
        check.flag("predictive", predictive)
        values = {
            "initial_backoff": check.seconds("initial_backoff", initial_backoff, allow_zero=True),
            "max_backoff": check.seconds(
                "max_backoff", max_backoff, allow_zero=True, allow_inf=True
            ),
            "jitter": check.seconds("jitter", jitter, allow_zero=True),
            "cycle_window": check.seconds("cycle_window", cycle_window),
            "stable_period": check.seconds("stable_period", stable_period),
        }
        factor = check.number("multiplier", multiplier)
        if factor < 1:
            raise ValueError(f"multiplier must be at least 1, got {multiplier!r}")
        threshold = check.number("suspicion_threshold", suspicion_threshold, allow_zero=False)
        fields = {
            "attempts": attempts,
            "multiplier": factor,
            "max_cycles": max_cycles,
            "cooldown": None
            if cooldown is None
            else check.seconds("cooldown", cooldown, allow_zero=True),
            "adaptive_backoff": adaptive_backoff,
            "predictive": predictive,
            "suspicion_threshold": threshold,
            **values,
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def _retry_wait(self) -> tenacity.wait.wait_base:
        """The tenacity wait after attempt k (from 1) fails: the backoff before attempt k + 1."""
        base = tenacity.wait_exponential(
            multiplier=self.initial_backoff * self.multiplier,
            exp_base=self.multiplier,
            max=self.max_backoff,
        )
        return base + tenacity.wait_random(0, self.jitter) if self.jitter else base

    def _first_wait(self) -> float:
        """The wait before the first attempt, jitter included."""
        jitter = random.uniform(0, self.jitter) if self.jitter else 0.0
        return float(min(self.initial_backoff, self.max_backoff)) + jitter

    def backoff(self, attempt: int) -> float:
        """The wait before attempt ``attempt`` (0-based), without jitter: ``initial_backoff *
        multiplier ** attempt``, saturating at ``max_backoff`` (however large the power)."""
        if self.initial_backoff == 0:
            return 0.0
        try:
            wait = self.initial_backoff * self.multiplier**attempt
        except OverflowError:  # a float power past 1.8e308 (multiplier=1e300, say): capped
            return float(self.max_backoff)
        return float(min(wait, self.max_backoff))


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
        #: What the component learns from its outages, only with ``policy.predictive``.
        self.learned: LearnedTiming | None = LearnedTiming() if policy.predictive else None

    @property
    def history(self) -> RecoveryHistory | None:
        """Learned recovery times, kept only with ``policy.predictive``."""
        return None if self.learned is None else self.learned.history

    def share(self, shared: SharedHistory) -> None:
        """Share the learned outages through ``shared``: those read from it are taken in
        before the next schedule, and each outage learned here is pushed to it.  Only with
        ``policy.predictive``; neither call does I/O."""
        if self.learned is not None:
            self.learned.share(shared)

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

    def recovered(
        self, now: float, *, down_since: float | None = None, attempt: int | None = None
    ) -> None:
        """Note a verified recovery; the stable period counts from here.

        With ``policy.predictive`` and ``down_since`` (the outage's first unhealthy check),
        the outage is learned; ``attempt`` is the attempt that succeeded (None when a health
        check found the component healthy between cycles).
        """
        self._recovered_at = now
        if self.learned is not None:
            self.learned.recovered(now, down_since, attempt)

    def healed(self, now: float, down_since: float | None) -> None:
        """Note a check that found the component healthy between cycles (after one gave up).

        Only learned (with ``policy.predictive``); restart intensity and adaptive backoff see
        verified recoveries of a cycle only, as before.
        """
        if self.learned is not None:
            self.learned.healed(now, down_since)

    def attempt_started(self, at: float) -> None:
        """Note that an attempt of the current outage begins (acts) at ``at``."""
        if self.learned is not None:
            self.learned.attempt_started(at)

    def attempt_failed(self, now: float) -> None:
        """Note that the attempt begun last failed at ``now``: the outage ends after it."""
        if self.learned is not None:
            self.learned.attempt_failed(now)

    def reset(self) -> None:
        """Forget escalation, cycle history and adaptive backoff (learned outages stay)."""
        self._cycles.clear()
        self._escalated_at = None
        self._recovered_at = None
        self._first_wait = self.policy.initial_backoff

    def cycle_policy(self) -> RecoveryPolicy:
        """The policy for the cycle just admitted: the first wait may be adapted."""
        if self._first_wait == self.policy.initial_backoff:
            return self.policy
        return replace(self.policy, initial_backoff=self._first_wait)

    def cycle_plan(self, now: float, down_since: float | None) -> SchedulePlan | None:
        """What the learned waits of the cycle just admitted are searched from, or None for
        the policy's own schedule; no search here, so the caller may hold its lock.

        Only with ``policy.predictive``; ``down_since`` is the outage's first unhealthy check.
        Its ``waits()`` are at most ``policy.attempts``, none over ``max_backoff`` (60 s when
        unbounded).
        """
        if self.learned is None or down_since is None:
            return None
        policy = self.cycle_policy()
        configured = [policy.backoff(i) for i in range(policy.attempts)]
        cap = policy.max_backoff if math.isfinite(policy.max_backoff) else _ADAPTIVE_CAP
        return self.learned.plan(now, down_since, configured, cap)

    def cycle_schedule(self, now: float, down_since: float | None) -> tuple[float, ...] | None:
        """``cycle_plan(now, down_since)`` searched at once: learned waits, or None."""
        plan = self.cycle_plan(now, down_since)
        return None if plan is None else plan.waits()


@dataclass(frozen=True)
class RecoveryOutcome:
    """What one recovery cycle did."""

    recovered: bool
    attempts: int
    cancelled: bool
    error: BaseException | None


class _ScheduledWait(tenacity.wait.wait_base):
    """A tenacity wait strategy reading off a schedule the wait after attempt k (from 1)."""

    def __init__(self, waits: tuple[float, ...]) -> None:
        self._waits = waits

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        return self._waits[min(retry_state.attempt_number, len(self._waits) - 1)]


def _check_waits(waits: Sequence[float], limit: int) -> tuple[float, ...]:
    if isinstance(waits, (str, bytes)) or not isinstance(waits, Sequence):
        raise TypeError(f"waits must be a sequence of seconds, got {type(waits).__name__}")
    schedule = tuple(check.seconds(f"waits[{i}]", w, allow_zero=True) for i, w in enumerate(waits))
    if not schedule or len(schedule) > limit:
        raise ValueError(f"waits must hold 1 to {limit} (policy.attempts) waits, got {len(waits)}")
    if any(math.isinf(w) for w in schedule):
        raise ValueError("waits must be finite")
    return schedule


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
    waits: Sequence[float] | None = None,
) -> RecoveryOutcome:
    """Run one recovery cycle in the calling thread.

    ``sleep(seconds)`` waits and returns False when interrupted (shutdown); then no further
    attempt starts.  An attempt succeeds only when ``action()`` and then ``verify()`` both
    return without raising.  ``on_attempt(number, backoff)`` runs before each wait and
    ``on_failure(number, error)`` after each failed attempt.  ``waits``, when given, is an
    explicit schedule (one wait before each attempt, at most ``policy.attempts`` of them)
    used instead of the policy's backoff.
    """
    wait: tenacity.wait.wait_base
    if waits is None:
        wait, first, limit = policy._retry_wait(), policy._first_wait(), policy.attempts
    else:
        schedule = _check_waits(waits, policy.attempts)
        wait, first, limit = _ScheduledWait(schedule), schedule[0], len(schedule)
    last_error: list[BaseException] = []

    # The spec waits before every attempt, the first included; tenacity waits only between
    # attempts, so the first wait is the one taken here by hand.  tenacity drives the rest:
    # the waits (its strategy and sleep), the attempt count, and cancellation, since the
    # interruptible sleep raises _Cancelled when shutdown cuts a wait short.
    if on_attempt is not None:
        on_attempt(1, first)
    if not sleep(first):
        return RecoveryOutcome(False, 0, True, None)

    def before_sleep(state: tenacity.RetryCallState) -> None:
        if on_attempt is not None and state.next_action is not None:
            on_attempt(state.attempt_number + 1, float(state.next_action.sleep))

    def interruptible(seconds: float) -> None:
        if not sleep(seconds):
            raise _Cancelled

    # A fresh Retrying per cycle: tenacity keeps per-run statistics on the object, so one is
    # never shared between threads.
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(limit),
        wait=wait,
        retry=tenacity.retry_if_exception_type(_AttemptFailed),
        before_sleep=before_sleep,
        sleep=interruptible,
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
