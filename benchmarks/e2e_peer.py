"""The receiving end of scenario 8, in its own process: ``python -m benchmarks.e2e_peer KIND``.

KIND is one of:

- ``raw``: drains bytes and counts them (the ceiling: no framing at all);
- ``framed``: parses 4-byte big-endian length-prefixed frames and counts whole messages;
- ``zmq``: a pyzmq PULL socket at pyzmq's defaults, counting each ``recv()``;
- ``dwcp``: a ``MultiStreamReceiver`` (defaults, but ``max_message_size`` when given) whose
  ``on_message`` counts;
- ``reqack``: a hand-written request/ack server: reads one length-prefixed request, answers
  one byte (the reference of the latency rows);
- ``zmq-rep``: a pyzmq REP socket at its defaults answering each request with one byte.

Every socket keeps its default options (no ``TCP_NODELAY``), and nothing is pinned to a core.

The peer prints ``DATA_PORT STATS_PORT`` on one line once it is ready.  The stats port is the
control channel: the parent sends an 8-byte big-endian *target* and gets back the count (8
bytes, big-endian) as soon as it reaches the target, or after ``_ANSWER_WITHIN`` seconds at
the latest, followed by the CPU seconds this whole process has used so far, every thread
included (8 bytes, big-endian nanoseconds of ``time.process_time_ns()``), so the parent
learns of completion promptly, sees progress (or its absence) while it waits, and can
charge the receiving side its CPU; a target of 0 is answered at once.  The count is bytes
for ``raw`` and messages for the others.  The peer serves until its stdin closes or it is
terminated.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable

# Longest the peer sits on a stats request before answering with what it has.
_ANSWER_WITHIN = 0.5
# How often a pending stats request looks at the count.  A sleeping poller costs the readers
# next to nothing; 1 ms bounds the timing error to 0.2 % of a half-second measurement.
_POLL = 0.001
# The bulk receive buffer.  256 KiB (dwcp's receiver uses the same) stays in a core's L2
# cache, so the bytes() copy out of it reads warm memory; 1 MiB measured up to 10 % slower.
_BUFFER = 256 * 1024
# Payloads at least this large are read straight into an object of their own with
# MSG_WAITALL (one copy from the kernel, none after, one wake-up per message), as dwcp's
# receiver reads large payloads; smaller ones are parsed out of the bulk buffer.  Reading
# 64 KiB frames through the bulk buffer instead measured about 40 % slower.
_DIRECT = 32 * 1024
# Compact the bulk buffer when less than this is left at its end for the next recv_into.
_MIN_READ = 64 * 1024
_MSG_WAITALL = getattr(socket, "MSG_WAITALL", 0)
_LENGTH = struct.Struct("!I")


class Counts:
    """Per-reader tallies.  Each reader writes only its own cell, so no lock is needed; the
    stats thread sums the cells (reading an int under the GIL is atomic)."""

    def __init__(self) -> None:
        self._cells: list[list[int]] = []

    def cell(self) -> list[int]:
        cell = [0]
        self._cells.append(cell)
        return cell

    def total(self) -> int:
        return sum(cell[0] for cell in list(self._cells))


def _recv_exactly(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        part = conn.recv(size - len(data))
        if not part:
            return None
        data += part
    return data


def _answer(conn: socket.socket, total: Callable[[], int]) -> None:
    """Serve one stats connection: one answer per 8-byte target the parent sends."""
    with conn:
        while True:
            request = _recv_exactly(conn, 8)
            if request is None:
                return
            target = int.from_bytes(request, "big")
            deadline = time.monotonic() + _ANSWER_WITHIN
            while total() < target and time.monotonic() < deadline:
                time.sleep(_POLL)  # a benchmark peer's poll, not library code
            answer = total().to_bytes(8, "big") + time.process_time_ns().to_bytes(8, "big")
            conn.sendall(answer)


def _serve_stats(server: socket.socket, total: Callable[[], int]) -> None:
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_answer, args=(conn, total), daemon=True).start()


def _accept(server: socket.socket, reader: Callable[[socket.socket, list[int]], None]) -> None:
    """Hand each data connection to ``reader`` on a thread of its own, with its own cell."""
    while True:
        conn, _ = server.accept()
        threading.Thread(target=reader, args=(conn, _counts.cell()), daemon=True).start()


_counts = Counts()


# -- raw: count bytes ---------------------------------------------------------------------------


def drain(conn: socket.socket, cell: list[int], message_size: int) -> None:
    """Read and count bytes.  For messages of at least ``_DIRECT`` bytes, one message per
    ``recv_into`` with MSG_WAITALL, the way the framed reader and dwcp's read them: a bulk
    read returning whatever has arrived wakes up several times as often and measured slower
    than the framed reader, which makes no ceiling.  Smaller messages are read in bulk."""
    flags, size = 0, _BUFFER
    if message_size >= _DIRECT:
        flags, size = _MSG_WAITALL, message_size
    view = memoryview(bytearray(size))
    recv_into = conn.recv_into
    with conn:
        while True:
            try:
                n = recv_into(view, size, flags)
            except OSError:
                return
            if not n:
                return
            cell[0] += n


# -- framed: a hand-written 4-byte length prefix ------------------------------------------------


def _read_into(conn: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` completely; False when the peer closed first."""
    got, size = 0, len(view)
    while got < size:
        n = conn.recv_into(view[got:], size - got, _MSG_WAITALL)
        if not n:
            return False
        got += n
    return True


