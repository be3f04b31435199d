"""``Manager.deliver()`` against the plain acknowledged send, and its drain after an outage.

    python3 -m benchmarks.deliver            # about a minute
    python3 -m benchmarks.deliver --quick

The receiver is a ``MultiStreamReceiver`` in a child process (``--peer``, this module) that
counts messages; the sender is a ``Manager`` over a 4-stream acknowledged
``MultiStreamTCPTransport`` here, every other argument of all three at its default (each row
prints them). Both contenders use the same manager and transport, through its public calls,
in alternating rounds (who goes first swaps every round), and the ratio is the median of the
per-round ratios:

- **send**: ``manager.send_with_circuit_breaker(payload)`` N times, then ``transport.flush()``
  (which waits for every confirmation);
- **deliver**: ``manager.deliver(payload)`` N times, then ``manager.flush()``.

Each is timed from the first call until its flush returned: every message confirmed by the
receiver, hence handed to its ``on_message``. CPU is each process's ``time.process_time()``
over the measurement (every thread), per message.

The drain row: the receiver process is SIGKILLed, N messages are given to ``deliver()``
while it is down, and it is restarted on the same port; the row is the time from the new
receiver listening to ``manager.flush()`` returning (every message confirmed), with the
manager's recovery settings in the notes.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
_START_TIMEOUT = 30.0
_REPLY_TIMEOUT = 30.0
_FLUSH_TIMEOUT = 120.0
#: (size, messages per measurement in full and quick mode)
_ROWS = ((1024, 50_000, 20_000), (2**20, 500, 200))
#: The drain row's recovery settings: what the manager needs to notice and reconnect.
_RECOVERY = {"health_interval": 0.5, "initial_backoff": 0.2, "reset_timeout": 1.0}
#: What the side-by-side rows run, as the rows print it: both contenders share this.
_SETTINGS = (
    "Manager(MultiStreamTCPTransport(addr, acknowledged=True)), "
    "MultiStreamReceiver(addr, on_message=count) in a child process; all else default"
)


# -- the receiver child ---------------------------------------------------------------------------


def peer(port: int) -> None:
    """Receive on 127.0.0.1:``port``, counting; answer ``count`` and ``cpu`` on stdin."""
    from dwcp.transport import MultiStreamReceiver

    count = [0]

    def on_message(data: bytes) -> None:
        count[0] += 1  # one session at a time: no lock needed

    receiver = MultiStreamReceiver(("127.0.0.1", port), on_message=on_message)
    receiver.start()
    print(receiver.address[1], flush=True)
    for line in sys.stdin:
        if line.strip() == "count":
            print(count[0], flush=True)
        elif line.strip() == "cpu":
            print(time.process_time(), flush=True)
    os._exit(0)  # the parent closed stdin or died: leave without joining anything


class Peer:
    """The child receiver, stopped (or killed) by its pid."""

    def __init__(self, port: int = 0) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.deliver", "--peer", str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=_REPO,
            text=True,
        )
        self.port = int(self._read(_START_TIMEOUT))
        self.address = ("127.0.0.1", self.port)

    def _read(self, timeout: float) -> str:
        stdout = self._proc.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], timeout)
        line = stdout.readline() if ready else ""
        if not line:
            self.stop()
            raise RuntimeError(f"receiver child did not answer within {timeout:g} s")
        return line

    def ask(self, what: str) -> float:
        assert self._proc.stdin is not None
        self._proc.stdin.write(what + "\n")
        self._proc.stdin.flush()
        return float(self._read(_REPLY_TIMEOUT))

    def kill(self) -> None:
        self._proc.send_signal(signal.SIGKILL)
        self._proc.wait(10.0)
        self.stop()

    def stop(self) -> None:
        proc = self._proc
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()  # a child at its stdin loop exits
        try:
            proc.wait(10.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10.0)


# -- measurements ---------------------------------------------------------------------------------


class Sample:
    """One measurement: wall seconds and both processes' CPU seconds."""

    def __init__(self, seconds: float, sender_cpu: float, receiver_cpu: float) -> None:
        self.seconds = seconds
        self.sender_cpu = sender_cpu
        self.receiver_cpu = receiver_cpu


def measure(peer: Peer, run: Callable[[], None]) -> Sample:
    receiver_cpu = peer.ask("cpu")
    sender_cpu = time.process_time()
    began = time.perf_counter()
    run()
    seconds = time.perf_counter() - began
    sender_cpu = time.process_time() - sender_cpu
    return Sample(seconds, sender_cpu, peer.ask("cpu") - receiver_cpu)


