"""Learned recovery timing: the policy's fields, the estimate, the schedule, the manager path."""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
from collections.abc import Callable
from datetime import timedelta

import pytest

import dwcp
from dwcp._learning import DelayGuard
from dwcp._prediction import (
    EXPLORE_EVERY,
    MIN_SAMPLES,
    Outage,
    RecoveryHistory,
    _fold,
    _late,
    _Plan,
    turnbull,
)
from dwcp._recovery import RecoveryPolicy, RestartSupervisor, run_recovery
from dwcp.testing import FakeClock
from tests._outage import OutagePeer, run_outage


@pytest.fixture
def guard_allows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The delay guard lets learned schedules run: these tests are about what the search
    chooses on one constant outage length, whose identical delays leave the guard's
    median-room check no room (tests/unit/test_prediction_safety.py tests the guard)."""
    monkeypatch.setattr(DelayGuard, "allows", property(lambda self: True))


def recording(slept: list[float]) -> Callable[[float], bool]:
    """A recovery ``sleep`` that records each wait in ``slept`` and is never interrupted."""

    def sleep(seconds: float) -> bool:
        slept.append(seconds)
        return True

    return sleep


# -- the policy ---------------------------------------------------------------------------------


def test_default_schedule_is_exactly_1_2_4() -> None:
    policy = RecoveryPolicy()
    assert [policy.backoff(i) for i in range(policy.attempts)] == [1.0, 2.0, 4.0]
    slept: list[float] = []

    def fail() -> None:
        raise OSError("down")

    outcome = run_recovery(fail, lambda: None, policy, sleep=recording(slept))
    assert slept == [1.0, 2.0, 4.0] and outcome.attempts == 3
    assert not policy.predictive


def test_default_supervisor_learns_nothing_and_keeps_the_schedule() -> None:
    supervisor = RestartSupervisor(RecoveryPolicy())
    assert supervisor.history is None and supervisor.learned is None  # no statistics held
    for n in range(10):
        start = 100.0 * n
        supervisor.admit(start)
        for at in (1.0, 3.0):
            supervisor.attempt_started(start + at)
            supervisor.attempt_failed(start + at)
        supervisor.attempt_started(start + 7.0)
        supervisor.recovered(start + 7.0, down_since=start, attempt=3)
        assert supervisor.cycle_schedule(start + 50, start + 50) is None
    assert supervisor.cycle_policy() == RecoveryPolicy()


def test_policy_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        RecoveryPolicy(5)  # type: ignore[call-arg]


@pytest.mark.parametrize("name", ["adaptive_backoff", "predictive"])
def test_flags_must_be_bools(name: str) -> None:
    with pytest.raises(TypeError, match=name):
        RecoveryPolicy(**{name: "yes"})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=name):
        RecoveryPolicy(**{name: 1})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name",
    ["initial_backoff", "max_backoff", "jitter", "cycle_window", "cooldown", "stable_period"],
)
def test_seconds_accept_timedelta_and_store_floats(name: str) -> None:
    policy = RecoveryPolicy(**{name: timedelta(milliseconds=1500)})  # type: ignore[arg-type]
    value = getattr(policy, name)
    assert type(value) is float and value == 1.5
    assert policy == RecoveryPolicy(**{name: 1.5})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=name):
        RecoveryPolicy(**{name: timedelta(seconds=-1)})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=name):
        RecoveryPolicy(**{name: "1.5"})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "error"), [(0, ValueError), (-1.0, ValueError), (math.inf, ValueError),
                         (math.nan, ValueError), ("8", TypeError), (True, TypeError)]
)  # fmt: skip
def test_suspicion_threshold_is_validated(value: object, error: type) -> None:
    with pytest.raises(error, match="suspicion_threshold"):
        RecoveryPolicy(suspicion_threshold=value)  # type: ignore[arg-type]


def test_policy_is_still_a_frozen_replaceable_value() -> None:
    policy = RecoveryPolicy(predictive=True, suspicion_threshold=5.0)
    assert dataclasses.replace(policy, initial_backoff=2.0).initial_backoff == 2.0
    assert dataclasses.replace(policy, initial_backoff=2.0).predictive
    assert hash(policy) == hash(RecoveryPolicy(predictive=True, suspicion_threshold=5.0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.predictive = False  # type: ignore[misc]


# -- explicit schedules -------------------------------------------------------------------------


def test_run_recovery_follows_an_explicit_schedule() -> None:
    slept: list[float] = []
    calls = [0]

    def act() -> None:
        calls[0] += 1
        if calls[0] < 2:
            raise OSError("down")

    outcome = run_recovery(
        act, lambda: None, RecoveryPolicy(), sleep=recording(slept),
        waits=(6.5, 0.5),
    )  # fmt: skip
    assert outcome.recovered and outcome.attempts == 2
    assert slept == [6.5, 0.5]


def test_an_explicit_schedule_bounds_the_attempts() -> None:
    slept: list[float] = []

    def fail() -> None:
        raise OSError("down")

    outcome = run_recovery(
        fail, lambda: None, RecoveryPolicy(), sleep=recording(slept), waits=[7.0]
    )
    assert not outcome.recovered and outcome.attempts == 1 and slept == [7.0]


@pytest.mark.parametrize(
    ("waits", "error", "match"),
    [
        ((), ValueError, "waits"),
        ((1.0, 1.0, 1.0, 1.0), ValueError, "policy.attempts"),
        ((-1.0,), ValueError, r"waits\[0\]"),
        ((math.inf,), ValueError, "finite"),
        (("1",), TypeError, r"waits\[0\]"),
        ("12", TypeError, "waits"),
    ],
)
def test_bad_schedules_are_refused(waits: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        run_recovery(
            lambda: None,
            lambda: None,
            RecoveryPolicy(),
            sleep=lambda s: True,
            waits=waits,  # type: ignore[arg-type]
        )


# -- the estimate -------------------------------------------------------------------------------


def test_outages_are_validated() -> None:
    with pytest.raises(ValueError, match="not_before"):
        Outage(5.0, not_before=6.0)
    with pytest.raises(ValueError, match="recovered_after"):
        Outage(-1.0)
    with pytest.raises(TypeError, match="back_by"):
        Outage(5.0, back_by=True)
    assert Outage(5.0, 3.0).until == 5.0
    assert Outage(5.1, 3.0, 3, back_by=5.0).until == 5.0


def test_turnbull_with_exact_intervals_counts_them() -> None:
    outages = [Outage(1.0), Outage(3.0, 1.0), Outage(3.0, 1.0), Outage(7.0, 3.0)]
    assert turnbull(outages, [0.0, 1.0, 3.0, 7.0]) == pytest.approx([0.25, 0.5, 0.25])


def test_turnbull_shares_a_censored_outage_by_the_others() -> None:
    # (0,1], (0,1], (1,3] and (0,3]: the likelihood p1^2 * p2 * (p1 + p2) peaks at p1 = 2/3.
    outages = [Outage(1.0), Outage(1.0), Outage(3.0, 1.0), Outage(3.0)]
    assert turnbull(outages, [0.0, 1.0, 3.0]) == pytest.approx([2 / 3, 1 / 3], abs=1e-4)


def test_turnbull_snaps_endpoints_to_the_nearest_edge() -> None:
    # An attempt meant for 3 s began at 3.06 s (the previous attempt's own duration).
    outages = [Outage(3.1, 1.01, back_by=3.06), Outage(7.2, 3.06, back_by=7.11)]
    assert turnbull(outages, [0.0, 1.0, 3.0, 7.0]) == pytest.approx([0.0, 0.5, 0.5])


# -- learning with explicit times ---------------------------------------------------------------


def learn(supervisor: RestartSupervisor, start: float, failed: list[float], back: float) -> None:
    """One outage from ``start``: attempts at ``failed`` fail, the one at ``back`` succeeds."""
    supervisor.admit(start)
    for at in failed:
        supervisor.attempt_started(start + at)
        supervisor.attempt_failed(start + at)
    supervisor.attempt_started(start + back)
    supervisor.recovered(start + back, down_since=start, attempt=len(failed) + 1)


def cumulative(waits: tuple[float, ...] | list[float]) -> list[float]:
    """The moments attempts begin at, with attempts taking no time."""
    moments, at = [], 0.0
    for wait in waits:
        at += wait
        moments.append(at)
    return moments


def test_too_little_history_keeps_the_configured_schedule() -> None:
    supervisor = RestartSupervisor(RecoveryPolicy(predictive=True))
    for n in range(MIN_SAMPLES - 1):
        learn(supervisor, 1000.0 * n, [1.0, 3.0], 7.0)
        assert supervisor.cycle_schedule(1000.0 * n + 500, 1000.0 * n + 500) is None


@pytest.mark.usefixtures("guard_allows")
def test_attempts_that_never_succeed_are_skipped() -> None:
    # A peer that always needs 5-7 s: the attempts after 1 s and 3 s always failed.
    supervisor = RestartSupervisor(RecoveryPolicy(predictive=True, stable_period=10.0))
    for n in range(30):
        learn(supervisor, 1000.0 * n, [1.0, 3.0], 7.0)
    assert supervisor.history is not None and len(supervisor.history) == 30
    schedules = []
    for n in range(EXPLORE_EVERY):
        start = 100_000.0 + 1000.0 * n
        supervisor.admit(start)
        schedules.append(supervisor.cycle_schedule(start, start))
        supervisor.attempt_started(start + 7.0)
        supervisor.recovered(start + 7.0, down_since=start, attempt=1)
    for waits in schedules[: EXPLORE_EVERY - 1]:
        assert waits is not None and len(waits) < 3
        moments = cumulative(waits)
        # Neither attempt that always failed is made, and the cycle ends no sooner than 7 s.
        assert moments[0] > 3.0 and moments[-1] >= 7.0
    # One cycle in EXPLORE_EVERY makes the configured first attempt, to see earlier returns.
    explored = schedules[-1]
    assert explored is not None and explored[0] == 1.0 and cumulative(explored)[-1] >= 7.0


def test_a_component_back_at_the_first_attempt_keeps_it() -> None:
    supervisor = RestartSupervisor(RecoveryPolicy(predictive=True))
    for n in range(20):
        learn(supervisor, 1000.0 * n, [], 1.0)
    assert supervisor.cycle_schedule(50_000.0, 50_000.0) is None  # nothing to skip


@pytest.mark.usefixtures("guard_allows")
def test_learned_waits_stay_within_max_backoff_and_attempts() -> None:
    policy = RecoveryPolicy(predictive=True, attempts=4, max_backoff=4.0)
    supervisor = RestartSupervisor(policy)
    # Configured attempts at 1, 3, 7 and 11 s; the peer is always back between 1 s and 3 s.
    for n in range(30):
        learn(supervisor, 1000.0 * n, [1.0], 3.0)
    waits = supervisor.cycle_schedule(90_000.0, 90_000.0)
    # The attempt at 1 s is skipped (the first is made within the 1-3 s stretch), and the
    # cycle still ends at 11 s or later, every wait within 4 s.
    assert waits is not None
    assert len(waits) <= policy.attempts and max(waits) <= policy.max_backoff
    moments = cumulative(waits)
    assert 1.0 < moments[0] <= 3.0 and moments[-1] >= 11.0


def test_a_cap_that_needs_every_attempt_keeps_the_configured_schedule() -> None:
    policy = RecoveryPolicy(predictive=True, max_backoff=2.0)  # waits 1, 2, 2: at 1, 3, 5 s
    supervisor = RestartSupervisor(policy)
    for n in range(30):
        learn(supervisor, 1000.0 * n, [1.0, 3.0], 5.0)
    # Skipping 1 s and 3 s would need a 5 s wait; with 2 s at most every attempt is needed.
    assert supervisor.cycle_schedule(90_000.0, 90_000.0) is None


def test_a_change_of_pattern_drops_the_old_history() -> None:
    history = RecoveryHistory()
    for _ in range(10):
        assert not history.record(Outage(3.0, 1.0))  # back between 1 s and 3 s
    # Then three outages still down at 20 s: a slower pattern.
    assert not history.record(Outage(25.0, 20.0))
    assert not history.record(Outage(25.0, 20.0))
    assert history.record(Outage(25.0, 20.0))
    assert len(history) == 3 and history.regime_changes == 1
    assert history.schedule([1.0, 2.0, 4.0], 0.0, 60.0) is None  # too little new history


def test_an_outlier_alone_is_not_a_change() -> None:
    history = RecoveryHistory()
    for _ in range(10):
        history.record(Outage(3.0, 1.0))
    history.record(Outage(25.0, 20.0))
    history.record(Outage(3.0, 1.0))
    history.record(Outage(25.0, 20.0))
    history.record(Outage(25.0, 20.0))
    # The lone outlier joined the history once an ordinary outage followed it.
    assert history.regime_changes == 0 and len(history) == 14


def test_outliers_are_held_apart_until_their_run_resolves() -> None:
    history = RecoveryHistory()
    for _ in range(10):
        history.record(Outage(3.0, 1.0))
    history.record(Outage(25.0, 20.0))
    history.record(Outage(25.0, 20.0))
    assert len(history) == 10
    history.record(Outage(3.0, 1.0))
    assert len(history) == 13 and history.regime_changes == 0


# -- through the manager ------------------------------------------------------------------------


def run_outages(policy: RecoveryPolicy, outages: int, down_for: float) -> list[list[float]]:
    """Outages of ``down_for`` seconds through a real Manager; the waits of each cycle."""
    clock = FakeClock()
    peer = OutagePeer(clock)
    woken = threading.Event()
    manager = dwcp.Manager(
        peer, health_interval=3600.0, recovery={"transport": policy}, clock=clock
    )
    manager.add_listener(lambda event: woken.set())
    schedules: list[list[float]] = []
    manager.start()
    try:
        for _ in range(outages):
            schedules.append(run_outage(manager, clock, peer, down_for, woken))
    finally:
        manager.stop()
    return schedules


def test_manager_default_schedule_stays_1_2_4() -> None:
    schedules = run_outages(RecoveryPolicy(), 8, down_for=6.0)
    assert schedules == [[1.0, 2.0, 4.0]] * 8


@pytest.mark.usefixtures("guard_allows")
def test_manager_learns_to_wait_for_a_slow_peer() -> None:
    schedules = run_outages(RecoveryPolicy(predictive=True), 40, down_for=6.0)
    assert schedules[:MIN_SAMPLES] == [[1.0, 2.0, 4.0]] * MIN_SAMPLES
    # An attempt is skipped once the outages rule it out with some confidence.
    learned = [s for s in schedules[MIN_SAMPLES:] if s != [1.0, 2.0, 4.0]]
    assert learned, schedules
    for waits in learned:
        # The attempts at 1 s and 3 s that always failed are skipped (an exploring cycle
        # keeps the first); the peer is found at 6 s or later, by the configured 7 s.
        moments = cumulative(waits)
        assert 6.0 <= moments[-1] <= 7.0
        assert 3.0 not in moments and (moments[0] > 3.0 or moments[0] == 1.0)


@pytest.mark.usefixtures("guard_allows")
def test_a_learned_cycle_may_reach_a_later_cycles_attempt() -> None:
    # Always back between the next cycle's first attempt (9 s) and its second (11 s): the
    # configured cycle's attempts at 1, 3 and 7 s never succeeded, nor did the one at 9 s.
    policy = RecoveryPolicy(predictive=True, stable_period=10.0)
    supervisor = RestartSupervisor(policy)
    for n in range(30):
        learn(supervisor, 1000.0 * n, [1.0, 3.0, 7.0, 9.0], 11.0)
    start = 90_000.0
    supervisor.admit(start)
    waits = supervisor.cycle_schedule(start, start)
    assert waits is not None and len(waits) <= policy.attempts
    moments = cumulative(waits)
    # The attempts at 1 s and 3 s are skipped, and the cycle goes on to the 11 s moment,
    # where the next cycle would have found the peer.
    assert moments[0] > 3.0 and 11.0 in moments


def test_a_check_that_finds_it_healthy_after_a_give_up_is_learned() -> None:
    supervisor = RestartSupervisor(RecoveryPolicy(predictive=True, attempts=1))
    supervisor.admit(0.0)
    supervisor.attempt_started(1.0)
    supervisor.attempt_failed(1.05)  # the cycle gave up
    supervisor.healed(12.0, down_since=0.0)  # a later pass found it healthy
    assert supervisor.history is not None
    assert supervisor.history.outages == (Outage(12.0, 1.0, None, 12.0),)
    # The next outage starts afresh: no attempt of the old one counts.
    supervisor.admit(100.0)
    supervisor.attempt_started(101.0)
    supervisor.recovered(101.0, down_since=100.0, attempt=1)
    assert supervisor.history.outages[-1] == Outage(1.0, 0.0, 1, 1.0)


def test_a_healed_component_does_not_reset_adaptive_backoff() -> None:
    # Only a verified cycle counts as a recovery for restart intensity and adaptive backoff.
    policy = RecoveryPolicy(adaptive_backoff=True, stable_period=30.0)
    supervisor = RestartSupervisor(policy)
    supervisor.admit(0.0)
    supervisor.healed(5.0, down_since=0.0)
    supervisor.admit(10.0)
    assert supervisor.cycle_policy() == policy


# -- the learned schedule's choice --------------------------------------------------------------


def test_a_bimodal_history_gets_one_attempt_just_after_each_mode() -> None:
    # Half the outages back between 1.5 s and 2 s, half between 10 s and 11 s.
    history = RecoveryHistory()
    for n in range(40):
        history.record(Outage(2.0, 1.5, 2, 2.0) if n % 2 else Outage(11.0, 10.0, 4, 11.0))
    waits = history.schedule([1.0, 2.0, 4.0], 0.0, 60.0)
    assert waits is not None
    moments = cumulative(waits)
    assert moments[0] == pytest.approx(2.0) and 11.0 in [round(m, 6) for m in moments]
    assert len(moments) <= 3


def test_a_learned_schedule_is_not_expected_to_delay_more_than_the_configured_one() -> None:
    # Back between 3 s and 7 s: the configured schedule finds it at 7 s, 2 s late on average.
    history = RecoveryHistory()
    for _ in range(40):
        history.record(Outage(7.0, 3.0, 3, 7.0))
    waits = history.schedule([1.0, 2.0, 4.0], 0.0, 60.0)
    assert waits is not None
    moments = cumulative(waits)

    # Each outage evenly within (3, 7]: the expected delay of the learned moments.
    def delay(at: list[float]) -> float:
        samples = [3.0 + 4.0 * (k + 0.5) / 400 for k in range(400)]
        return sum(min(m for m in at if m >= r) - r for r in samples) / len(samples)

    assert delay(moments) <= delay([1.0, 3.0, 7.0]) + 0.05
    assert moments[0] > 3.0  # and the attempts at 1 s and 3 s are gone


def test_a_later_cycle_is_learned_from_the_outages_that_lasted_as_long() -> None:
    # A cycle that starts 8 s into an outage (after one gave up) only counts outages that
    # lasted past 8 s: those were all back between 9 s and 11 s.
    history = RecoveryHistory()
    for n in range(40):
        history.record(Outage(2.0, 1.0, 2, 2.0) if n % 2 else Outage(11.0, 9.0, 5, 11.0))
    waits = history.schedule([1.0, 2.0, 4.0], 8.0, 60.0, new_outage=False)
    assert waits is not None
    moments = [8.0 + m for m in cumulative(waits)]
    assert moments[0] > 9.0 and 11.0 in [round(m, 6) for m in moments]


def test_an_exploring_cycle_makes_the_configured_first_attempt() -> None:
    history = RecoveryHistory()
    for _ in range(40):
        history.record(Outage(7.0, 3.0, 3, 7.0))
    seen = [history.schedule([1.0, 2.0, 4.0], 0.0, 60.0) for _ in range(EXPLORE_EVERY)]
    assert all(w is not None for w in seen)
    firsts = [w[0] for w in seen if w is not None]
    assert firsts.count(1.0) == 1 and firsts[-1] == 1.0


# -- the held-out check -------------------------------------------------------------------------


def plan(exploring: bool = False) -> _Plan:
    """The decision for a 1 s/2 s/4 s cycle from an outage's first check, attempts instant."""
    return _Plan([1.0, 2.0, 4.0], [1.0, 3.0, 7.0], 0.0, 60.0, 0.0, 1.0, exploring)


