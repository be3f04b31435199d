"""The sender's window of unacknowledged messages: bounded by count and bytes, kept across
sessions so that the next session can resend them (see docs/wire-format.md, Replay).

Pure state, no sockets, written by two sides that never share a lock on the hot path:

- the senders ``add`` a message under the session's order lock, the same critical section
  that gives it its id, after checking ``fits`` there. Only they move ``last`` and ``added``;
- the session's readers ``ack`` cumulatively under the window's lock. Only they move
  ``acked`` and ``freed``.

Each counter has one writer and only grows, so a reader that is not its writer can only
under-estimate the room (a stale ``acked``, a stale ``freed``), never over-fill the window:
``fits`` checked under the order lock is exact about everything that makes room smaller.
Every acknowledged message is added, so the entries are the payloads of the contiguous ids
``acked + 1`` .. ``last``. ``wait_room`` serves a send that found no room, ``wait_acked``
serves ``flush()`` and ``send(wait=True)``.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from itertools import repeat

__all__ = ["Window"]

_monotonic = time.monotonic
_popleft = collections.deque.popleft


class Window:
    """Unacknowledged messages in id order, with the room they take (count and bytes)."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.lock = threading.Lock()
        # Two conditions on one lock: an ACK wakes the senders waiting for room, and every
        # waiter for an acknowledgement.
        self._room = threading.Condition(self.lock)
        self._acked = threading.Condition(self.lock)
        #: The payloads of messages ``acked + 1`` .. ``last``, in id order. Appended to by
        #: the senders (under the order lock) while ``ack`` takes from the other end under
        #: ``lock``: each is one atomic deque operation.
        self.entries: collections.deque[bytes] = collections.deque()
        #: The highest message id added (-1: none yet); written under the order lock.
        self.last = -1
        #: Bytes ever added; written under the order lock.
        self.added = 0
        #: The highest message id acknowledged (-1: none yet); written under ``lock``.
        self.acked = -1
        #: Bytes ever acknowledged; written under ``lock``.
        self.freed = 0
        #: The first message id, and the ``added`` total, past the room: derived from
        #: ``acked`` and ``freed`` by ``ack``, so that a send compares twice, not computes.
        self.id_limit = max_messages
        self.byte_limit = max_bytes
        #: Since when the oldest unacknowledged message has headed the window: when the
        #: window last went from empty to not, an ACK confirmed the one before it, or a
        #: replay resent it. The keepalive and the sends measure the ACK timeout from here.
        self.since = 0.0
        self._room_waiting = 0  # threads in wait_room(): notified only when some wait
        self._ack_waiting = 0  # threads in wait_acked()
        #: Called once by the next ACK (see ``call_on_room``); None: nobody asked.
        self._room_hook: Callable[[], None] | None = None

    def fits(self, size: int) -> bool:
        """Whether the next message, of ``size`` bytes, has room now (exact under the order
        lock). A message larger than the whole byte window still goes, alone.
        """
        return (
            self.last < self.id_limit - 1 and self.added + size <= self.byte_limit
        ) or self.last == self.acked

    def add(self, message_id: int, data: bytes) -> None:
        """Record a sent message that ``fits``; the caller holds the session's order lock.

        The sender's small-message path does the same inline (a call costs as much).
        """
        # The entries' ids are implied by their places: a gap would misnumber a replay.
        assert message_id == self.last + 1, (message_id, self.last)
        if self.last == self.acked:
            self.since = _monotonic()
        self.entries.append(data)
        self.last = message_id
        self.added += len(data)

    def wait_room(self, size: int, deadline: float, broken: Callable[[], bool]) -> bool:
        """Wait until a message of ``size`` bytes ``fits``; False if ``deadline`` passed or
        ``broken()`` turned true first (the session ended: its acknowledgements will not come).

        The caller re-checks ``fits`` under the order lock before it adds: other sends may
        take the room first.
        """
        with self.lock:
            self._room_waiting += 1
            try:
                while not self.fits(size):
                    left = deadline - _monotonic()
                    if left <= 0 or broken():
                        return False
                    self._room.wait(left)
            finally:
                self._room_waiting -= 1
            return True

    def call_on_room(self, hook: Callable[[], None]) -> None:
        """Have the next ACK that frees room call ``hook`` once, on the reader's thread and
        holding no lock of the window: for a sender that waits for room without blocking in
        ``wait_room`` (``Manager.deliver()``'s thread, which settles messages meanwhile). The
        caller looks at ``fits`` again after this: room freed just before it calls no hook."""
        with self.lock:
            self._room_hook = hook

    def ack(self, through: int) -> int:
        """Every message up to ``through`` was delivered: drop them; return how many."""
        freed = self._ack(through)
        if freed and self._room_hook is not None:  # unlocked peek: one attribute read per ACK
            with self.lock:
                hook, self._room_hook = self._room_hook, None
            if hook is not None:
                hook()
        return freed

    def _ack(self, through: int) -> int:
        with self.lock:
            freed = min(through - self.acked, len(self.entries))
            if freed <= 0:
                return 0  # cumulative: at or below one already taken changes nothing
            self.acked = through
            # Popped and measured in C: no Python loop per message on the reader thread.
            self.freed += sum(map(len, map(_popleft, repeat(self.entries, freed))))
            self.id_limit = through + 1 + self.max_messages
            self.byte_limit = self.freed + self.max_bytes
            self.since = _monotonic()
            if self._room_waiting:
                # Every waiter looks again: the room may fit a later, smaller message and not
                # the first waiter's, and one ACK frees up to 128 messages' room anyway.
                self._room.notify_all()
            if self._ack_waiting:
                self._acked.notify_all()
        return freed

    def wait_acked(self, message_id: int, deadline: float, broken: Callable[[], bool]) -> bool:
        """Wait until ``message_id`` is acknowledged; False at ``deadline`` or once ``broken()``."""
        with self.lock:
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
        with self.lock:
            self._room.notify_all()
            self._acked.notify_all()

    def replay(self) -> list[tuple[int, bytes]]:
        """The unacknowledged messages with their ids, in order; the ACK timeout restarts
        (they are resent now). Called with no session running, so nothing is added meanwhile."""
        with self.lock:
            self.since = _monotonic()
            return list(enumerate(self.entries, self.acked + 1))

    def waiting_since(self) -> float | None:
        """Since when the oldest unacknowledged message has waited at the head of the window
        (None: nothing awaits an acknowledgement)."""
        with self.lock:
            return self.since if self.entries else None

    @property
    def pending(self) -> int:
        """How many messages await their acknowledgement."""
        return len(self.entries)