def side_by_side(size: int, count: int, rounds: int) -> dict[str, list[Sample]]:
    import dwcp

    payload = os.urandom(size)
    receiver = Peer()
    # As _SETTINGS says: a user's first try, no argument tuned for either contender.
    transport = dwcp.MultiStreamTCPTransport(receiver.address, acknowledged=True)
    manager = dwcp.Manager(transport)
    manager.start()
    try:

        def send(n: int) -> None:
            for _ in range(n):
                manager.send_with_circuit_breaker(payload)
            transport.flush(_FLUSH_TIMEOUT)

        def deliver(n: int) -> None:
            for _ in range(n):
                manager.deliver(payload)
            manager.flush(_FLUSH_TIMEOUT)

        contenders = {"send": send, "deliver": deliver}
        for run in contenders.values():
            run(max(1, count // 4))  # warm-up
        samples: dict[str, list[Sample]] = {name: [] for name in contenders}
        names = list(contenders)
        for i in range(rounds):
            for name in names[i % 2 :] + names[: i % 2]:
                samples[name].append(measure(receiver, partial(contenders[name], count)))
        return samples
    finally:
        manager.stop()
        receiver.stop()


def drain_after_outage(size: int, count: int, rounds: int) -> list[float]:
    """Seconds from the receiver's return to every message given to deliver() during the
    outage being confirmed."""
    import dwcp

    payload = os.urandom(size)
    receiver = Peer()
    port = receiver.port
    transport = dwcp.MultiStreamTCPTransport(receiver.address, acknowledged=True)
    manager = dwcp.Manager(transport, **_RECOVERY)  # type: ignore[arg-type]
    manager.start()
    drains = []
    try:
        manager.deliver(payload).result(_FLUSH_TIMEOUT)
        for _ in range(rounds):
            receiver.kill()
            handles = [manager.deliver(payload, timeout=_FLUSH_TIMEOUT) for _ in range(count)]
            receiver = Peer(port)
            back = time.perf_counter()
            manager.flush(_FLUSH_TIMEOUT)
            drains.append(time.perf_counter() - back)
            failed = [h.exception() for h in handles if h.exception() is not None]
            if failed:
                raise RuntimeError(f"{len(failed)} deliveries failed: {failed[0]}")
    finally:
        manager.stop()
        receiver.stop()
    return drains


# -- report ---------------------------------------------------------------------------------------


def _cpu(samples: list[Sample], side: str, count: int) -> float:
    """Median CPU microseconds per message of one process (``side``) over ``samples``."""
    return 1e6 * float(statistics.median(getattr(s, side) for s in samples)) / count


def _size(size: int) -> str:
    return f"{size // 2**20} MiB" if size >= 2**20 else f"{size // 1024} KiB"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deliver")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--peer", type=int, metavar="PORT")
    args = parser.parse_args()
    if args.peer is not None:
        peer(args.peer)
        return
    rounds = 3 if args.quick else 7
    print(f"load average at start: {os.getloadavg()}, cpus: {os.cpu_count()}")
    print(
        "| size | settings | messages x rounds | send (kmsg/s) | deliver (kmsg/s) "
        "| ratio (paired median) | sender CPU us/msg send / deliver "
        "| receiver CPU us/msg send / deliver | per-round ratios |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for size, full, quick in _ROWS:
        count = quick if args.quick else full
        samples = side_by_side(size, count, rounds)
        rates = {name: [count / s.seconds for s in got] for name, got in samples.items()}
        ratios = [d / s for d, s in zip(rates["deliver"], rates["send"])]

        print(
            f"| {_size(size)} | {_SETTINGS} | {count:,} x {rounds} "
            f"| {statistics.median(rates['send']) / 1e3:.2f} "
            f"| {statistics.median(rates['deliver']) / 1e3:.2f} "
            f"| {statistics.median(ratios):.2f}x "
            f"| {_cpu(samples['send'], 'sender_cpu', count):.1f} "
            f"/ {_cpu(samples['deliver'], 'sender_cpu', count):.1f} "
            f"| {_cpu(samples['send'], 'receiver_cpu', count):.1f} "
            f"/ {_cpu(samples['deliver'], 'receiver_cpu', count):.1f} "
            f"| {', '.join(f'{r:.2f}' for r in ratios)} |",
            flush=True,
        )
    print()
    print(
        f"drain after an outage: Manager(MultiStreamTCPTransport(addr, acknowledged=True), "
        f"{', '.join(f'{k}={v}' for k, v in _RECOVERY.items())}), all else default:"
    )
    print("| size | messages queued while down | rounds | median | worst |")
    print("|---|---|---|---|---|")
    for size, count in ((1024, 10_000), (2**20, 20)):
        drains = drain_after_outage(size, count, 3 if args.quick else 5)
        print(
            f"| {_size(size)} | {count:,} | {len(drains)} | {statistics.median(drains):.3f} s "
            f"| {max(drains):.3f} s |",
            flush=True,
        )
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
