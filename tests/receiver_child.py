"""A ``MultiStreamReceiver`` in a process of its own that verifies every message it gets.

Run by ``tests.procs.ReceiverProcess`` as ``python -m tests.receiver_child [options]``; it is
driven over the control channel described in ``tests._control``. ``on_message`` checks each
payload with ``tests.payload.verify_payload`` and keeps, per writer id: messages delivered,
the sequence numbers seen, duplicates, and out-of-order arrivals (a sequence number below
one already seen from that writer). Corrupted payloads are counted (with their reasons),
payloads too short to name a writer are counted by length, and the first ``--log-limit``
deliveries are kept in order as ``[writer_id, seq, length]``.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import threading
import time
import traceback
from collections import Counter
from typing import Any

from loguru import logger

from dwcp.transport import MultiStreamReceiver
from tests._control import send, serve, take_stdout
from tests.payload import ANONYMOUS, PayloadError, verify_payload

CORRUPTED = -2  # writer id and seq of a corrupted message in the delivery log
_ERRORS_KEPT = 20


class _Writer:
    __slots__ = ("delivered", "duplicates", "highest", "out_of_order", "seen")

    def __init__(self) -> None:
        self.delivered = 0
        self.duplicates = 0
        self.out_of_order = 0
        self.highest = -1
        self.seen: set[int] = set()


def _ranges(values: set[int]) -> list[list[int]]:
    """[[first, last], ...] (inclusive) covering ``values``."""
    ranges: list[list[int]] = []
    for value in sorted(values):
        if ranges and ranges[-1][1] == value - 1:
            ranges[-1][1] = value
        else:
            ranges.append([value, value])
    return ranges


class Ledger:
    """What ``on_message`` saw; ``on_message`` runs on receiver threads, so all under a lock."""

    def __init__(self, *, delay: float, log_limit: int, journal: int | None = None) -> None:
        self.delay = delay
        # A file descriptor: one "pid writer seq" line per delivery, written before
        # on_message returns (so before its ACK), and kept by the kernel if we are killed.
        self._journal = journal
        self._pid = os.getpid()
        self._log_limit = log_limit
        self._lock = threading.Lock()
        self._delivered = 0
        self._bytes = 0
        self._corrupted = 0
        self._errors: list[str] = []
        self._anonymous: Counter[int] = Counter()
        self._writers: dict[int, _Writer] = {}
        self._log: list[tuple[int, int, int]] = []
        self._last_delivery: float | None = None

    def on_message(self, data: bytes) -> None:
        size = len(data)
        try:
            writer_id, seq = verify_payload(data)
            error = None
        except PayloadError as exc:
            writer_id = seq = CORRUPTED
            error = str(exc)
        if self._journal is not None:
            os.write(self._journal, b"%d %d %d\n" % (self._pid, writer_id, seq))
        with self._lock:
            self._delivered += 1
            self._bytes += size
            self._last_delivery = time.monotonic()
            if len(self._log) < self._log_limit:
                self._log.append((writer_id, seq, size))
            if error is not None:
                self._corrupted += 1
                if len(self._errors) < _ERRORS_KEPT:
                    self._errors.append(error)
                logger.error("corrupted message: {}", error)
            elif writer_id == ANONYMOUS:
                self._anonymous[size] += 1
            else:
                writer = self._writers.get(writer_id)
                if writer is None:
                    writer = self._writers[writer_id] = _Writer()
                writer.delivered += 1
                if seq in writer.seen:
                    writer.duplicates += 1
                else:
                    if seq < writer.highest:
                        writer.out_of_order += 1
                    writer.seen.add(seq)
                    writer.highest = max(writer.highest, seq)
        if self.delay:
            time.sleep(self.delay)  # the consumer's work per message

    def stats(self, *, log: bool) -> dict[str, Any]:
        with self._lock:
            writers = {
                str(writer_id): {
                    "delivered": w.delivered,
                    "duplicates": w.duplicates,
                    "out_of_order": w.out_of_order,
                    "seqs": _ranges(w.seen),
                }
                for writer_id, w in self._writers.items()
            }
            result: dict[str, Any] = {
                "delivered": self._delivered,
                "bytes": self._bytes,
                "corrupted": self._corrupted,
                "errors": list(self._errors),
                "anonymous": {str(size): n for size, n in self._anonymous.items()},
                "writers": writers,
                "duplicates": sum(w.duplicates for w in self._writers.values()),
                "out_of_order": sum(w.out_of_order for w in self._writers.values()),
                "last_delivery": self._last_delivery,
            }
            if log:
                result["log"] = [list(entry) for entry in self._log]
        return result


def thread_stacks() -> str:
    """Where every thread of this process is right now (for diagnosing a hang)."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        stack = "".join(traceback.format_stack(frame, limit=12))
        parts.append(f"--- thread {names.get(ident, ident)}\n{stack}")
    return "\n".join(parts)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.receiver_child")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any; else rebind this one")
    parser.add_argument("--max-message-size", type=int, default=None)
    parser.add_argument("--max-buffered-bytes", type=int, default=None)
    parser.add_argument("--max-sessions", type=int, default=None)
    parser.add_argument("--frame-timeout", type=float, default=None)
    parser.add_argument(
        "--idle-timeout", default="300", help="seconds, or 'none' for no idle timeout"
    )
    parser.add_argument("--delay", type=float, default=0.0, help="seconds per message")
    parser.add_argument("--log-limit", type=int, default=100_000)
    parser.add_argument("--journal", default=None, help="append each delivery to this file")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--bind-timeout",
        type=float,
        default=10.0,
        help="how long to retry binding a fixed port that is still in use",
    )
    return parser.parse_args(argv)


