"""The delay line of the WAN benchmark: ``python -m benchmarks.wan_line A B [options]`` (root).

This kernel has no ``sch_netem``, so delay and random loss are done here, in user space: the
process creates two TUN devices named A and B (the benchmark then moves each into its own
network namespace), and every IP packet read from one is written to the other after a fixed
delay for its direction, unless a random draw drops it.  Per direction the packets leave in
the order they came (one FIFO, one delay), so the line never reorders.  Rate and queue are
not done here: ``tbf`` on each TUN device's egress is the bottleneck (see ``benchmarks/wan.py``).

It prints ``READY`` once both devices exist.  Commands, one per line on stdin:

- ``loss AB BA``: the drop probabilities (0..1) of each direction from now on;
- ``stats``: one JSON line with the counts since the last ``stats`` (packets and bytes
  forwarded, dropped by the loss draw, and how late the latest packets were written: the
  emulator's own error, which shows whether it kept up).

EOF on stdin ends it; the devices vanish with the process.
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import json
import os
import random
import select
import struct
import sys
import time
from collections import deque

_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_MAX_PACKET = 65536
# Packets read from one device per wake-up before due packets are written again, so a burst
# on one side does not delay the other side's departures.
_READ_BATCH = 64


def open_tun(name: str) -> int:
    """A non-blocking fd of a new TUN device ``name`` (IP packets, no extra header)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


class Direction:
    """One direction of the line: its FIFO of (due time, packet) and its counters."""

    def __init__(self, source: int, sink: int, delay: float, loss: float) -> None:
        self.source, self.sink, self.delay, self.loss = source, sink, delay, loss
        self.queue: deque[tuple[float, bytes]] = deque()
        self.reset()

    def reset(self) -> None:
        self.packets = self.bytes = self.dropped = 0
        self.late_max = 0.0
        self.late_sum = 0.0
        self.queued_max = 0

    def stats(self) -> dict[str, float]:
        result = {
            "packets": self.packets,
            "bytes": self.bytes,
            "dropped": self.dropped,
            "late_max_ms": round(self.late_max * 1000, 3),
            "late_mean_ms": round(self.late_sum / self.packets * 1000, 3) if self.packets else 0.0,
            "queued_max": self.queued_max,
        }
        self.reset()
        return result


def run(a: int, b: int, delay_ab: float, delay_ba: float, seed: int) -> None:
    draw = random.Random(seed).random
    ab, ba = Direction(a, b, delay_ab, 0.0), Direction(b, a, delay_ba, 0.0)
    by_source = {a: ab, b: ba}
    stdin = sys.stdin.fileno()
    poller = select.epoll()
    for fd in (a, b, stdin):
        poller.register(fd, select.EPOLLIN)
    monotonic, read, write = time.monotonic, os.read, os.write
    commands = b""
    while True:
        now = monotonic()
        timeout = -1.0
        for direction in (ab, ba):
            queue = direction.queue
            while queue and queue[0][0] <= now:
                due, packet = queue.popleft()
                try:
                    write(direction.sink, packet)
                except OSError:  # the device is down (teardown): the packet is lost
                    continue
                late = now - due
                direction.late_sum += late
                direction.late_max = max(direction.late_max, late)
                direction.packets += 1
                direction.bytes += len(packet)
            if queue:
                wait = queue[0][0] - now
                timeout = wait if timeout < 0 else min(timeout, wait)
        for fd, _ in poller.poll(timeout):
            if fd == stdin:
                # Read the fd, not sys.stdin: a buffered readline() could take two commands
                # from the pipe and leave one where epoll never reports it.
                data = read(stdin, 4096)
                if not data:
                    return
                commands += data
                while b"\n" in commands:
                    line, commands = commands.split(b"\n", 1)
                    command = line.decode().split()
                    if command[:1] == ["loss"]:
                        ab.loss, ba.loss = float(command[1]), float(command[2])
                    elif command[:1] == ["stats"]:
                        print(json.dumps({"ab": ab.stats(), "ba": ba.stats()}), flush=True)
                continue
            direction = by_source[fd]
            arrived = monotonic()
            due = arrived + direction.delay
            queue, loss = direction.queue, direction.loss
            for _ in range(_READ_BATCH):
                try:
                    packet = read(fd, _MAX_PACKET)
                except BlockingIOError:
                    break
                if loss and draw() < loss:
                    direction.dropped += 1
                    continue
                queue.append((due, packet))
            direction.queued_max = max(direction.queued_max, len(queue))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="name of the TUN device of side A")
    parser.add_argument("b", help="name of the TUN device of side B")
    parser.add_argument("--delay-ab", type=float, default=0.025, help="seconds, A to B")
    parser.add_argument("--delay-ba", type=float, default=0.025, help="seconds, B to A")
    parser.add_argument("--seed", type=int, default=1, help="of the loss draws")
    parser.add_argument(
        "--realtime",
        action="store_true",
        help="run SCHED_FIFO, so a busy machine delays packets less (needs root)",
    )
    args = parser.parse_args()
    if args.realtime:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    # The loop makes no reference cycles; a collection pass over thousands of queued tuples
    # would hold every packet up for milliseconds.
    gc.disable()
    a, b = open_tun(args.a), open_tun(args.b)
    print("READY", flush=True)
    run(a, b, args.delay_ab, args.delay_ba, args.seed)


if __name__ == "__main__":
    main()
