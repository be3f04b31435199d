"""Recovery schedules over outage traces, on a fake clock (no real waiting).

``python3 -m benchmarks.traces [--outages N] [--seed S] [--interval SECONDS] [--plot DIR]
[--engine manager|supervisor]``

Each trace is a sequence of outages: the peer goes down, stays down for a drawn time, comes
back.  With the default ``manager`` engine a real ``Manager`` on ``dwcp.testing.FakeClock``
recovers it: each monitoring pass is run with ``check_component_health()`` every
``interval`` seconds of fake time, as the monitor thread would, and its recovery thread runs
the cycles (``run_recovery``, tenacity driving the attempts).  The ``supervisor`` engine runs
``RestartSupervisor`` and ``run_recovery`` under a simulated monitor that does the same:
starts a cycle on a failed check, another after a cycle that gave up, and marks the
component healthy when a check passes between cycles.  Three policies are compared: the
fixed 1 s/2 s/4 s schedule, ``adaptive_backoff=True``, and ``predictive=True``.  Figures per
outage: failed attempts, the time from the peer's return to the verified recovery (median,
p95), outages in which a cycle gave up.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dwcp import Event, Manager, RecoveryFailed, RecoverySucceeded
from dwcp._recovery import RecoveryPolicy, RestartSupervisor, run_recovery
from dwcp.testing import FakeClock

#: Seconds a restart (close + start) and a health check take on the simulated clock.
ACTION_SECONDS = 0.05
CHECK_SECONDS = 0.01


class SimClock:
    """A clock that only moves when something sleeps or acts."""

    def __init__(self) -> None:
        self.now = 0.0

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> bool:
        self.now += seconds
        return True


@dataclass
class OutageResult:
    duration: float
    failed_attempts: int
    delay: float  # from the peer's return to the verified recovery
    gave_up: bool
    schedules: list[tuple[float, ...]] = field(default_factory=list)  # attempt times, per cycle


@dataclass
class Summary:
    failed_per_outage: float
    median_delay: float
    p95_delay: float
    given_up: int
    outages: int
    unnoticed: int


def simulate(
    policy: RecoveryPolicy,
    durations: Sequence[float],
    gaps: Sequence[float],
    interval: float,
    *,
    starts: Sequence[float] | None = None,
) -> tuple[list[OutageResult], int]:
    """Run every outage through one supervisor; returns the results and the unnoticed count.

    With ``starts``, outage i begins at ``starts[i]`` (or when the one before has ended, if
    later) instead of ``gaps[i]`` after it: every policy then meets each outage at the same
    phase of the monitor's passes, so two policies' figures differ only by their schedules.
    """
    clock = SimClock()
    supervisor = RestartSupervisor(policy)
    results: list[OutageResult] = []
    unnoticed = 0
    for index, (duration, gap) in enumerate(zip(durations, gaps)):
        if starts is None:
            clock.advance(gap)
        else:
            clock.now = max(clock.now, starts[index])
        down_at = clock.now
        up_at = down_at + duration
        # The monitor passes on a fixed grid, as the Manager's loop does.
        detected = _next_pass(down_at, interval)
        if detected >= up_at:
            unnoticed += 1  # back before any check saw it down
            clock.now = up_at
            continue
        clock.now = detected
        result = OutageResult(duration, 0, 0.0, False)

        def action(up_at: float = up_at) -> None:
            clock.advance(ACTION_SECONDS)
            if clock.now < up_at:
                raise ConnectionRefusedError("peer is down")

        def verify(up_at: float = up_at) -> None:
            clock.advance(CHECK_SECONDS)
            if clock.now < up_at:
                raise RuntimeError("health check after restart failed")

        def starting(_attempt: int, backoff: float) -> None:
            supervisor.attempt_started(clock.now + backoff)

        def failed(_attempt: int, _exc: BaseException, result: OutageResult = result) -> None:
            result.failed_attempts += 1
            supervisor.attempt_failed(clock.now)

        while True:
            clock.advance(CHECK_SECONDS)  # the monitor's check
            if clock.now >= up_at:
                # A check passed between cycles: recovered without an attempt.
                supervisor.recovered(clock.now, down_since=detected)
                break
            if supervisor.admit(clock.now) != "run":
                raise RuntimeError("benchmark policies never escalate")
            waits = supervisor.cycle_schedule(clock.now, detected)
            cycle = supervisor.cycle_policy()
            start = clock.now
            planned = waits or tuple(cycle.backoff(i) for i in range(cycle.attempts))
            result.schedules.append(_cumulative(start - detected, planned))
            outcome = run_recovery(
                action,
                verify,
                cycle,
                sleep=clock.sleep,
                on_attempt=starting,
                on_failure=failed,
                waits=waits,
            )
            if outcome.recovered:
                supervisor.recovered(clock.now, down_since=detected, attempt=outcome.attempts)
                break
            result.gave_up = True
            clock.now = _next_pass(clock.now, interval)
        result.delay = clock.now - up_at
        results.append(result)
    return results, unnoticed


class TracePeer:
    """A transport whose peer is down from ``down_at`` to ``up_at`` on the fake clock.

    A start (the restart of a recovery attempt) takes ``ACTION_SECONDS`` and a health check
    ``CHECK_SECONDS`` of fake time; both fail while the peer is down.
    """

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.down_at = math.inf
        self.up_at = math.inf

    def _down(self) -> bool:
        return self.down_at <= self.clock.now() < self.up_at

    def start(self) -> None:
        self.clock.advance(ACTION_SECONDS)
        if self._down():
            raise ConnectionRefusedError("peer is down")

    def close(self) -> None:
        pass

    def send(self, data: bytes | bytearray | memoryview) -> None:
        if self._down():
            raise ConnectionResetError("peer is down")

    def health_check(self) -> None:
        self.clock.advance(CHECK_SECONDS)
        if self._down():
            raise ConnectionRefusedError("peer is down")


def simulate_manager(
    policy: RecoveryPolicy,
    durations: Sequence[float],
    gaps: Sequence[float],
    interval: float,
) -> tuple[list[OutageResult], int]:
    """The same outages through a real ``Manager`` on a ``FakeClock``.

    The manager's own monitor thread is idle (an hour's interval); the benchmark runs each
    pass with ``check_component_health()`` at the moment the monitor would, and waits for the
    recovery thread's cycle to end on the manager's events.
    """
    clock = FakeClock()
    peer = TracePeer(clock)
    woken = threading.Event()

    def listen(event: Event) -> None:
        if isinstance(event, (RecoverySucceeded, RecoveryFailed)):
            woken.set()

    manager = Manager(
        peer,
        health_interval=3600.0,
        recovery={"transport": policy},
        clock=clock,
        breaker_name="traces",
    )
    manager.add_listener(listen)
    results: list[OutageResult] = []
    unnoticed = 0
    manager.start()
    try:
        for duration, gap in zip(durations, gaps):
            clock.advance(gap)
            peer.down_at = clock.now()
            peer.up_at = peer.down_at + duration
            detected = _next_pass(peer.down_at, interval)
            if detected >= peer.up_at:
                unnoticed += 1
                clock.advance(peer.up_at - clock.now())
                continue
            clock.advance(detected - clock.now())
            result = OutageResult(duration, 0, 0.0, False)
            before = manager.metrics()
            while True:
                start = clock.now()
                slept = len(clock.slept)
                manager.check_component_health()
                # The cycle runs on the manager's recovery thread; events only wake us, the
                # status decides (an event may be late).
                deadline = time.monotonic() + 30
                while manager.health().components["transport"].status == "recovering":
                    if time.monotonic() > deadline:
                        raise RuntimeError("recovery cycle did not end")
                    woken.wait(0.05)
                    woken.clear()
                if len(clock.slept) > slept:
                    result.schedules.append(_cumulative(start - detected, clock.slept[slept:]))
                if manager.health().components["transport"].status == "healthy":
                    break
                result.gave_up = True
                clock.advance(_next_pass(clock.now(), interval) - clock.now())
            after = manager.metrics()
            result.failed_attempts = (after.recovery_attempts - before.recovery_attempts) - (
                after.recoveries_succeeded - before.recoveries_succeeded
            )
            result.delay = clock.now() - peer.up_at
            results.append(result)
    finally:
        manager.stop()
    return results, unnoticed


def _next_pass(now: float, interval: float) -> float:
    return (math.floor(now / interval) + 1) * interval


def _cumulative(start: float, waits: Sequence[float]) -> tuple[float, ...]:
    out, at = [], start
    for wait in waits:
        at += wait
        out.append(at)
    return tuple(out)


def summarize(results: list[OutageResult], unnoticed: int) -> Summary:
    delays = sorted(r.delay for r in results)
    return Summary(
        failed_per_outage=statistics.fmean(r.failed_attempts for r in results),
        median_delay=statistics.median(delays),
        p95_delay=delays[min(len(delays) - 1, math.ceil(0.95 * len(delays)) - 1)],
        given_up=sum(r.gave_up for r in results),
        outages=len(results),
        unnoticed=unnoticed,
    )


# -- traces ------------------------------------------------------------------------------------


def _constant(rng: random.Random, n: int) -> list[float]:
    return [rng.uniform(5.0, 7.0) for _ in range(n)]


def _lognormal(rng: random.Random, n: int) -> list[float]:
    return [min(rng.lognormvariate(math.log(4.0), 0.4), 40.0) for _ in range(n)]


def _bimodal(rng: random.Random, n: int) -> list[float]:
    return [
        max(0.2, rng.gauss(2.0, 0.3)) if rng.random() < 0.5 else max(0.2, rng.gauss(11.0, 0.8))
        for _ in range(n)
    ]


def _uniform(rng: random.Random, n: int) -> list[float]:
    return [rng.uniform(0.5, 20.0) for _ in range(n)]


def _regime(rng: random.Random, n: int) -> list[float]:
    half = n // 2
    return [rng.uniform(1.5, 2.5) for _ in range(half)] + [
        rng.uniform(9.0, 11.0) for _ in range(n - half)
    ]


TRACES: dict[str, tuple[Callable[[random.Random, int], list[float]], bool]] = {
    # name: (generator, learnable)
    "constant 5-7s": (_constant, True),
    "log-normal": (_lognormal, True),
    "bimodal 2s/11s": (_bimodal, True),
    "uniform 0.5-20s": (_uniform, False),
    "regime 2s->10s": (_regime, True),
}

POLICIES: dict[str, RecoveryPolicy] = {
    "fixed": RecoveryPolicy(),
    "adaptive": RecoveryPolicy(adaptive_backoff=True),
    "predictive": RecoveryPolicy(predictive=True),
}


ENGINES = {"manager": simulate_manager, "supervisor": simulate}


Raw = dict[str, dict[str, list[OutageResult]]]


def run(
    outages: int, seed: int, interval: float, engine: str = "manager"
) -> tuple[dict[str, dict[str, Summary]], Raw]:
    """Every trace through every policy; the summaries and the per-outage results."""
    table: dict[str, dict[str, Summary]] = {}
    raw: Raw = {}
    for index, (name, (generate, _)) in enumerate(TRACES.items()):
        rng = random.Random(seed + index)
        durations = generate(rng, outages)
        # Healthy stretches between outages; some shorter than the 60 s stable period, so
        # the adaptive policy sees relapses.
        gaps = [rng.uniform(20.0, 200.0) for _ in range(outages)]
        table[name] = {}
        raw[name] = {}
        for label, policy in POLICIES.items():
            results, unnoticed = ENGINES[engine](policy, durations, gaps, interval)
            table[name][label] = summarize(results, unnoticed)
            raw[name][label] = results
    return table, raw


def format_report(table: dict[str, dict[str, Summary]]) -> str:
    header = (
        f"{'trace':<17} {'policy':<11} {'failed/outage':>13} {'median s':>9} {'p95 s':>7} "
        f"{'given up':>9} {'vs fixed: failed':>17} {'median':>8}"
    )
    lines = [header]
    verdicts: list[str] = []
    for name, row in table.items():
        fixed = row["fixed"]
        for label, s in row.items():
            failed_ratio = _change(s.failed_per_outage, fixed.failed_per_outage)
            median_ratio = _change(s.median_delay, fixed.median_delay)
            lines.append(
                f"{name:<17} {label:<11} {s.failed_per_outage:>13.2f} {s.median_delay:>9.2f} "
                f"{s.p95_delay:>7.2f} {s.given_up:>5}/{s.outages:<3} {failed_ratio:>17} "
                f"{median_ratio:>8}"
            )
        p = row["predictive"]
        learnable = TRACES[name][1]
        if learnable:
            ok = (
                p.failed_per_outage <= 0.6 * fixed.failed_per_outage
                and p.median_delay <= fixed.median_delay + 1e-9
            )
            target = ">=40% fewer failed attempts, median no worse"
        else:
            ok = (
                p.failed_per_outage <= 1.1 * fixed.failed_per_outage + 1e-9
                and p.median_delay <= 1.1 * fixed.median_delay + 1e-9
            )
            target = "at most 10% worse on both"
        verdicts.append(f"{name:<17} predictive target ({target}): {'met' if ok else 'MISSED'}")
    return "\n".join(lines + [""] + verdicts)


def _change(value: float, base: float) -> str:
    if base == 0:
        return "=" if value == 0 else "+inf"
    return f"{(value - base) / base * 100:+.0f}%"


def plot(directory: Path, raw: Raw) -> list[Path]:
    """PNG plots of the traces and the schedules used, when matplotlib is importable."""
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, by_policy in raw.items():
        fig, axes = plt.subplots(len(by_policy), 1, figsize=(9, 7), sharex=True)
        for ax, (label, results) in zip(axes, by_policy.items()):
            xs = range(len(results))
            ax.plot(xs, [r.duration for r in results], "k.", markersize=3, label="peer down for")
            for i, r in enumerate(results):
                for cycle, moments in enumerate(r.schedules):
                    color = "tab:blue" if cycle == 0 else "tab:orange"
                    ax.plot([i] * len(moments), moments, "_", color=color, markersize=5)
            ax.plot([], [], "_", color="tab:blue", markersize=8, label="attempts, first cycle")
            ax.plot([], [], "_", color="tab:orange", markersize=8, label="attempts, later cycles")
            ax.set_ylabel(f"{label}\nseconds")
            ax.set_ylim(0, 25)
        axes[0].set_title(
            f"{name}: time down (dots, from the failure) and attempts (ticks, from the first "
            "failed check)",
            fontsize=9,
        )
        axes[0].legend(loc="upper right", fontsize=7, ncol=3)
        axes[-1].set_xlabel("outage")
        path = directory / f"trace-{name.split()[0]}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.traces", description=__doc__)
    parser.add_argument("--outages", type=int, default=200, help="outages per trace")
    parser.add_argument("--seed", type=int, default=13, help="seed of every trace's RNG")
    parser.add_argument("--interval", type=float, default=1.0, help="health interval, seconds")
    parser.add_argument("--plot", default="benchmarks/plots", help="where PNG plots go")
    parser.add_argument(
        "--engine",
        choices=sorted(ENGINES),
        default="manager",
        help="manager: a real Manager on a FakeClock; supervisor: RestartSupervisor and "
        "run_recovery under a simulated monitor (faster, same logic)",
    )
    args = parser.parse_args(argv)
    table, raw = run(args.outages, args.seed, args.interval, args.engine)
    print(
        f"{args.outages} outages per trace, seed {args.seed}, health interval {args.interval:g}s, "
        f"restart {ACTION_SECONDS:g}s, check {CHECK_SECONDS:g}s, engine {args.engine} "
        "(fake clock, no real waiting)"
    )
    print(format_report(table))
    written = plot(Path(args.plot), raw)
    print("plots: " + (", ".join(map(str, written)) if written else "skipped (no matplotlib)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
