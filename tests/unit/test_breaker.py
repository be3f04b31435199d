"""The breaker adapter on its own: thresholds, half-open trials, stale results, the clock."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pybreaker
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


def _hang_a_trial(breaker: Breaker) -> tuple[threading.Thread, threading.Event, list[str]]:
    """Admit a trial on a thread whose call blocks until the returned event is set, then
    reports a success; the thread records whether it was admitted."""
    admitted, answer, log = threading.Event(), threading.Event(), []

    def call() -> None:
        ticket = breaker.admit()
        log.append("admitted")
        admitted.set()
        answer.wait(30)
        breaker.record_success(ticket)  # the late result
        log.append("recorded")

    thread = threading.Thread(target=call, name="hung-trial")
    thread.start()
    assert admitted.wait(10)
    return thread, answer, log


def test_a_hung_trial_fails_at_its_deadline_and_its_late_result_is_ignored() -> None:
    """A half-open trial still running after ``trial_timeout`` counts as a failed trial: the
    breaker opens from that deadline, the next trial is admitted a ``reset_timeout`` later,
    and the hung call's late success changes nothing."""
    with freeze_time("2026-01-01 00:00:00") as clock:
        breaker, seen = make(reset_timeout=30.0, trial_timeout=10.0)
        fail(breaker, 5)
        clock.tick(timedelta(seconds=30))
        thread, answer, log = _hang_a_trial(breaker)
        try:
            clock.tick(timedelta(seconds=9.999))
            with pytest.raises(CircuitOpenError, match="in flight"):
                breaker.admit()
            clock.tick(timedelta(seconds=0.001))
            assert breaker.state == OPEN  # reported at the deadline, before any call
            clock.tick(timedelta(seconds=29.999))
            with pytest.raises(CircuitOpenError, match="is open"):
                breaker.admit()
            clock.tick(timedelta(seconds=0.001))  # a reset timeout after the deadline
            trial = breaker.admit()
            answer.set()
            thread.join(10)
            assert log == ["admitted", "recorded"]
            assert breaker.state == HALF_OPEN  # the late success closed nothing
            breaker.record_failure(trial)
            assert breaker.state == OPEN
        finally:
            answer.set()
            thread.join(10)
        assert seen == [(CLOSED, OPEN)] + [(OPEN, HALF_OPEN), (HALF_OPEN, OPEN)] * 2


def test_a_late_result_after_the_deadline_is_ignored_even_if_nothing_looked_meanwhile() -> None:
    with freeze_time("2026-01-01 00:00:00") as clock:
        breaker, _ = make(reset_timeout=30.0, trial_timeout=10.0)
        fail(breaker, 5)
        clock.tick(timedelta(seconds=30))
        thread, answer, log = _hang_a_trial(breaker)
        clock.tick(timedelta(seconds=10))
        answer.set()  # the success arrives after the deadline, first to notice it
        thread.join(10)
        assert log == ["admitted", "recorded"]
        assert breaker.state == OPEN


def test_the_trial_deadline_defaults_to_the_reset_timeout() -> None:
    with freeze_time("2026-01-01 00:00:00") as clock:
        breaker, _ = make(reset_timeout=30.0)
        fail(breaker, 5)
        clock.tick(timedelta(seconds=30))
        thread, answer, _ = _hang_a_trial(breaker)
        try:
            clock.tick(timedelta(seconds=29.999))
            assert breaker.state == HALF_OPEN
            clock.tick(timedelta(seconds=0.001))
            assert breaker.state == OPEN
            clock.tick(timedelta(seconds=30))
            breaker.record_success(breaker.admit())  # the next trial closes it
            assert breaker.state == CLOSED
        finally:
            answer.set()
            thread.join(10)
        assert breaker.state == CLOSED  # the late success of the hung call changed nothing


@pytest.mark.parametrize(
    ("value", "error"),
    [(0, ValueError), (-1.0, ValueError), (float("inf"), ValueError), (float("nan"), ValueError),
     ("5", TypeError), (True, TypeError)],
)  # fmt: skip
def test_a_bad_trial_timeout_is_a_clear_error(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="trial_timeout"):
        Breaker(max_failures=1, reset_timeout=1.0, trial_timeout=value)  # type: ignore[arg-type]


def test_the_trial_timeout_takes_a_timedelta() -> None:
    with freeze_time("2026-01-01 00:00:00") as clock:
        breaker, _ = make(reset_timeout=30.0, trial_timeout=timedelta(seconds=5))
        fail(breaker, 5)
        clock.tick(timedelta(seconds=30))
        thread, answer, _ = _hang_a_trial(breaker)
        try:
            clock.tick(timedelta(seconds=5))
            assert breaker.state == OPEN
        finally:
            answer.set()
            thread.join(10)