def parse_frames(conn: socket.socket, cell: list[int], limit: int) -> None:
    """What a competent engineer writes for length-prefixed frames: one big buffer filled by
    ``recv_into``, a parse loop over every whole frame in it with ``unpack_from``, a
    ``bytes()`` copy of each payload (the application's own object), and large frames read
    directly into a fresh buffer instead of through the bulk one.  The tally is published
    once per ``recv_into``, not once per frame."""
    buf = bytearray(_BUFFER)
    view = memoryview(buf)
    unpack_from = _LENGTH.unpack_from
    recv_into = conn.recv_into
    start = end = 0
    with conn:
        while True:
            count = 0
            while end - start >= 4:
                (length,) = unpack_from(buf, start)
                if length > limit:
                    return  # a hostile or corrupt length: drop the connection
                stop = start + 4 + length
                if stop <= end:
                    # The application's own copy of the payload, dropped at once as
                    # the counting on_message in the dwcp peer drops its own.
                    bytes(view[start + 4 : stop])
                    count += 1
                    start = stop
                    continue
                if length < _DIRECT:
                    break  # wait for the rest of a small frame in the bulk buffer
                big = bytearray(length)
                have = end - start - 4
                big[:have] = view[start + 4 : end]
                start = end = 0
                with memoryview(big) as rest:
                    if not _read_into(conn, rest[have:]):
                        return
                # ``big`` is the payload, already an object of its own: no second copy.
                count += 1
            cell[0] += count
            if start == end:
                start = end = 0
            elif len(buf) - end < _MIN_READ:
                # Move the partial frame to the front.  It is under _DIRECT + 4 bytes, so it
                # always fits whole in the buffer afterwards.
                left = end - start
                buf[:left] = view[start:end]
                start, end = 0, left
            try:
                n = recv_into(view[end:])
            except OSError:
                return
            if not n:
                return
            end += n


# -- latency references: request/ack -------------------------------------------------------------


