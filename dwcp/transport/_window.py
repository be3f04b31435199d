"""The sender's window of unacknowledged messages: bounded by count and bytes, kept across
sessions so that the next session can resend them (see docs/wire-format.md, Replay).

Pure state under one lock, no sockets. A send ``reserve``s room (waiting while the window is
full), then ``add``s its message under the session's order lock, so entries are in message-id
order and, as every acknowledged message is added, contiguous. The session's readers ``ack``
cumulatively; ``wait_acked`` serves ``flush()`` and ``send(wait=True)``.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

__all__ = ["Window"]

_monotonic = time.monotonic


class Window:
    """Unacknowledged messages in id order, with the room they take (count and bytes)."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        # ``lock``, ``count``, ``bytes`` and ``entries`` are read and written by the sender's
        # hot path too (reserve's fast case and add, inlined there: a method call costs
        # as much as what they do).
        self.lock = threading.Lock()
        self._lock = self.lock
        # Two conditions on one lock: an ACK wakes as many senders as it freed slots for, and
        # every waiter for an acknowledgement (flush, wait=True).
        self._room = threading.Condition(self._lock)
        self._acked = threading.Condition(self._lock)
        # [message id, bytes, when it was last written]: a list, so a replay can renew the time.
        self.entries: collections.deque[list[object]] = collections.deque()
        self._entries = self.entries
        self.count = 0  # reserved, entries included
        self.bytes = 0
        self._room_waiting = 0  # threads in reserve(): notified only when some wait
        self._ack_waiting = 0  # threads in wait_acked()
        #: The highest message id acknowledged (-1: none yet).
        self.acked = -1
        #: The highest message id added (-1: none yet).
        self.last = -1

    def _fits(self, size: int) -> bool:
        # A message larger than the whole byte window still goes, alone.
        return self.count == 0 or (
            self.count < self.max_messages and self.bytes + size <= self.max_bytes
        )

    def reserve(self, size: int, deadline: float, broken: Callable[[], bool]) -> bool:
        """Take room for one message of ``size`` bytes; False if ``deadline`` passed or
        ``broken()`` turned true first (the session ended: its acknowledgements will not come).
        """
        with self._lock:
            if self._fits(size):
                self.count += 1
                self.bytes += size
                return True
            self._room_waiting += 1
            try:
                while not self._fits(size):
                    left = deadline - _monotonic()
                    if left <= 0 or broken():
                        return False
                    self._room.wait(left)
            finally:
                self._room_waiting -= 1
            self.count += 1
            self.bytes += size
            if self._room_waiting and self._fits(0):
                self._room.notify()  # room for more than this one: pass the wake-up on
            return True

    def cancel(self, size: int) -> None:
        """Give back room reserved for a message that was not sent after all."""
        with self._lock:
            self.count -= 1
            self.bytes -= size
            if self._room_waiting:
                self._room.notify()

    def add(self, message_id: int, data: bytes) -> None:
        """Record a sent message (room reserved); the caller holds the session's order lock."""
        # No lock: deque.append is atomic, and only ack() (under the lock) takes entries
        # out, from the other end; room was counted by reserve(). One contended lock less
        # per message where many threads send.
        self._entries.append([message_id, data, _monotonic()])
        self.last = message_id

    def ack(self, through: int) -> int:
        """Every message up to ``through`` was delivered: drop them; return how many."""
        freed = 0
        with self._lock:
            if through <= self.acked:
                return 0
            self.acked = through
            entries = self._entries
            while entries and entries[0][0] <= through:  # type: ignore[operator]
                data = entries.popleft()[1]
                self.bytes -= len(data)  # type: ignore[arg-type]
                freed += 1
            self.count -= freed
            if self._room_waiting and freed:
                # One waiter; each that gets room passes the wake-up on while room is left
                # (see reserve), so a burst of freed slots does not wake every sender at once.
                self._room.notify()
            if self._ack_waiting:
                self._acked.notify_all()
        return freed

    def wait_acked(self, message_id: int, deadline: float, broken: Callable[[], bool]) -> bool:
        """Wait until ``message_id`` is acknowledged; False at ``deadline`` or once ``broken()``."""
        with self._lock:
            self._ack_waiting += 1
            try:
                while self.acked < message_id:
                    left = deadline - _monotonic()
                    if left <= 0 or broken():
                        return False
                    self._acked.wait(left)
            finally:
                self._ack_waiting -= 1
            return True

    def wake(self) -> None:
        """Wake every waiter so it re-checks ``broken()`` (the session ended)."""
        with self._lock:
            self._room.notify_all()
            self._acked.notify_all()

    def replay(self) -> list[tuple[int, bytes]]:
        """The unacknowledged messages, in id order, their times renewed (they are resent now)."""
        now = _monotonic()
        with self._lock:
            for entry in self._entries:
                entry[2] = now
            return [(e[0], e[1]) for e in self._entries]  # type: ignore[misc]

    def oldest(self) -> float | None:
        """When the oldest unacknowledged message was written (None: nothing awaits an ACK)."""
        with self._lock:
            return self._entries[0][2] if self._entries else None  # type: ignore[return-value]

    @property
    def pending(self) -> int:
        """How many messages await their acknowledgement."""
        return len(self._entries)

    @property
    def pending_bytes(self) -> int:
        """The bytes of reserved and unacknowledged messages."""
        return self.bytes