def test_folds_split_alternating_outages_evenly() -> None:
    folds = [_fold(i) for i in range(100)]
    assert set(folds) == {0, 1} and 45 <= sum(folds) <= 55
    # Every other outage (one of two alternating patterns) lands in both folds.
    assert 20 <= sum(folds[::2]) <= 30


def test_a_consistent_history_passes_the_held_out_check() -> None:
    outages = [Outage(7.0, 3.0, 3, 7.0 if n % 3 else 6.0) for n in range(30)]
    decision = plan()
    assert decision.choose(outages) is not None
    assert decision.validated(outages)


def test_a_choice_the_other_fold_contradicts_is_refused() -> None:
    # The outages of one fold were all back between 3 s and 7 s, the other fold's by 1 s:
    # each fold's choice is wrong for the other, and the learned schedule is not adopted.
    outages = [
        Outage(7.0, 3.0, 3, 7.0) if _fold(i) == 0 else Outage(1.0, 0.0, 1, 1.0) for i in range(30)
    ]
    decision = plan()
    decision.choose(outages)
    assert not decision.validated(outages)


def test_the_late_share_counts_the_delays_over_the_bound() -> None:
    # Two pieces: half found 0-2 s after the return, half exactly 4 s after.
    pieces = [(0.5, 0.0, 1.0, 0.0, 2.0), (0.5, 1.0, 4.0, 4.0, 4.0)]
    assert _late(pieces, 1.0) == pytest.approx(0.75)
    assert _late(pieces, 3.0) == pytest.approx(0.5)
    assert _late(pieces, 4.0) == pytest.approx(0.0)


