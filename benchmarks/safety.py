"""The learned schedule's safety rule over generated outage traces no model can learn.

``python3 -m benchmarks.safety [--seeds N] [--outages N] [--interval SECONDS]``

The rule (README, "Suspicion and learned recovery timing"): ``predictive=True`` is never
more than about 10 % worse than the fixed schedule on median delay, on any trace.  Each
shape below draws outage lengths from a pattern a return-time estimate cannot exploit
(random ranges, heavy tails, blocks that switch between levels, alternation, drift,
mixtures); every seed draws new parameters.  Both policies run through the ``supervisor``
engine of ``benchmarks.traces`` with each outage starting at the same moment for both, so
that the two meet it at the same phase of the monitor's passes.  ``tests/unit/
test_prediction_safety.py`` runs a few seeds of each shape; this sweep runs many.
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Callable

from benchmarks.traces import Summary, simulate, summarize
from dwcp._recovery import RecoveryPolicy

__all__ = ["SHAPES", "compare", "main"]

# Outage i starts at i * SPACING plus a drawn phase: longer than any outage's recovery.
SPACING = 1000.0


def _uniform(rng: random.Random, n: int) -> list[float]:
    low = rng.uniform(0.2, 5.0)
    high = low + rng.uniform(2.0, 30.0)
    return [rng.uniform(low, high) for _ in range(n)]


def _exponential(rng: random.Random, n: int) -> list[float]:
    mean = rng.uniform(1.0, 10.0)
    return [min(rng.expovariate(1 / mean), 60.0) for _ in range(n)]


def _pareto(rng: random.Random, n: int) -> list[float]:
    scale = rng.uniform(0.5, 3.0)
    return [min(scale * rng.paretovariate(1.2), 60.0) for _ in range(n)]


def _blocks(rng: random.Random, n: int) -> list[float]:
    # Switches between a few outage levels in blocks of 3 to 12 (the adversarial case).
    levels = [rng.uniform(0.5, 25.0) for _ in range(rng.randint(2, 4))]
    out: list[float] = []
    while len(out) < n:
        level = rng.choice(levels)
        out += [max(0.2, rng.gauss(level, level * 0.05)) for _ in range(rng.randint(3, 12))]
    return out[:n]


def _alternating(rng: random.Random, n: int) -> list[float]:
    short, long = rng.uniform(0.5, 4.0), rng.uniform(6.0, 25.0)
    return [short if i % 2 else long for i in range(n)]


def _walk(rng: random.Random, n: int) -> list[float]:
    level, out = rng.uniform(2.0, 10.0), []
    for _ in range(n):
        level = min(max(level * math.exp(rng.gauss(0.0, 0.35)), 0.3), 40.0)
        out.append(level)
    return out


def _mixture(rng: random.Random, n: int) -> list[float]:
    levels = [rng.uniform(0.5, 25.0) for _ in range(rng.randint(3, 6))]
    return [max(0.2, rng.gauss(rng.choice(levels), 0.3)) for _ in range(n)]


SHAPES: dict[str, Callable[[random.Random, int], list[float]]] = {
    "uniform": _uniform,
    "exponential": _exponential,
    "pareto": _pareto,
    "blocks": _blocks,
    "alternating": _alternating,
    "walk": _walk,
    "mixture": _mixture,
}


def compare(shape: str, seed: int, outages: int, interval: float = 10.0) -> tuple[Summary, Summary]:
    """The fixed and the predictive policy's figures on one generated trace."""
    rng = random.Random(seed * 1000 + sum(map(ord, shape)))
    durations = SHAPES[shape](rng, outages)
    starts = [i * SPACING + rng.uniform(0.0, interval) for i in range(outages)]
    gaps = [0.0] * outages
    fixed = summarize(*simulate(RecoveryPolicy(), durations, gaps, interval, starts=starts))
    learned = summarize(
        *simulate(RecoveryPolicy(predictive=True), durations, gaps, interval, starts=starts)
    )
    return fixed, learned


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--outages", type=int, default=60)
    parser.add_argument("--interval", type=float, default=10.0)
    args = parser.parse_args(argv)
    rows = []
    for shape in SHAPES:
        for seed in range(args.seeds):
            fixed, learned = compare(shape, seed, args.outages, args.interval)
            ratio = learned.median_delay / fixed.median_delay if fixed.median_delay else 1.0
            rows.append((ratio, shape, seed, fixed, learned))
    rows.sort(key=lambda row: row[0], reverse=True)
    print(f"{len(rows)} traces of {args.outages} outages; worst median-delay ratios:")
    print("shape        seed  median fixed  median learned  ratio  failed fixed  failed learned")
    for ratio, shape, seed, fixed, learned in rows[:15]:
        print(
            f"{shape:12} {seed:4}  {fixed.median_delay:12.2f}  {learned.median_delay:14.2f}"
            f"  {ratio:5.2f}  {fixed.failed_per_outage:12.2f}  {learned.failed_per_outage:14.2f}"
        )
    over = sum(1 for row in rows if row[0] > 1.10)
    print(f"over 1.10: {over} of {len(rows)}")
    return 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(main())
