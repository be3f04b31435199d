"""The fault matrix: faults x (acknowledged, not) x streams (1, 4) x sizes (1 KiB, 1 MiB,
8 MiB), across processes.

The transport (here) talks to a verifying receiver process (``tests.receiver_child``, with a
delivery journal that survives SIGKILL) through the fault-injecting proxy process
(``tests.faultproxy_child``). Each cell sends self-describing payloads (writer id, sequence
number, checksum: ``tests.payload``) before, during and after one fault, recovers the way the
Manager's recovery does (``close()`` then ``start()``, retried), and asserts:

- nothing corrupted is ever delivered, nothing is delivered out of order;
- nothing is delivered twice to a live receiver (across a receiver SIGKILL: each process at
  most once, acknowledged messages at least once over both);
- acknowledged: every message whose ``send`` returned is delivered (after ``flush``), and none
  whose ``send`` raised;
- every send that failed raised ``TransportError`` (nothing else escapes);
- sending resumes within ``RESUME_BOUND`` of the fault healing;
- the transport's threads and descriptors are back to their baseline after ``close()``.

A quick subset (one cell per fault, spread over modes, stream counts and sizes) runs by
default; ``DWCP_FULL=1`` runs every cell.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from dwcp import MultiStreamTCPTransport, TransportError
from tests.faultproxy import FaultProxy
from tests.procs import ReceiverProcess, make_payload, seq_set

KiB = 1024
MiB = 1024 * KiB
FULL = os.environ.get("DWCP_FULL") == "1"
FAULTS = ("refuse", "close", "rst", "stall", "partial", "corrupt", "rate", "sigkill")
SIZES = {"1KiB": KiB, "1MiB": MiB, "8MiB": 8 * MiB}
# Messages per phase (before, during, after the fault): a few MiB per phase at most.
COUNTS = {KiB: 150, MiB: 6, 8 * MiB: 2}
SEND_TIMEOUT = 2.0
RESUME_BOUND = 15.0  # heal -> first send that returned
# Fault -> first send that failed. A breaking fault fails a send within send_timeout plus the
# keepalive's bound (0.5 + 1.5 s): 4 s. The rest is room for a busy machine; a fault that
# never fails a send still does not pass.
FAIL_BOUND = 15.0
DELIVERY_TIMEOUT = 30.0

QUICK = {
    ("close", True, 4, "1MiB"),
    ("rst", False, 1, "1KiB"),
    ("rst", True, 4, "8MiB"),
    ("stall", True, 1, "1KiB"),
    ("stall", False, 4, "1MiB"),
    ("corrupt", True, 4, "1KiB"),
    ("corrupt", False, 1, "1MiB"),
    ("refuse", True, 1, "1MiB"),
    ("partial", True, 4, "1KiB"),
    ("rate", True, 1, "1MiB"),
    ("sigkill", True, 4, "1KiB"),
    ("sigkill", False, 1, "8MiB"),
    ("stall", False, 1, "1KiB"),  # a stalled old session's late bytes must not reorder
    ("close", False, 1, "8MiB"),
    ("refuse", False, 4, "1KiB"),
    ("partial", False, 1, "8MiB"),
    ("rate", False, 4, "1KiB"),
    ("corrupt", True, 1, "8MiB"),
    ("sigkill", True, 1, "1MiB"),
}
CELLS = [
    cell
    for cell in itertools.product(FAULTS, (False, True), (1, 4), SIZES)
    if FULL or cell in QUICK
]
_writers = itertools.count(100)


# -- shared peers (one receiver and one proxy for the module; a writer id per cell) ---------


@dataclass
class Peers:
    receiver: ReceiverProcess
    proxy: FaultProxy


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    root = tmp_path_factory.mktemp("matrix")
    receiver = ReceiverProcess(
        max_message_size=16 * MiB,
        journal=root / "journal",
        log_path=root / "receiver.log",
        idle_timeout=30.0,
    )
    try:
        proxy = FaultProxy(receiver.address, log_path=root / "proxy.log")
    except BaseException:
        receiver.close()
        raise
    try:
        yield Peers(receiver, proxy)
    finally:
        proxy.close()
        receiver.close()
        print(f"---- receiver log\n{receiver.log_tail()}\n---- proxy log\n{proxy.log_tail()}")


# -- one cell --------------------------------------------------------------------------------


@dataclass
class Cell:
    transport: MultiStreamTCPTransport
    writer: int
    size: int
    acknowledged: bool
    ok: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    foreign: list[BaseException] = field(default_factory=list)
    seq: int = 0

    def send(self) -> bool:
        """Send the next message; record how it ended; True if it returned."""
        seq = self.seq
        self.seq += 1
        try:
            self.transport.send(make_payload(self.writer, seq, self.size))
        except TransportError:
            self.failed.append(seq)
            return False
        except BaseException as exc:  # noqa: BLE001 - any other exception fails the cell
            self.foreign.append(exc)
            self.failed.append(seq)
            return False
        self.ok.append(seq)
        return True

    def send_some(self, count: int, within: float, *, until_failure: bool = False) -> None:
        """Send ``count`` messages (with ``until_failure``, and on until one fails), within
        ``within`` seconds; a failed send is followed by a recovery attempt."""
        deadline = time.monotonic() + within
        failures = len(self.failed)
        sent = 0
        while sent < count or (until_failure and len(self.failed) == failures):
            if not self.send() and self.transport.started:
                self.restart_once()
            sent += 1
            if time.monotonic() > deadline:
                return

    def restart_once(self) -> bool:
        """What recovery does: close, then start; False if the start failed."""
        self.transport.close()
        try:
            self.transport.start()
        except TransportError:
            return False
        except BaseException as exc:  # noqa: BLE001
            self.foreign.append(exc)
            return False
        return True

    def resume(self, bound: float) -> float:
        """Recover and send until a send returns; how long that took (AssertionError past
        ``bound``)."""
        began = time.monotonic()
        pause = threading.Event()
        while True:
            if self.transport.started and self.send():
                return time.monotonic() - began
            assert time.monotonic() - began < bound, f"no send returned within {bound} s"
            if not self.restart_once():
                pause.wait(0.1)  # a retry interval bounded by ``bound`` above


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _threads() -> int:
    return threading.active_count()


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        pause.wait(0.02)


def _inject(fault: str, peers: Peers, size: int) -> None:
    proxy = peers.proxy
    if fault == "refuse":
        proxy.refuse()
        proxy.kill_all("close")  # the current streams go too: every reconnect is refused
    elif fault == "close":
        proxy.close_after(size // 2 + 41)  # inside a frame
    elif fault == "rst":
        proxy.reset(size // 2 + 41)
    elif fault == "stall":
        proxy.stall()
    elif fault == "partial":
        proxy.partial(max_piece=7 if size <= KiB else 64 * KiB, delay=0.0002, every=64)
    elif fault == "corrupt":
        proxy.corrupt(size // 3 + 100, bit=3)
    elif fault == "rate":
        proxy.rate(max(256 * KiB, 4 * size))  # about 1/4 s a message
    elif fault == "sigkill":
        assert peers.receiver.kill(signal.SIGKILL) == -signal.SIGKILL
    else:  # pragma: no cover
        raise AssertionError(fault)


def _heal(fault: str, peers: Peers) -> None:
    if fault == "sigkill":
        peers.receiver.restart()
    peers.proxy.passthrough()


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("fault", "acknowledged", "streams", "size_name"),
    CELLS,
    ids=[f"{f}-{'acked' if a else 'unacked'}-{s}streams-{n}" for f, a, s, n in CELLS],
)
def test_fault_cell(
    peers: Peers, fault: str, acknowledged: bool, streams: int, size_name: str
) -> None:
    size = SIZES[size_name]
    count = COUNTS[size]
    receiver = peers.receiver
    peers.proxy.passthrough()
    fds, threads = _fds(), _threads()
    transport = MultiStreamTCPTransport(
        peers.proxy.address,
        streams=streams,
        chunk_size=256 * KiB,
        send_timeout=SEND_TIMEOUT,
        connect_timeout=SEND_TIMEOUT,
        max_message_size=16 * MiB,
        acknowledged=acknowledged,
        keepalive_interval=0.5,
        keepalive_timeout=1.5,
    )
    cell = Cell(transport, next(_writers), size, acknowledged)
    try:
        transport.start()
        cell.send_some(count, within=30.0)  # before: a healthy link
        assert not cell.failed, "a send failed before any fault"
        _inject(fault, peers, size)
        breaking = fault not in ("partial", "rate")
        during = FAIL_BOUND if breaking else 4 * SEND_TIMEOUT
        cell.send_some(count, within=during, until_failure=breaking)  # during
        if breaking:
            assert cell.failed, f"{fault}: no send failed within {FAIL_BOUND} s"
        _heal(fault, peers)
        took = cell.resume(RESUME_BOUND)
        assert took < RESUME_BOUND
        print(f"resumed {took:.2f} s after the fault healed; failed sends: {len(cell.failed)}")
        cell.send_some(count, within=30.0)  # after
        last = cell.ok[-1]
        if acknowledged:
            # Everything that returned is confirmed (a fault-free link now: one retry at most,
            # for a session the healed fault still broke).
            try:
                transport.flush(DELIVERY_TIMEOUT)
            except TransportError:
                assert cell.restart_once()
                transport.flush(DELIVERY_TIMEOUT)
        else:
            transport.flush(DELIVERY_TIMEOUT)
        stats = receiver.wait_for(
            lambda s: (
                cell.writer in s["writers"]
                and max(seq_set(s["writers"][cell.writer]["seqs"])) >= last
            ),
            DELIVERY_TIMEOUT,
        )
    finally:
        transport.close()
        peers.proxy.passthrough()
        if not receiver.alive:
            receiver.restart()

    assert cell.foreign == [], f"sends raised something else than TransportError: {cell.foreign}"
    assert stats["corrupted"] == 0, stats["errors"]
    mine = stats["writers"][cell.writer]
    assert mine["out_of_order"] == 0
    assert mine["duplicates"] == 0, "delivered twice to a live receiver"
    delivered = seq_set(mine["seqs"])
    ok, failed = set(cell.ok), set(cell.failed)
    assert delivered <= ok | failed
    journal = receiver.journal()
    earlier: set[int] = set()  # what the process this cell killed delivered
    for pid, entries in journal.items():
        seqs = [seq for writer, seq in entries if writer == cell.writer]
        assert len(seqs) == len(set(seqs)), f"process {pid} delivered a message twice"
        if pid != receiver.pid:
            earlier |= set(seqs)  # (writer ids are per cell: only this cell's process)
    if acknowledged:
        # Exactly once to a live receiver, at least once across its SIGKILL.
        missing = ok - delivered - earlier
        assert not missing, f"returned sends never delivered: {sorted(missing)[:20]}"
        assert not (failed & (delivered | earlier)), "a send that raised was delivered"
        if fault != "sigkill":
            assert delivered == ok
    # Back to baseline: no transport thread, no descriptor left behind.
    _wait(lambda: _threads() <= threads, 10.0, "threads back to baseline")
    _wait(lambda: _fds() <= fds, 10.0, "descriptors back to baseline")


def test_matrix_covers_every_fault_mode_and_size() -> None:
    """The quick subset still exercises every fault, both modes, both stream counts, every
    size."""
    assert {c[0] for c in QUICK} == set(FAULTS)
    assert {c[1] for c in QUICK} == {False, True}
    assert {c[2] for c in QUICK} == {1, 4}
    assert {c[3] for c in QUICK} == set(SIZES)
    assert len(CELLS) == (len(FAULTS) * 2 * 2 * len(SIZES) if FULL else len(QUICK))