# -- the search's cost and where it runs (issue 21, point 10) ----------------------------------


def _random_history(seed: int, count: int = 100) -> RecoveryHistory:
    import random

    rng = random.Random(seed)
    history = RecoveryHistory()
    for _ in range(count):
        back = rng.uniform(0.5, 20.0)
        history.record(Outage(back, max(back - rng.uniform(0.1, 2.0), 0.0), 2, back))
    return history


def test_the_search_grows_polynomially_with_attempts() -> None:
    import time

    from dwcp._prediction import LABELS, _Model

    history = _random_history(1)
    configured = [min(2.0**i, 60.0) for i in range(10)]
    starts = list(itertools.accumulate(configured))
    evaluations = {}
    for attempts in (5, 10):
        model = _Model.build(history.outages, configured, starts, 0.0, pause=1.0, duration=0.0)
        assert model is not None
        n = len(model.points)
        model.median_delay([model.index(t) for t in starts])
        model.best(attempts, starts[4], 60.0, 0.0, max_delay=math.inf, max_late=math.inf)
        # At most attempts x candidates^2 x LABELS partial schedules extended.
        assert model.evaluations <= attempts * n * n * LABELS
        evaluations[attempts] = model.evaluations
    # Twice the attempts over the same candidates, about twice the work (an exhaustive
    # search grows by a factor of the candidates per attempt).
    assert evaluations[10] <= 3 * evaluations[5]
    # The whole decision at attempts=10 over 100 outages, with its out-of-sample check: took
    # minutes before (20 s at 8); a generous bound for a loaded machine.
    began = time.monotonic()
    history.schedule(configured, 0.0, 60.0, new_outage=False)
    assert time.monotonic() - began < 10.0