def request_ack(conn: socket.socket, cell: list[int]) -> None:
    """The hand-written request/ack server a user would write: read the 4-byte length and the
    payload (``MSG_WAITALL``), answer one byte with ``sendall``. Default socket options: the
    one-byte answer goes out at once anyway, as nothing of ours is unacknowledged then."""
    header = bytearray(4)
    head = memoryview(header)
    with conn:
        while True:
            if not _read_into(conn, head):
                return
            (length,) = _LENGTH.unpack(header)
            payload = bytearray(length)
            with memoryview(payload) as view:
                if length and not _read_into(conn, view):
                    return
            cell[0] += 1
            try:
                conn.sendall(b"\x01")
            except OSError:
                return


def _start_zmq_rep() -> int:
    import zmq

    context = zmq.Context()
    rep = context.socket(zmq.REP)  # pyzmq's defaults
    port = rep.bind_to_random_port("tcp://127.0.0.1")
    cell = _counts.cell()

    def serve() -> None:
        recv, send = rep.recv, rep.send
        while True:
            recv()
            cell[0] += 1
            send(b"\x01")

    threading.Thread(target=serve, name="zmq-rep", daemon=True).start()
    return port


# -- main ---------------------------------------------------------------------------------------


def _listener() -> socket.socket:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    return server


def _start_zmq() -> int:
    import zmq

    context = zmq.Context()
    pull = context.socket(zmq.PULL)  # pyzmq's defaults: RCVHWM 1000, no size limit
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    cell = _counts.cell()

    def receive() -> None:
        # This thread is the only user of the socket from here on.
        recv = pull.recv
        while True:
            recv()
            cell[0] += 1

    threading.Thread(target=receive, name="zmq-pull", daemon=True).start()
    return port


def _start_dwcp(limit: int | None) -> int:
    from dwcp.transport import MultiStreamReceiver

    cell = _counts.cell()

    def on_message(data: bytes) -> None:
        # No lock: on_message runs serially per session, and each peer serves one session.
        cell[0] += 1

    if limit is None:
        receiver = MultiStreamReceiver(("127.0.0.1", 0), on_message=on_message)
    else:
        receiver = MultiStreamReceiver(
            ("127.0.0.1", 0), on_message=on_message, max_message_size=limit
        )
    receiver.start()
    return receiver.address[1]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.e2e_peer")
    parser.add_argument("kind", choices=("raw", "framed", "zmq", "dwcp", "reqack", "zmq-rep"))
    parser.add_argument(
        "--max-message-size",
        type=int,
        default=None,
        help="framed: the largest length accepted (default 64 MiB); dwcp: the receiver's "
        "max_message_size (default: the receiver's own default)",
    )
    parser.add_argument(
        "--message-size", type=int, default=0, help="raw: the size of each message drained"
    )
    args = parser.parse_args()
    if args.kind == "raw":
        data = _listener()
        message_size = args.message_size

        def raw(conn: socket.socket, cell: list[int]) -> None:
            drain(conn, cell, message_size)

        threading.Thread(target=_accept, args=(data, raw), daemon=True).start()
        port = data.getsockname()[1]
    elif args.kind == "framed":
        data = _listener()
        limit = args.max_message_size or 64 * 2**20

        def framed(conn: socket.socket, cell: list[int]) -> None:
            parse_frames(conn, cell, limit)

        threading.Thread(target=_accept, args=(data, framed), daemon=True).start()
        port = data.getsockname()[1]
    elif args.kind == "zmq":
        port = _start_zmq()
    elif args.kind == "reqack":
        data = _listener()
        threading.Thread(target=_accept, args=(data, request_ack), daemon=True).start()
        port = data.getsockname()[1]
    elif args.kind == "zmq-rep":
        port = _start_zmq_rep()
    else:
        port = _start_dwcp(args.max_message_size)
    stats = _listener()
    threading.Thread(target=_serve_stats, args=(stats, _counts.total), daemon=True).start()
    print(port, stats.getsockname()[1], flush=True)
    # Serve until the parent closes our stdin or dies; then leave at once, without waiting
    # for reader threads (a wedged receiver must not keep the process alive).
    sys.stdin.read()
    os._exit(0)


if __name__ == "__main__":
    main()
