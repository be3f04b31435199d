"""Work per send, counted: the send path's cost without the machine's noise.

``python3 -m benchmarks.instructions [--count N] [--size BYTES] [--opcodes-only]``

First, exactly: the Python opcodes the calling thread executes per send (``sys.settrace``
with ``f_trace_opcodes``), by function, for the transport and for the manager over it.
This count does not depend on timing at all, so two trees compare to the opcode.

Wall-clock throughput on a shared two-core machine swings by 2x from one minute to the next,
which hides a change of a few per cent in the send path.  This counts the CPU instructions
the sending process executes (every thread: the caller, the stream writers) under
``valgrind --tool=callgrind``, once with no sends and once with ``--count`` sends, and divides
the difference by the count.  Four paths, side by side in one run, to the same draining sink
process (``benchmarks/sink.py``):

- ``raw``: ``socket.sendall`` of the payload, what a hand-written protocol starts at (its
  cost is mostly the kernel's, which is not counted);
- ``transport``: ``MultiStreamTCPTransport.send`` (one stream), checksum on and off;
- ``manager``: ``Manager.send_with_circuit_breaker`` over that transport;
- ``no-op``: the manager over a transport whose ``send`` does nothing: the guard's own cost.

Counts still move by a few per cent between runs: the writer threads' batching and the
background threads' wake-ups depend on timing.  Compare two trees by alternating runs.
Needs valgrind (``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
from typing import Any

_CHILD = "--child"
_OPCODES = "--opcodes"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__)
    parser.add_argument("--count", type=int, default=5_000, help="sends per measured run")
    parser.add_argument("--size", type=int, default=1024, help="payload bytes")
    parser.add_argument("--opcodes-only", action="store_true", help="skip the valgrind counts")
    args = parser.parse_args(argv)
    for mode in ("transport", "manager"):
        command = [sys.executable, "-m", "benchmarks.instructions", _OPCODES, mode, str(args.size)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"opcode count of {mode} failed: {done.stderr[-2000:]}")
        print(done.stdout.strip())
    if args.opcodes_only:
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed; nothing measured (apt-get install valgrind)")
        return 2
    rows = [
        ("raw sendall", "raw", True),
        ("transport, checksum on", "transport", True),
        ("transport, checksum off", "transport", False),
        ("manager, checksum on", "manager", True),
        ("manager, checksum off", "manager", False),
        ("manager over a no-op transport", "noop", True),
    ]
    counts = {}
    for label, mode, checksum in rows:
        counts[label] = _per_send(mode, checksum, args.count, args.size)
    print(
        f"user-space instructions per send of {args.size} bytes ({args.count} sends, valgrind "
        "callgrind; the kernel's work is not counted)"
    )
    print(f"{'path':34} {'instructions':>12} {'vs transport':>13}")
    for label, _, checksum in rows:
        transport = counts[f"transport, checksum {'on' if checksum else 'off'}"]
        ratio = f"{counts[label] / transport:.2f}x" if label.startswith("manager,") else ""
        print(f"{label:34} {counts[label]:>12,.0f} {ratio:>13}")
    for checksum in ("on", "off"):
        guard = counts[f"manager, checksum {checksum}"] - counts[f"transport, checksum {checksum}"]
        print(f"the manager's share, checksum {checksum}: {guard:,.0f} instructions per send")
    return 0


def _per_send(mode: str, checksum: bool, count: int, size: int) -> float:
    idle = _instructions(mode, checksum, 0, size)
    busy = _instructions(mode, checksum, count, size)
    return (busy - idle) / count


def _instructions(mode: str, checksum: bool, count: int, size: int) -> int:
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "benchmarks.instructions",
        _CHILD,
        mode,
        "on" if checksum else "off",
        str(count),
        str(size),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    found = re.search(r"Collected\s*:\s*(\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{mode} run failed ({done.returncode}): {done.stderr[-2000:]}")
    return int(found.group(1))


class _NoOp:
    """A transport that accepts everything and does nothing."""

    def start(self) -> None: ...

    def close(self) -> None: ...

    def send(self, data: bytes) -> None: ...

    def health_check(self) -> bool:
        return True


def _child(mode: str, checksum: bool, count: int, size: int) -> None:
    """One measured run: start the sink, connect, send ``count`` payloads, flush, stop."""
    import dwcp
    from dwcp.transport import MultiStreamTCPTransport

    sink = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.sink"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sink.stdout is not None
        raw_port, dwcp_port, _ = (int(p) for p in sink.stdout.readline().split())
        payload = os.urandom(size)
        if mode == "raw":
            with socket.create_connection(("127.0.0.1", raw_port)) as conn:
                for _ in range(count):
                    conn.sendall(payload)
            return
        if mode == "noop":
            manager = dwcp.Manager(_NoOp(), health_interval=3600)
            with manager:
                for _ in range(count):
                    manager.send_with_circuit_breaker(payload)
            return
        transport = MultiStreamTCPTransport(
            ("127.0.0.1", dwcp_port),
            streams=1,
            checksum=checksum,
            chunk_size=max(size, 256 * 1024),
            max_message_size=4 * size,
        )
        if mode == "transport":
            transport.start()
            try:
                for _ in range(count):
                    transport.send(payload)
                transport.flush()
            finally:
                transport.close()
            return
        with dwcp.Manager(transport, health_interval=3600, fail_fast=True) as manager:
            for _ in range(count):
                manager.send_with_circuit_breaker(payload)
            transport.flush()
    finally:
        assert sink.stdin is not None
        sink.stdin.close()
        try:
            sink.wait(10)
        except subprocess.TimeoutExpired:
            sink.kill()
            sink.wait(10)


def _opcodes(mode: str, size: int, count: int = 2_000) -> None:
    """Print the opcodes per send the calling thread runs, in total and by function."""
    import collections

    import dwcp
    from dwcp.transport import MultiStreamTCPTransport

    sink = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.sink"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    counts: collections.Counter[str] = collections.Counter()

    def tracer(frame: Any, event: str, arg: object) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            counts[frame.f_code.co_name] += 1
        return tracer

    try:
        assert sink.stdout is not None
        _, dwcp_port, _ = (int(p) for p in sink.stdout.readline().split())
        transport = MultiStreamTCPTransport(
            ("127.0.0.1", dwcp_port),
            streams=1,
            chunk_size=max(size, 256 * 1024),
            max_message_size=4 * size,
        )
        payload = os.urandom(size)
        with dwcp.Manager(transport, health_interval=3600, fail_fast=True) as manager:
            send = manager.send_with_circuit_breaker if mode == "manager" else transport.send
            for _ in range(100):  # warm: the first sends create per-thread state
                send(payload)
            sys.settrace(tracer)
            try:
                for _ in range(count):
                    send(payload)
            finally:
                sys.settrace(None)
            transport.flush()
    finally:
        assert sink.stdin is not None
        sink.stdin.close()
        sink.wait(10)
    counts.pop("_opcodes", None)  # this loop's own opcodes
    per = {name: n / count for name, n in counts.most_common()}
    detail = ", ".join(f"{name} {n:.1f}" for name, n in per.items() if n >= 0.05)
    print(f"{mode}: {sum(per.values()):.1f} opcodes per send in the calling thread ({detail})")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == _OPCODES:
        _opcodes(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) == 6 and sys.argv[1] == _CHILD:
        _child(sys.argv[2], sys.argv[3] == "on", int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit(main())
