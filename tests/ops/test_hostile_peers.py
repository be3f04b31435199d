"""A receiver in its own process against hostile peers: what they cost it in memory and CPU.

Measured from outside, in /proc, as an operator would: the receiver's resident memory and
CPU time, and its log.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dwcp.transport import wire
from tests._frames import encode_message
from tests.procs import ReceiverProcess, receiver_process_fixture  # noqa: F401 - fixture

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

MiB = 1 << 20
ReceiverFactory = Callable[..., ReceiverProcess]


def rss(pid: int) -> int:
    """Resident memory of process ``pid``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def join(address: tuple[str, int], session: bytes, index: int, count: int) -> socket.socket:
    sock = socket.create_connection(address, timeout=5.0)
    sock.sendall(wire.pack_handshake(session, index, count, acknowledged=False))
    assert wire.parse_welcome(sock.recv(wire.WELCOME.size, socket.MSG_WAITALL)) == 0
    return sock


def _claim_payloads(address: tuple[str, int], sockets: list[socket.socket]) -> int:
    """4 sessions x 4 streams; on every stream a DATA header that announces a 64 MiB message
    and a 1 MiB chunk of it, with no payload after it. Returns the bytes sent."""
    sent = 0
    for _ in range(4):
        session = os.urandom(16)
        for index in range(4):
            sock = join(address, session, index, 4)
            sockets.append(sock)
            # Message ``index`` on stream ``index``: each stream in id order, as the rule
            # says. Its reader then sits in the payload's read, which never comes.
            header = wire.pack_data_header(index, 0, 64, 64 * MiB, b"")
            header = _with_length(header, MiB)  # a 1 MiB chunk claimed
            sock.sendall(header)
            sent += len(header)
    return sent


# At most a 1 MiB piece and the 256 KiB read buffer a stream (16 of them), and slack.
PINNED_BOUND = 16 * (MiB + 256 * 1024) + 16 * MiB


def test_headers_alone_cannot_pin_the_receivers_memory(
    receiver_process: ReceiverFactory, sockets: list[socket.socket]
) -> None:
    receiver = receiver_process(max_message_size=64 * MiB, idle_timeout=30.0)
    before = rss(receiver.pid)
    sent = _claim_payloads(receiver.address, sockets)
    assert sent < 16 * 1024
    # Every reader now sits in a 1 MiB payload read: at most that much each, plus buffers.
    deadline = time.monotonic() + 2.0
    grown = 0
    while time.monotonic() < deadline:
        grown = max(grown, rss(receiver.pid) - before)
        threading.Event().wait(0.05)
    assert grown < PINNED_BOUND, f"{grown / MiB:.1f} MiB for {sent} bytes of headers"
    assert receiver.stats()["delivered"] == 0


def test_payloads_trickled_to_outlast_frame_timeout_pin_no_more_than_headers(
    receiver_process: ReceiverFactory, sockets: list[socket.socket]
) -> None:
    # frame_timeout counts a stall, so a peer trickling its payloads is never cut off for
    # it (wire-format.md, Limits): what its streams hold is bounded in size instead.
    frame_timeout = 0.5
    receiver = receiver_process(
        max_message_size=64 * MiB, idle_timeout=30.0, frame_timeout=frame_timeout
    )
    before = rss(receiver.pid)
    _claim_payloads(receiver.address, sockets)
    pace = threading.Event()  # the trickle's pace is what is tested, never set
    deadline = time.monotonic() + 4 * frame_timeout
    grown = rounds = 0
    while time.monotonic() < deadline:
        for sock in sockets:  # a byte of every payload each 0.1 s: slow, never stalled
            sock.sendall(b"\0")
        rounds += 1
        grown = max(grown, rss(receiver.pid) - before)
        pace.wait(0.1)
    stats = receiver.stats()
    assert stats["sessions"] == 4, "a session trickling its payloads was cut off"
    assert stats["delivered"] == 0
    assert grown < PINNED_BOUND, f"{grown / MiB:.1f} MiB for {rounds} trickled bytes a stream"


def _with_length(header: bytes, length: int) -> bytes:
    """``header`` (a sealed DATA header) with its payload length replaced, sealed again."""
    fields = list(wire.DATA_HEADER.unpack(header))
    fields[8] = length
    fields[10] = 0
    packed = wire.DATA_HEADER.pack(*fields)
    return packed[:-4] + wire.checksum_of(packed[:-4]).to_bytes(4, "big")


def test_out_of_descriptors_the_accept_loop_backs_off_instead_of_spinning(
    receiver_process: ReceiverFactory, sockets: list[socket.socket]
) -> None:
    receiver = receiver_process(idle_timeout=30.0)
    # Leave the child a handful of descriptors beyond what it holds now.
    held = len(os.listdir(f"/proc/{receiver.pid}/fd"))
    soft, hard = resource.prlimit(receiver.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(receiver.pid, resource.RLIMIT_NOFILE, (held + 4, hard))
    for _ in range(20):  # more connections than it can accept
        with contextlib.suppress(OSError):
            sockets.append(socket.create_connection(receiver.address, timeout=5.0))
    began_cpu = cpu_seconds(receiver.pid)
    threading.Event().wait(2.0)  # what is measured is what 2 s of this costs
    spent = cpu_seconds(receiver.pid) - began_cpu
    assert spent < 0.5, f"accept loop used {spent:.2f} s of CPU in 2 s"
    warnings = receiver.log_path.read_text(errors="replace").count("Receiver accept failed")
    assert 1 <= warnings <= 3, warnings
    # Descriptors back: the queued connections are served.
    resource.prlimit(receiver.pid, resource.RLIMIT_NOFILE, (soft, hard))
    for sock in sockets:
        sock.close()
    sockets.clear()
    sock = join(receiver.address, os.urandom(16), 0, 1)
    sockets.append(sock)
    sock.sendall(encode_message(0, b"after", 1024)[0])
    assert receiver.wait_delivered(1, 5.0)
