"""Both ends of one row of the WAN benchmark, each run inside its network namespace.

``python -m benchmarks.wan_peer recv KIND --port P``: listens on ``0.0.0.0:P`` and counts
what arrives whole (messages and their bytes) and when the latest arrived.  It prints
``READY`` once listening; each line ``peek`` on stdin is answered with one JSON line
``{"count", "bytes", "last"}`` (``last``: ``time.monotonic()`` of the latest delivery; the
clock is the machine's, shared by every namespace).

``python -m benchmarks.wan_peer send KIND --host H --port P --size N [options]``: sends
N-byte messages as fast as the sender lets it, until its stdin closes; it prints
``{"start": t0}`` just before the first send and, when stdin closes, one JSON line with what
it did (messages sent, errors by kind, dwcp sessions opened), then exits at once.

KIND: ``raw`` (a default TCP socket, one ``sendall`` of a 4-byte length prefix and the
payload per message, as a user writes it), ``zmq`` (pyzmq PUSH/PULL at its defaults) or
``dwcp`` (``MultiStreamTCPTransport`` through ``Manager.send_with_circuit_breaker``, every
setting at its default unless given).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

_LENGTH = struct.Struct("!I")
# After a failed send the sender waits this long before the next, as a user's retry loop
# would; otherwise an open breaker turns the loop into a busy spin.
_RETRY_PAUSE = 0.05


class Tally:
    """Messages and bytes delivered, and when the latest was: one tuple, replaced whole by the
    one thread delivering at a time (dwcp calls ``on_message`` serially per session), so the
    stdin thread always reads a consistent snapshot."""

    def __init__(self) -> None:
        self.state = (0, 0, 0.0)

    def __call__(self, data: bytes | bytearray) -> None:
        count, size, _ = self.state
        self.state = (count + 1, size + len(data), time.monotonic())

    def snapshot(self) -> dict[str, float]:
        count, size, last = self.state
        return {"count": count, "bytes": size, "last": last}


class SequenceTally(Tally):
    """A ``Tally`` that also checks the 8-byte sequence number each message starts with:
    ``duplicates`` (a number at or below the highest seen) and ``missing`` (numbers skipped)."""

    def __init__(self) -> None:
        super().__init__()
        self.next = 0
        self.duplicates = 0
        self.missing = 0

    def __call__(self, data: bytes | bytearray) -> None:
        seq = int.from_bytes(data[:8], "big")
        if seq < self.next:
            self.duplicates += 1
        else:
            self.missing += seq - self.next
            self.next = seq + 1
        super().__call__(data)

    def snapshot(self) -> dict[str, float]:
        result = super().snapshot()
        result.update(duplicates=self.duplicates, missing=self.missing, next=self.next)
        return result


def _recv_exactly(conn: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:], len(view) - got, socket.MSG_WAITALL)
        if not n:
            return False
        got += n
    return True


def _raw_reader(conn: socket.socket, tally: Tally) -> None:
    header = memoryview(bytearray(_LENGTH.size))
    with conn:
        while _recv_exactly(conn, header):
            (size,) = _LENGTH.unpack(header)
            payload = bytearray(size)
            if not _recv_exactly(conn, memoryview(payload)):
                return
            tally(payload)


def receive(kind: str, port: int, max_message_size: int, sequenced: bool) -> None:
    tally = SequenceTally() if sequenced else Tally()
    if kind == "raw":
        server = socket.create_server(("0.0.0.0", port), backlog=16)

        def accept() -> None:
            while True:
                conn, _ = server.accept()
                threading.Thread(target=_raw_reader, args=(conn, tally), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
    elif kind == "zmq":
        import zmq

        pull = zmq.Context().socket(zmq.PULL)
        pull.bind(f"tcp://0.0.0.0:{port}")

        def pull_loop() -> None:
            while True:
                tally(pull.recv())

        threading.Thread(target=pull_loop, daemon=True).start()
    else:
        from dwcp.transport import MultiStreamReceiver

        receiver = MultiStreamReceiver(
            ("0.0.0.0", port), on_message=tally, max_message_size=max_message_size
        )
        receiver.start()
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() == "peek":
            print(json.dumps(tally.snapshot()), flush=True)
    os._exit(0)  # the parent is done with us: no orderly shutdown of a benchmark peer


def _sender(kind: str, args: argparse.Namespace, report: dict[str, Any]) -> Callable[[bytes], Any]:
    """The send function of ``kind``, connected."""
    if kind == "raw":
        sock = socket.create_connection((args.host, args.port), timeout=30)
        sock.settimeout(None)
        if args.cc:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, args.cc.encode())
        prefix = _LENGTH.pack(args.size)

        def send_raw(payload: bytes) -> None:
            sock.sendall(prefix + payload)

        return send_raw
    if kind == "zmq":
        import zmq

        push = zmq.Context().socket(zmq.PUSH)
        push.connect(f"tcp://{args.host}:{args.port}")
        return push.send
    import dwcp
    from dwcp.transport import MultiStreamTCPTransport

    options: dict[str, Any] = {"streams": args.streams, "acknowledged": args.ack}
    if args.cc:
        options["congestion_control"] = args.cc
    if args.chunk_size:
        options["chunk_size"] = args.chunk_size
    if args.send_timeout:
        options["send_timeout"] = args.send_timeout
    transport = MultiStreamTCPTransport((args.host, args.port), **options)
    manager = dwcp.Manager(transport)
    manager.start()
    sessions: list[object] = []
    report["session_started"] = []
    report["broken_at"] = []

    def watch() -> None:
        # Every session object the transport has had: more than one means the link was
        # taken for broken and restarted.  Keeping the objects keeps their ids unique.
        broken: object = None
        while True:
            session = transport._session
            if session is not None and (not sessions or sessions[-1] is not session):
                sessions.append(session)
                report["sessions"] = len(sessions)
                report["session_started"].append(time.monotonic())
            reason = None if session is None else session.broken
            if reason and session is not broken:
                broken = session
                report["broken_at"].append([time.monotonic(), str(reason)[:200]])
            time.sleep(0.02)  # a benchmark's sampling period, not library code

    threading.Thread(target=watch, daemon=True).start()
    report["flush"] = transport.flush
    return manager.send_with_circuit_breaker


def send(kind: str, args: argparse.Namespace) -> None:
    report: dict[str, Any] = {
        "sent": 0,
        "sent_bytes": 0,
        "errors": {},
        "first_errors": {},
        "sessions": 0,
    }
    out_lock = threading.Lock()

    stop = threading.Event()

    def finish() -> None:
        sys.stdin.read()  # until the parent closes it
        if args.sequence:
            stop.set()  # the send loop stops, flushes the window, then reports
            return
        _report(report, out_lock)
        os._exit(0)  # a send may be blocked for minutes on a slow path: do not wait for it

    threading.Thread(target=finish, daemon=True).start()
    payload = os.urandom(args.size)
    send_one = _sender(kind, args, report)
    with out_lock:
        print(json.dumps({"start": time.monotonic()}), flush=True)
    pause = threading.Event()
    seq = 0
    while not stop.is_set():
        if args.sequence:
            # A new object per message: an acknowledged transport keeps it until the ACK.
            payload = seq.to_bytes(8, "big") + payload[8:]
        try:
            send_one(payload)
        except Exception as exc:  # noqa: BLE001 - counted and reported; the row goes on
            code = getattr(exc, "code", type(exc).__name__)
            errors = report["errors"]
            errors[code] = errors.get(code, 0) + 1
            report["first_errors"].setdefault(str(code), str(exc)[:300])
            if kind == "raw":
                pause.wait()  # a broken socket stays broken: report it when asked
            pause.wait(_RETRY_PAUSE)
            continue
        report["sent"] += 1
        report["sent_bytes"] += args.size
        seq += 1
    # --sequence: what send() returned for is in the window; wait for its confirmation, as
    # a user closing a transfer would, so that process exit loses nothing.
    flush = report.pop("flush", None)
    if flush is not None:
        try:
            flush(120.0)
        except Exception as exc:  # noqa: BLE001 - reported
            report["flush_error"] = str(exc)[:300]
    _report(report, out_lock)
    os._exit(0)


def _report(report: dict[str, Any], out_lock: threading.Lock) -> None:
    with out_lock:
        print(json.dumps({k: v for k, v in report.items() if k != "flush"}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["recv", "send"])
    parser.add_argument("kind", choices=["raw", "zmq", "dwcp"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--size", type=int, default=1 << 20)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--cc", default=None, help="TCP_CONGESTION of the sender's sockets")
    parser.add_argument("--ack", action="store_true")
    parser.add_argument("--chunk-size", type=int, default=0)
    parser.add_argument("--send-timeout", type=float, default=0.0)
    parser.add_argument("--max-message-size", type=int, default=64 << 20)
    parser.add_argument(
        "--sequence",
        action="store_true",
        help="number messages (first 8 bytes); the receiver checks duplicates and gaps, and "
        "the sender stops at EOF, flushes and reports",
    )
    args = parser.parse_args()
    if args.role == "recv":
        receive(args.kind, args.port, args.max_message_size, args.sequence)
    else:
        send(args.kind, args)


if __name__ == "__main__":
    main()