@pytest.mark.usefixtures("guard_allows")
def test_the_learned_schedule_is_searched_off_the_managers_lock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dwcp._prediction as prediction

    clock = FakeClock()
    peer = OutagePeer(clock)
    woken = threading.Event()
    manager = dwcp.Manager(
        peer,
        health_interval=3600.0,
        recovery={"transport": RecoveryPolicy(predictive=True)},
        clock=clock,
    )
    manager.add_listener(lambda event: woken.set())
    manager.start()
    searching, release = threading.Event(), threading.Event()
    real = prediction._Plan.choose

    def slow_choose(self: _Plan, *args: object, **kwargs: object) -> list[float] | None:
        # Stands for a long search: blocks until the test has read the manager's health.
        searching.set()
        release.wait(30)
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    try:
        for _ in range(MIN_SAMPLES):  # enough history for a learned schedule
            run_outage(manager, clock, peer, 6.0, woken)
        monkeypatch.setattr(prediction._Plan, "choose", slow_choose)
        clock.advance(100.0)
        peer.down_at, peer.up_at = clock.now(), clock.now() + 6.0
        pass_thread = threading.Thread(target=manager.check_component_health)
        pass_thread.start()
        assert searching.wait(10), "no schedule was searched"
        answered = threading.Event()

        def read_health() -> None:
            manager.health()
            answered.set()

        reader = threading.Thread(target=read_health)
        reader.start()
        # health() does not wait for the search (it waited under the lock before).
        assert answered.wait(10), "health() waited for the schedule search"
        assert manager.health().components["transport"].status == "recovering"
    finally:
        release.set()
        pass_thread.join(30)
        reader.join(30)
        manager.stop()
    assert not pass_thread.is_alive()
