"""Recovery cycles with an injected sleep: exact delays, verification, cancellation."""

from __future__ import annotations

import math

import pytest

from dwcp._recovery import RecoveryPolicy, run_recovery


class Sleeper:
    def __init__(self, interrupt_at: int | None = None) -> None:
        self.slept: list[float] = []
        self.interrupt_at = interrupt_at

    def __call__(self, seconds: float) -> bool:
        if self.interrupt_at is not None and len(self.slept) == self.interrupt_at:
            return False
        self.slept.append(seconds)
        return True


def failing(times: int) -> tuple[list[int], object]:
    calls = [0]

    def action() -> None:
        calls[0] += 1
        if calls[0] <= times:
            raise OSError(f"attempt {calls[0]} failed")

    return calls, action


def test_default_policy_waits_1_2_4_before_three_attempts() -> None:
    sleep = Sleeper()
    calls, action = failing(times=99)
    outcome = run_recovery(action, lambda: None, RecoveryPolicy(), sleep=sleep)  # type: ignore[arg-type]
    assert sleep.slept == [1.0, 2.0, 4.0]
    assert calls[0] == 3
    assert not outcome.recovered and not outcome.cancelled
    assert outcome.attempts == 3
    assert isinstance(outcome.error, OSError)


def test_backoff_scales_with_initial_backoff_and_max_retries() -> None:
    sleep = Sleeper()
    _, action = failing(times=99)
    policy = RecoveryPolicy(attempts=5, initial_backoff=0.25)
    run_recovery(action, lambda: None, policy, sleep=sleep)  # type: ignore[arg-type]
    assert sleep.slept == [0.25, 0.5, 1.0, 2.0, 4.0]
    assert [policy.backoff(i) for i in range(5)] == sleep.slept


@pytest.mark.parametrize("multiplier", [1e300, 2**63], ids=["1e300", "2**63"])
def test_a_huge_multiplier_saturates_at_max_backoff_never_overflows(multiplier: float) -> None:
    # Before: backoff(2) raised OverflowError (the cap was applied after the power), which
    # also ended a recovery cycle with that policy.
    policy = RecoveryPolicy(
        attempts=5, initial_backoff=0.01, multiplier=multiplier, max_backoff=0.05
    )
    assert [policy.backoff(i) for i in range(5)] == [0.01, 0.05, 0.05, 0.05, 0.05]
    sleep = Sleeper()
    _, action = failing(times=99)
    run_recovery(action, lambda: None, policy, sleep=sleep)  # type: ignore[arg-type]
    assert sleep.slept == [0.01, 0.05, 0.05, 0.05, 0.05]
    assert RecoveryPolicy(initial_backoff=0, multiplier=multiplier).backoff(40) == 0.0


def test_max_backoff_caps_the_wait() -> None:
    sleep = Sleeper()
    _, action = failing(times=99)
    policy = RecoveryPolicy(attempts=4, initial_backoff=1.0, max_backoff=3.0)
    run_recovery(action, lambda: None, policy, sleep=sleep)  # type: ignore[arg-type]
    assert sleep.slept == [1.0, 2.0, 3.0, 3.0]


def test_success_needs_the_health_recheck_to_pass() -> None:
    sleep = Sleeper()
    checks = [0]

    def verify() -> None:
        checks[0] += 1
        if checks[0] < 2:
            raise RuntimeError("still unhealthy")

    outcome = run_recovery(lambda: None, verify, RecoveryPolicy(), sleep=sleep)
    assert outcome.recovered and outcome.attempts == 2
    assert sleep.slept == [1.0, 2.0]


def test_action_that_raises_is_not_verified() -> None:
    verified = [0]
    _, action = failing(times=1)

    def verify() -> None:
        verified[0] += 1

    outcome = run_recovery(action, verify, RecoveryPolicy(), sleep=Sleeper())  # type: ignore[arg-type]
    assert outcome.recovered and outcome.attempts == 2 and verified[0] == 1


def test_interrupted_wait_starts_no_further_attempt() -> None:
    sleep = Sleeper(interrupt_at=2)
    calls, action = failing(times=99)
    outcome = run_recovery(action, lambda: None, RecoveryPolicy(), sleep=sleep)  # type: ignore[arg-type]
    assert outcome.cancelled and not outcome.recovered
    assert calls[0] == 2 and sleep.slept == [1.0, 2.0]


def test_hooks_see_attempt_numbers_and_backoffs() -> None:
    seen: list[tuple[str, int, object]] = []
    _, action = failing(times=2)
    run_recovery(
        action,  # type: ignore[arg-type]
        lambda: None,
        RecoveryPolicy(),
        sleep=Sleeper(),
        on_attempt=lambda n, b: seen.append(("attempt", n, b)),
        on_failure=lambda n, e: seen.append(("failed", n, type(e).__name__)),
    )
    assert seen == [
        ("attempt", 1, 1.0),
        ("failed", 1, "OSError"),
        ("attempt", 2, 2.0),
        ("failed", 2, "OSError"),
        ("attempt", 3, 4.0),
    ]


def test_keyboard_interrupt_is_not_retried() -> None:
    def action() -> None:
        raise KeyboardInterrupt

    sleep = Sleeper()
    with pytest.raises(KeyboardInterrupt):
        run_recovery(action, lambda: None, RecoveryPolicy(), sleep=sleep)
    assert sleep.slept == [1.0]


def test_jitter_stays_within_bounds() -> None:
    sleep = Sleeper()
    _, action = failing(times=99)
    run_recovery(action, lambda: None, RecoveryPolicy(jitter=0.5), sleep=sleep)  # type: ignore[arg-type]
    for base, slept in zip([1.0, 2.0, 4.0], sleep.slept):
        assert base <= slept <= base + 0.5


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"attempts": 0}, "attempts"),
        ({"initial_backoff": -1.0}, "initial_backoff"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"jitter": math.nan}, "jitter"),
        ({"initial_backoff": math.inf}, "initial_backoff"),
    ],
)
def test_policy_rejects_bad_values_naming_the_field(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        RecoveryPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_is_immutable() -> None:
    policy = RecoveryPolicy()
    with pytest.raises(AttributeError):
        policy.attempts = 5  # type: ignore[misc]
