"""A receiver that processes every message exactly once, across its own restarts (SIGKILL
included), with ``with_ids`` and ``resume_from``.

    python3 examples/exactly_once_receiver.py PORT FILE [--work SECONDS]

Processing a message here means appending ``sender_id message_id payload`` to FILE, one
line per message, written before ``on_message`` returns: the receiver confirms a message
only once ``on_message`` returned, so whatever the sender no longer resends is in the file.
At start the file is read back and the last message id per sender goes to ``resume_from``:
what a sender resends after the restart, and this process had processed, is dropped.

The line is handed to the operating system at once (one ``write()`` each), which survives
the process being killed; add ``os.fsync()`` per message to survive a power loss too. A kill
can still land inside that ``write()`` of a long line and leave its first part in the file:
such a message was not confirmed (``on_message`` had not returned), so the sender resends it,
and the torn part is cut off the file at the next start, before anything is appended to it.
``--work`` sleeps that long per message, standing in for real processing. Prints ``ready``
once listening; SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import signal
import string
import threading
import time

import dwcp

_HEX = set(string.hexdigits)
_SENDERS_KEPT = 4096  # the most senders resume_from takes (README)


def processed(path: str) -> dict[str, int]:
    """The last message id recorded in ``path`` per sender, for the 4,096 senders seen last.

    A torn last line (the process was killed inside its ``write()``) is cut off the file
    first: the next record would otherwise be appended to it and both would be unreadable.
    Lines that are not ``sender_id message_id payload`` are skipped."""
    last: dict[str, int] = {}
    try:
        with open(path, "r+b") as records:
            data = records.read()
            whole = data.rfind(b"\n") + 1
            if whole < len(data):
                records.truncate(whole)
    except FileNotFoundError:
        return last
    for line in data[:whole].decode(errors="replace").splitlines():
        fields = line.split(" ", 2)
        if (
            len(fields) == 3
            and _is_sender_id(fields[0])
            and fields[1].isascii()
            and fields[1].isdigit()
        ):
            sender = fields[0]
            # Re-inserted, so that the dict runs from the least to the most recently seen.
            last[sender] = max(last.pop(sender, -1), int(fields[1]))
    # resume_from takes the positions of at most _SENDERS_KEPT senders, and a live receiver
    # forgets the least recently seen first: do the same.
    return dict(list(last.items())[-_SENDERS_KEPT:])


def _is_sender_id(text: str) -> bool:
    """32 hex digits, not all zero: what ``with_ids`` hands ``on_message``."""
    return len(text) == 32 and set(text) <= _HEX and set(text) != {"0"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("file")
    parser.add_argument("--work", type=float, default=0.0)
    args = parser.parse_args()

    # Line-buffered: one write() per line.
    with open(args.file, "a", buffering=1) as records:
        lock = threading.Lock()  # two senders' sessions may deliver at once

        def on_message(data: bytes, sender_id: str, message_id: int) -> None:
            if args.work:
                time.sleep(args.work)
            with lock:
                records.write(f"{sender_id} {message_id} {data.decode()}\n")

        receiver = dwcp.MultiStreamReceiver(
            ("127.0.0.1", args.port),
            on_message=on_message,
            with_ids=True,
            resume_from=processed(args.file),
        )
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        receiver.start()
        print("ready", flush=True)
        while not stop.wait(0.5):
            pass
        receiver.stop()


if __name__ == "__main__":
    main()
