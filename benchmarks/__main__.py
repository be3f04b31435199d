"""``python -m benchmarks [--quick] [--json PATH] [--plot PATH] [--only N ...]``."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

from benchmarks import e2e, scenarios
from benchmarks.harness import Result, format_table

SCENARIOS = {
    "1": scenarios.send_overhead,
    "2": scenarios.concurrency,
    "3": scenarios.multistream,
    "4": scenarios.shutdown,
    "5": scenarios.time_to_recover,
    "6": scenarios.scale,
    "7": scenarios.soak,
    "8": e2e.end_to_end,
    "9": scenarios.breaker_paths,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short run (about a minute)")
    parser.add_argument("--json", default="benchmarks/results.json", help="where to write results")
    parser.add_argument(
        "--plot", default="benchmarks/throughput.png", help="PNG of throughput by message size"
    )
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), help="scenario numbers")
    args = parser.parse_args(argv)
    results: list[Result] = []
    began = time.perf_counter()
    for key in args.only or sorted(SCENARIOS):
        print(f"running scenario {key} ...", file=sys.stderr, flush=True)
        results.extend(SCENARIOS[key](args.quick))
    print(format_table(results))
    for r in results:
        if r.notes:
            print(f"  {r.scenario}: {r.notes}")
    machine = (
        f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}"
    )
    print(f"machine: {machine}; took {time.perf_counter() - began:.0f} s")
    with open(args.json, "w") as out:
        json.dump({"machine": machine, "results": [r.as_dict() for r in results]}, out, indent=2)
    _plot(results, args.plot)
    return 0 if all(r.met for r in results) else 1


def _plot(results: list[Result], path: str) -> None:
    """Throughput against message size for scenario 1, when matplotlib is installed."""
    rows = [r for r in results if "size" in r.extra]
    if not rows:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot written)")
        return
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for checksum, style in ((True, "o-"), (False, "s--")):
        points = sorted((r.extra["size"], r.ours) for r in rows if r.extra["checksum"] is checksum)
        label = f"Manager, 1 stream, checksum {'on' if checksum else 'off'}"
        axes.plot(*zip(*points), style, label=label)
    raw = sorted({r.extra["size"]: r.reference for r in rows}.items())
    axes.plot(*zip(*raw), "k^:", label="raw socket.sendall")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("message size (bytes)")
    axes.set_ylabel("throughput (MB/s, median)")
    axes.set_title("dwcp send path vs raw sendall, loopback, side by side")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"plot written to {path}")


if __name__ == "__main__":
    raise SystemExit(main())