def test_a_hung_guarded_call_does_not_shut_the_managers_sends_for_good() -> None:
    """``call()`` and the sends share one breaker: a guarded trial that never returns fails
    at its deadline (the reset timeout), and a later send is admitted as the next trial."""
    import dwcp
    from dwcp.testing import FakeTransport
    from tests.conftest import wait_until

    transport = FakeTransport()
    manager = dwcp.Manager(transport, max_failures=1, reset_timeout=0.2)
    manager.start()
    hang, entered = threading.Event(), threading.Event()

    def hung() -> None:
        entered.set()
        hang.wait(30)

    caller = threading.Thread(target=lambda: manager.call(hung), name="hung-guarded-call")
    try:
        transport.fail_sends = ConnectionRefusedError("peer down")
        with pytest.raises(dwcp.TransportError):
            manager.send_with_circuit_breaker(b"x")
        transport.fail_sends = None
        wait_until(lambda: manager.circuit_breaker_state == "half-open", timeout=10)
        caller.start()
        assert entered.wait(10)  # the hung call is the half-open trial
        with pytest.raises(dwcp.CircuitOpenError):
            manager.send_with_circuit_breaker(b"rejected while the trial is in flight")
        wait_until(lambda: _sent(manager), timeout=10)
        assert manager.circuit_breaker_state == "closed"
    finally:
        hang.set()
        caller.join(10)
        manager.stop()


def _sent(manager: object) -> bool:
    import dwcp

    assert isinstance(manager, dwcp.Manager)
    try:
        manager.send_with_circuit_breaker(b"after the deadline")
    except dwcp.CircuitOpenError:
        return False
    return True


def test_half_open_admits_exactly_one_of_many_racing_threads() -> None:
    breaker, _ = make()
    fail(breaker, 5)
    breaker.half_open()
    barrier = threading.Barrier(8)
    admitted: list[int] = []
    rejected: list[CircuitOpenError] = []
    lock = threading.Lock()

    def race() -> None:
        barrier.wait(5)
        try:
            ticket = breaker.admit()
        except CircuitOpenError as exc:
            with lock:
                rejected.append(exc)
            return
        with lock:
            admitted.append(ticket)

    threads = [threading.Thread(target=race) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert (len(admitted), len(rejected)) == (1, 7)
    breaker.record_success(admitted[0])
    assert breaker.state == CLOSED


def test_not_started_failures_never_count() -> None:
    from dwcp._errors import TransportError

    breaker, seen = make(max_failures=1)
    for _ in range(5):
        breaker.record_failure(breaker.admit(), TransportError("closed", code="NOT_STARTED"))
    assert breaker.state == CLOSED and breaker.failure_count == 0 and seen == []
    breaker.half_open()  # no-op while closed; open it and see a not-started trial given back
    fail(breaker, 1)
    breaker.half_open()
    trial = breaker.admit()
    breaker.record_failure(trial, TransportError("closed", code="NOT_STARTED"))
    assert breaker.state == HALF_OPEN
    breaker.record_success(breaker.admit())  # the slot was free for the next trial
    assert breaker.state == CLOSED


def _shared_pair() -> tuple[Breaker, pybreaker.CircuitMemoryStorage]:
    remote = pybreaker.CircuitMemoryStorage(CLOSED)  # what other processes write
    return Breaker(max_failures=1, reset_timeout=1.0, storage=remote, sync_interval=0), remote


def test_half_open_adopts_a_later_period_that_has_timed_out_too_without_re_opening() -> None:
    """Another process's open, decided alone during a Redis outage and written back with its
    own (later) period, which has timed out as well: this half-open breaker takes that period
    and stays half-open (no open -> rejected calls and breaker_opened alert for nothing)."""
    with freeze_time("2026-01-01 00:00:00") as clock:
        breaker, remote = _shared_pair()
        breaker.record_failure(breaker.admit())
        clock.tick(2.0)
        assert breaker.state == HALF_OPEN
        remote.opened_at = datetime(2026, 1, 1, 0, 0, 0, 500_000, tzinfo=timezone.utc)
        remote.state = OPEN
        assert breaker.state == HALF_OPEN
        assert breaker.transition_counts.get((HALF_OPEN, OPEN), 0) == 0  # before: 1
        breaker.record_success(breaker.admit())  # that period's trial
        assert breaker.state == CLOSED


def test_half_open_with_its_trial_in_flight_re_opens_for_a_later_period() -> None:
    """The trial in flight holds the older period's claim: a later period re-opens the
    breaker as before, so the trial's late result is ignored and the new period gets one
    trial in total."""
    with freeze_time("2026-01-01 00:00:00") as clock:
        breaker, remote = _shared_pair()
        breaker.record_failure(breaker.admit())
        clock.tick(2.0)
        ticket = breaker.admit()  # the old period's trial, in flight
        remote.opened_at = datetime(2026, 1, 1, 0, 0, 0, 500_000, tzinfo=timezone.utc)
        remote.state = OPEN
        assert breaker.state == HALF_OPEN  # re-opened, and that period has timed out too
        assert breaker.transition_counts.get((HALF_OPEN, OPEN), 0) == 1
        breaker.record_success(ticket)  # stale: ignored
        assert breaker.state == HALF_OPEN
