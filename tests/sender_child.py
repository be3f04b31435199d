"""A legitimate acknowledged sender in a process of its own: ``python -m tests.sender_child``.

Tests that run something heavy in the test process (the hypothesis engine, whose gen-2
collections were measured at up to 2 s on a loaded machine) use it beside their receiver, so
the sender keeps its pace whatever the test process does: a sender that shares the test's
interpreter is silenced by every such pause, and a receiver with a short ``idle_timeout``
then rightly closes its connections. The child sends ``make_payload(writer, seq, size)`` for
seq = 0, 1, ... one every ``--pace`` seconds (sizes cycling through ``--sizes``) until told
to finish. Commands (``tests.procs.SenderProcess``): ``status`` -> ``{"sent": n, "errors":
[...]}`` (seqs ``0 .. n-1`` returned from ``send()``); ``finish`` stops sending, flushes
within ``timeout`` and answers as ``status``; ``stop`` closes the transport and exits.
"""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Any

from loguru import logger

from dwcp import MultiStreamTCPTransport, TransportError
from tests._control import send, serve, take_stdout
from tests.payload import make_payload


class Sender(threading.Thread):
    """Sends paced messages until ``halt`` is set; the first TransportError ends it."""

    def __init__(
        self, transport: MultiStreamTCPTransport, writer: int, sizes: list[int], pace: float
    ) -> None:
        super().__init__(name="child-sender", daemon=True)
        self.transport = transport
        self.writer = writer
        self.sizes = sizes
        self.pace = pace
        self.sent = 0  # written by this thread only; an int read is atomic
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        seq = 0
        while not self.halt.wait(self.pace):
            size = self.sizes[seq % len(self.sizes)]
            try:
                self.transport.send(make_payload(self.writer, seq, size))
            except TransportError as exc:
                self.errors.append(repr(exc))
                logger.error("send failed: {}", exc)
                return
            seq += 1
            self.sent = seq


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.sender_child")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--writer", type=int, required=True)
    parser.add_argument("--sizes", default="6,100,3072,9223", help="comma-separated, cycled")
    parser.add_argument("--pace", type=float, default=0.005, help="seconds between sends")
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--send-timeout", type=float, default=10.0)
    parser.add_argument("--keepalive-interval", type=float, default=5.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    out = take_stdout()
    logger.remove()
    logger.add(sys.stderr, level="INFO", format="{time:HH:mm:ss.SSS} {level} [sender] {message}")
    logger.enable("dwcp")
    try:
        transport = MultiStreamTCPTransport(
            (args.host, args.port),
            streams=args.streams,
            chunk_size=args.chunk_size,
            acknowledged=True,
            send_timeout=args.send_timeout,
            keepalive_interval=args.keepalive_interval,
        )
        transport.start()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        send(out, {"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    sender = Sender(transport, args.writer, [int(s) for s in args.sizes.split(",")], args.pace)
    sender.start()
    send(out, {"ready": True})

    def status() -> dict[str, Any]:
        return {"sent": sender.sent, "errors": list(sender.errors)}

    def finish(timeout: float) -> dict[str, Any]:
        sender.halt.set()
        sender.join(timeout)
        if sender.is_alive():
            raise RuntimeError(f"the sending thread did not stop within {timeout:g} s")
        if not sender.errors:
            transport.flush(timeout)
        return status()

    def stop() -> None:
        sender.halt.set()
        sender.join(args.send_timeout + 5.0)
        transport.close()

    try:
        serve(out, {"status": status, "finish": finish, "stop": stop})
    finally:
        sender.halt.set()
        sender.join(args.send_timeout + 5.0)
        transport.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
