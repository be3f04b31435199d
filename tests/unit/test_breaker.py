"""The breaker adapter on its own: thresholds, half-open trials, stale results, the clock."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from freezegun import freeze_time

from dwcp._breaker import CLOSED, HALF_OPEN, OPEN, Breaker
from dwcp._errors import CircuitOpenError


def make(**kwargs: object) -> tuple[Breaker, list[tuple[str, str]]]:
    seen: list[tuple[str, str]] = []
    options: dict[str, object] = {"max_failures": 5, "reset_timeout": 30.0}
    options.update(kwargs)
    breaker = Breaker(on_transition=lambda old, new: seen.append((old, new)), **options)  # type: ignore[arg-type]
    return breaker, seen


def fail(breaker: Breaker, times: int) -> None:
    for _ in range(times):
        breaker.record_failure(breaker.admit())


def test_opens_after_exactly_max_failures() -> None:
    breaker, seen = make()
    fail(breaker, 4)
    assert breaker.state == CLOSED
    fail(breaker, 1)
    assert breaker.state == OPEN
    assert seen == [(CLOSED, OPEN)]
    with pytest.raises(CircuitOpenError) as info:
        breaker.admit()
    assert info.value.code == "CIRCUIT_OPEN"
    assert breaker.rejections == 1


def test_success_resets_the_consecutive_count() -> None:
    breaker, _ = make()
    fail(breaker, 4)
    breaker.record_success(breaker.admit())
    fail(breaker, 4)
    assert breaker.state == CLOSED
    assert breaker.failure_count == 4


def test_reads_half_open_once_reset_timeout_elapsed_before_any_call() -> None:
    with freeze_time("2026-01-01 00:00:00") as clock:
        breaker, seen = make()
        fail(breaker, 5)
        clock.tick(timedelta(seconds=29.9))
        assert breaker.state == OPEN
        clock.tick(timedelta(seconds=0.1))
        assert breaker.state == HALF_OPEN
        assert seen == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]


def test_half_open_admits_exactly_one_trial_and_success_closes() -> None:
    with freeze_time("2026-01-01 00:00:00") as clock:
        breaker, _ = make()
        fail(breaker, 5)
        clock.tick(timedelta(seconds=30))
        trial = breaker.admit()
        for _ in range(3):
            with pytest.raises(CircuitOpenError):
                breaker.admit()
        breaker.record_success(trial)
        assert breaker.state == CLOSED
        breaker.record_success(breaker.admit())


def test_failed_trial_reopens_for_another_reset_timeout() -> None:
    with freeze_time("2026-01-01 00:00:00") as clock:
        breaker, seen = make()
        fail(breaker, 5)
        clock.tick(timedelta(seconds=30))
        breaker.record_failure(breaker.admit())
        assert breaker.state == OPEN
        clock.tick(timedelta(seconds=29))
        with pytest.raises(CircuitOpenError):
            breaker.admit()
        clock.tick(timedelta(seconds=1))
        assert breaker.state == HALF_OPEN
        assert seen[-3:] == [(OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (OPEN, HALF_OPEN)]


def test_released_trial_frees_the_slot_without_changing_state() -> None:
    breaker, _ = make()
    fail(breaker, 5)
    breaker.half_open()
    trial = breaker.admit()
    breaker.release(trial)
    assert breaker.state == HALF_OPEN
    breaker.record_success(breaker.admit())
    assert breaker.state == CLOSED


def test_stale_results_do_not_change_the_new_state() -> None:
    breaker, _ = make()
    slow = breaker.admit()  # started while closed, finishes after the breaker opened
    fail(breaker, 5)
    assert breaker.state == OPEN
    breaker.record_success(slow)
    assert breaker.state == OPEN
    breaker.half_open()
    trial = breaker.admit()
    breaker.record_failure(slow)  # a stale failure must not re-open the half-open breaker
    assert breaker.state == HALF_OPEN
    breaker.record_success(trial)
    assert breaker.state == CLOSED


def test_half_open_on_recovery_only_moves_an_open_breaker() -> None:
    breaker, seen = make()
    breaker.half_open()
    assert breaker.state == CLOSED
    fail(breaker, 5)
    breaker.half_open()
    assert breaker.state == HALF_OPEN
    assert seen == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]


def test_eight_threads_exact_failure_count() -> None:
    """Under 8 racing threads the breaker opens on exactly the 5th counted failure."""
    breaker, seen = make(max_failures=5)
    barrier = threading.Barrier(8)
    outcomes: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait(5)
        for _ in range(200):
            try:
                ticket = breaker.admit()
            except CircuitOpenError:
                with lock:
                    outcomes.append("rejected")
                continue
            breaker.record_failure(ticket)
            with lock:
                outcomes.append("failed")

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    # Admissions race the opening, so more than 5 calls may have been admitted, but only
    # results from the closed generation count, and the breaker opened exactly once.
    assert seen == [(CLOSED, OPEN)]
    assert outcomes.count("failed") + outcomes.count("rejected") == 1600
    assert outcomes.count("rejected") == breaker.rejections
    assert 5 <= outcomes.count("failed") <= 5 + 7
