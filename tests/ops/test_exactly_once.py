"""The job of issue 23, across processes, with the two examples as written: 10,000 messages
sent with ``Manager.deliver()`` (``examples/deliver_sender.py``) to a receiver process
(``examples/exactly_once_receiver.py``) that is SIGKILLed mid-stream and restarted 1 s
later; the receiver's file of processed messages has every message exactly once."""

from __future__ import annotations

import contextlib
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parents[2]
COUNT = 10_000
STARTUP = 20.0  # a cold interpreter importing dwcp on a loaded machine
WORK = 0.0003  # the receiver's processing per message: the stream lasts seconds, not ms


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768-60999 by default), so that no
    outgoing connection takes it while the receiver is down and restarting."""
    for _ in range(200):
        port = random.randrange(20_000, 32_000)
        with socket.socket() as probe, contextlib.suppress(OSError):
            probe.bind(("127.0.0.1", port))
            return port
    raise AssertionError("no free port found")


class Processes:
    """Children started here, each reaped by pid at the end."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def spawn(self, script: str, *args: str) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / script), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )
        self.started.append(proc)
        return proc

    def receiver(self, port: int, path: Path) -> subprocess.Popen[bytes]:
        proc = self.spawn("exactly_once_receiver.py", str(port), str(path), "--work", str(WORK))
        assert proc.stdout is not None
        deadline = time.monotonic() + STARTUP
        seen = []
        while time.monotonic() < deadline:  # bounded: each line, and the whole wait
            ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
            line = proc.stdout.readline() if ready else b""
            if line == b"ready\n":
                return proc
            if not line:
                break
            seen.append(line)
        raise AssertionError(f"receiver did not start in time: {b''.join(seen)!r}")

    def reap(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10.0)
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.fixture
def processes() -> Iterator[Processes]:
    children = Processes()
    try:
        yield children
    finally:
        children.reap()


def lines(path: Path) -> int:
    with contextlib.suppress(FileNotFoundError):
        return path.read_bytes().count(b"\n")
    return 0


@pytest.mark.parametrize("kill_at", [1_000, 6_000])
def test_10000_messages_through_a_sigkilled_receiver_arrive_exactly_once(
    processes: Processes, tmp_path: Path, kill_at: int
) -> None:
    port, path = free_port(), tmp_path / "processed.txt"
    receiver = processes.receiver(port, path)
    sender = processes.spawn("deliver_sender.py", str(port), str(COUNT))
    wait_until(lambda: lines(path) >= kill_at, timeout=60.0, interval=0.005)
    os.kill(receiver.pid, signal.SIGKILL)
    assert receiver.wait(timeout=10.0) == -signal.SIGKILL
    killed_at = lines(path)
    assert killed_at < COUNT  # mid-stream
    threading.Event().wait(1.0)  # the job: the receiver comes back 1 s later
    receiver = processes.receiver(port, path)
    out, _ = sender.communicate(timeout=90.0)
    assert sender.returncode == 0, out.decode()
    assert f"confirmed {COUNT}, failed 0" in out.decode().splitlines()
    # Confirmed means processed: every line is in the file once the sender is done.
    records = [line.split() for line in path.read_text().splitlines()]
    payloads = Counter(int(payload) for _, _, payload in records)
    assert sorted(payloads) == list(range(COUNT))  # none lost
    assert max(payloads.values()) == 1  # none duplicated
    assert [int(mid) for _, mid, _ in records] == list(range(COUNT))  # ids, in order
    assert len({sender_id for sender_id, _, _ in records}) == 1
    receiver.send_signal(signal.SIGTERM)
    assert receiver.wait(timeout=10.0) == 0
    print(f"killed after {killed_at} processed; {time.monotonic():.0f}")