def _start(receiver: MultiStreamReceiver, bind_timeout: float) -> None:
    deadline = time.monotonic() + bind_timeout
    while True:
        try:
            receiver.start()
            return
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
        # The previous owner of the port is still being torn down by the kernel; there is
        # nothing to wait on but the clock.
        threading.Event().wait(0.05)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    out = take_stdout()
    logger.remove()
    logger.add(
        sys.stderr,
        level=args.log_level,
        format="{time:HH:mm:ss.SSS} {level} [receiver] {message} {extra}",
    )
    logger.enable("dwcp")
    journal = None
    if args.journal is not None:
        journal = os.open(args.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    ledger = Ledger(delay=args.delay, log_limit=args.log_limit, journal=journal)
    options: dict[str, Any] = {}
    if args.max_message_size is not None:
        options["max_message_size"] = args.max_message_size
    if args.max_buffered_bytes is not None:
        options["max_buffered_bytes"] = args.max_buffered_bytes
    if args.max_sessions is not None:
        options["max_sessions"] = args.max_sessions
    if args.frame_timeout is not None:
        options["frame_timeout"] = args.frame_timeout
    idle = None if args.idle_timeout.lower() == "none" else float(args.idle_timeout)
    try:
        receiver = MultiStreamReceiver(
            (args.host, args.port), on_message=ledger.on_message, idle_timeout=idle, **options
        )
        _start(receiver, args.bind_timeout)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        send(out, {"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    host, port = receiver.address
    send(out, {"ready": True, "address": [host, port]})

    def stats(log: bool = False) -> dict[str, Any]:
        result = ledger.stats(log=log)
        result["receiver_delivered"] = receiver.delivered_count
        result["sessions"] = receiver.session_count
        result["duplicates_dropped"] = receiver.duplicates_dropped
        return result

    def wait_delivered(count: int, timeout: float) -> bool:
        return receiver.wait_delivered(count, timeout)

    def set_delay(seconds: float) -> None:
        ledger.delay = seconds

    def stop() -> None:
        receiver.stop()

    def stacks() -> str:
        return thread_stacks()

    try:
        serve(
            out,
            {
                "stats": stats,
                "wait_delivered": wait_delivered,
                "set_delay": set_delay,
                "stacks": stacks,
                "stop": stop,
            },
        )
    finally:
        receiver.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
