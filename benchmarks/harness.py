"""Side-by-side measurement: alternate ours and the reference after a warm-up, report medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Result:
    """One scenario's outcome: medians of ours and the reference, their ratio, and the target."""

    scenario: str
    metric: str
    ours: float
    reference: float | None
    target: str
    met: bool
    unit: str = ""
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: Median of the per-round ratios when measured in alternating pairs; each pair ran
    #: back to back, so this ratio is the one least moved by the machine's drift.
    paired_ratio: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.paired_ratio is not None:
            return self.paired_ratio
        if self.reference in (None, 0):
            return None
        return self.ours / self.reference  # type: ignore[operator]

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = self.ratio
        return data


def paired_ratio(ours: list[float], reference: list[float]) -> float:
    """Median of ours/reference over samples taken back to back."""
    return statistics.median(o / r for o, r in zip(ours, reference))


def alternate(
    ours: Callable[[], float],
    reference: Callable[[], float],
    *,
    rounds: int,
    warmup: int = 1,
) -> tuple[float, float, list[float], list[float]]:
    """Run ``reference`` and ``ours`` alternately; each returns one measurement (higher = better
    for throughputs).  Returns both medians and all samples.  Alternating spreads the machine's
    noise over both sides instead of letting it land on one."""
    for _ in range(warmup):
        reference()
        ours()
    ours_samples: list[float] = []
    reference_samples: list[float] = []
    for i in range(rounds):
        # Swap who goes first each round so neither side always runs on a warmer cache.
        if i % 2:
            ours_samples.append(ours())
            reference_samples.append(reference())
        else:
            reference_samples.append(reference())
            ours_samples.append(ours())
    return (
        statistics.median(ours_samples),
        statistics.median(reference_samples),
        ours_samples,
        reference_samples,
    )


def throughput(run: Callable[[], int], *, min_time: float = 0.0) -> float:
    """Call ``run`` (which returns how many operations it did) and return operations per second."""
    began = time.perf_counter()
    done = run()
    elapsed = time.perf_counter() - began
    if elapsed < min_time:
        raise RuntimeError("measurement too short to be meaningful")
    return done / elapsed


def percentile(samples: list[float], fraction: float) -> float:
    """The ``fraction`` quantile by nearest rank (p99 = 0.99)."""
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


def format_table(results: list[Result]) -> str:
    """A plain-text table, one row a scenario."""
    header = ("scenario", "metric", "ours", "reference", "ratio", "target", "met")
    rows = [header]
    for r in results:
        rows.append(
            (
                r.scenario,
                r.metric,
                f"{r.ours:,.4g}{r.unit}",
                "-" if r.reference is None else f"{r.reference:,.4g}{r.unit}",
                "-" if r.ratio is None else f"{r.ratio:.2f}x",
                r.target,
                "yes" if r.met else "NO",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
