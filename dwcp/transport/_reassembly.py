"""Reassembly of one receiver session: chunks in, whole messages out in id order, memory bounded.

Pure state under one lock, no sockets, so every interleaving can be tested directly. The
reader threads (one per stream) ``push`` the frames they parsed; one delivery thread
``take``s whole messages in message-id order and calls ``done`` when it has handed them on.

Why it cannot deadlock: the sender writes each stream's frames in message-id order (the
wire format requires it and ``push`` enforces it), and a frame of ``next_id``, the next
message to complete, is always admitted once the delivery side holds nothing. A reader can
only wait on a frame of a later message, and then every frame of ``next_id`` on its stream
is already behind it; readers of the other streams are either reading or in the same
position. So ``next_id`` completes, and the budget frees, whatever the interleaving.

Memory: bytes charged are the payload bytes received plus ``FRAME_OVERHEAD`` a frame, and
they stay under ``max_buffered + max_message_size`` (the over-budget frames of ``next_id``).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence
from typing import NamedTuple

from dwcp.transport.wire import ID_WINDOW, ProtocolError

__all__ = ["FRAME_OVERHEAD", "Closed", "Frame", "Reassembly", "Ready"]

# What a chunk costs beyond its payload (its entry, dict slot, list slot), so a flood of
# empty frames is bounded by the same byte budget as large ones.
FRAME_OVERHEAD = 64

# A payload: one bytes-like object, or a list of pieces (a large frame read in parts).
Payload = bytes | bytearray | list[bytes | bytearray]


class Closed(Exception):
    """The session was closed (by another thread, or stop()); the caller just leaves."""


class Frame(NamedTuple):
    """One DATA frame's place in its message, and its payload."""

    message_id: int
    chunk_index: int
    chunk_count: int
    total_length: int
    payload: Payload
    length: int


class Ready(NamedTuple):
    """A whole message for the delivery thread; ``pieces`` joined are its bytes."""

    message_id: int
    pieces: list[bytes | bytearray]
    cost: int
    ack_stream: int


class _Message:
    __slots__ = ("ack_stream", "chunks", "cost", "count", "left", "received", "total")

    def __init__(self, count: int, total: int) -> None:
        self.count = count
        self.total = total
        self.left = count
        self.received = 0
        self.cost = 0
        # A dict, not a list of ``count`` slots: a header alone must not size an allocation.
        self.chunks: dict[int, Payload | None] = {}
        self.ack_stream = -1


class Reassembly:
    """The receiving state of one session's messages (see the module doc)."""

    def __init__(self, streams: int, *, max_buffered: int) -> None:
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._arrived = threading.Condition(self._lock)
        self._max_buffered = max_buffered
        self._last_id = [0] * streams
        self._ended_streams = 0
        self._streams = streams
        self.next_id = 0
        self._partial: dict[int, _Message] = {}
        self._complete: dict[int, Ready] = {}
        self._ready: collections.deque[Ready] = collections.deque()
        #: Bytes charged now: partial, complete, ready, and being delivered.
        self.buffered = 0
        #: The delivery side's share of ``buffered`` (ready plus being delivered).
        self.delivering = 0
        #: ``closed``: no more input (readers raise Closed); ``ended``: nothing more will be
        #: ready than what ``take`` still returns.
        #: Grows whenever a message completes or is delivered (for stall detection).
        self.progress = 0
        self.peak = 0
        self.closed = False
        self.ended = False

    # -- the readers' side --------------------------------------------------------------

    def push(self, stream: int, frames: Sequence[Frame]) -> int:
        """Admit and store ``frames`` (read in this order from ``stream``) under one lock.

        Returns how many were taken: it stops at the first frame that does not fit the
        budget (``wait_for_room``, then push the rest). Raises ProtocolError when a frame
        breaks the rules, Closed when the session is closed.
        """
        taken = 0
        with self._lock:
            if self.closed:
                raise Closed
            for frame in frames:
                message = self._admit(stream, frame)
                if message is None:
                    break
                self._store(message, frame.message_id, frame.chunk_index, frame.payload)
                taken += 1
        return taken

    def reserve(self, stream: int, frame: Frame) -> bool:
        """Admit a frame before its payload is read; False when it does not fit yet.

        The caller reads the payload and then calls ``store``; the chunk is claimed, so a
        duplicate of it is refused meanwhile.
        """
        with self._lock:
            if self.closed:
                raise Closed
            message = self._admit(stream, frame)
            if message is None:
                return False
            message.chunks[frame.chunk_index] = None
            return True

    def store(self, frame: Frame) -> None:
        """Store the payload of a frame admitted by ``reserve``."""
        with self._lock:
            if self.closed:
                raise Closed
            message = self._partial[frame.message_id]
            self._store(message, frame.message_id, frame.chunk_index, frame.payload)

    def wait_for_room(self, frame: Frame, timeout: float) -> bool:
        """Block until ``frame`` would be admitted; False when ``timeout`` passed first."""
        cost = frame.length + FRAME_OVERHEAD
        with self._lock:
            if self.closed:
                raise Closed
            fits = self._room.wait_for(
                lambda: self.closed or self._fits(frame.message_id, cost), timeout
            )
            if self.closed:
                raise Closed
            return fits

    def end_stream(self) -> int:
        """A stream ended cleanly. When all have, the session has no more input: return how
        many incomplete messages are dropped then (0 before), and let delivery finish."""
        with self._lock:
            self._ended_streams += 1
            if self._ended_streams < self._streams or self.ended:
                return 0
            self.ended = True
            dropped = len(self._partial) + len(self._complete)
            for message in self._partial.values():
                self.buffered -= message.cost
            for ready in self._complete.values():
                self.buffered -= ready.cost
            self._partial.clear()
            self._complete.clear()
            self._arrived.notify_all()
            return dropped

    def _fits(self, mid: int, cost: int) -> bool:
        # The next message is admitted over budget once delivery holds nothing: then the
        # budget is all out-of-order data, and only ``next_id`` can free it.
        return self.buffered + cost <= self._max_buffered or (
            mid == self.next_id and not self.delivering
        )

    def _admit(self, stream: int, frame: Frame) -> _Message | None:
        mid, index = frame.message_id, frame.chunk_index
        if mid < self._last_id[stream]:
            raise ProtocolError(
                f"message {mid} after message {self._last_id[stream]} on stream {stream}: "
                "ids must not decrease on a stream"
            )
        if mid < self.next_id or mid in self._complete:
            raise ProtocolError(f"message {mid} received twice")
        if mid - self.next_id >= ID_WINDOW:
            raise ProtocolError(f"message id {mid} too far ahead of {self.next_id}")
        message = self._partial.get(mid)
        if message is not None:
            if (message.count, message.total) != (frame.chunk_count, frame.total_length):
                raise ProtocolError(f"chunk of message {mid} disagrees with its other chunks")
            if index in message.chunks:
                raise ProtocolError(f"chunk {index} of message {mid} received twice")
            if message.received + frame.length > message.total:
                raise ProtocolError(f"chunks of message {mid} exceed its length")
        cost = frame.length + FRAME_OVERHEAD
        if not self._fits(mid, cost):
            return None
        if message is None:
            message = _Message(frame.chunk_count, frame.total_length)
            self._partial[mid] = message
        self._last_id[stream] = mid
        message.cost += cost
        message.received += frame.length
        if index == 0:
            message.ack_stream = stream
        self.buffered += cost
        if self.buffered > self.peak:
            self.peak = self.buffered
        return message

    def _store(self, message: _Message, mid: int, index: int, payload: Payload) -> None:
        message.chunks[index] = payload
        message.left -= 1
        if message.left:
            return
        del self._partial[mid]
        if message.received != message.total:
            raise ProtocolError(
                f"message {mid} is {message.received} bytes, its header says {message.total}"
            )
        pieces: list[bytes | bytearray] = []
        for i in range(message.count):
            part = message.chunks[i]
            if isinstance(part, list):
                pieces.extend(part)
            elif part is not None:
                pieces.append(part)
        ready = Ready(mid, pieces, message.cost, message.ack_stream)
        self.progress += 1
        if mid != self.next_id:
            self._complete[mid] = ready
            return
        # The next message: it and every complete one after it go to delivery, in order.
        while True:
            self._ready.append(ready)
            self.delivering += ready.cost
            self.next_id += 1
            following = self._complete.pop(self.next_id, None)
            if following is None:
                break
            ready = following
        self._arrived.notify()

    # -- the delivery side --------------------------------------------------------------

    def take(self, timeout: float | None = None) -> list[Ready] | None:
        """Return the messages ready for delivery, in id order, waiting up to ``timeout``.

        An empty list means the timeout passed; None means the session is over (closed, or
        ended with everything delivered).
        """
        with self._lock:
            if not self._ready and not self.ended:
                self._arrived.wait(timeout)
            if self.ended and not self._ready:
                return None
            batch = list(self._ready)
            self._ready.clear()
            return batch

    def done(self, cost: int) -> None:
        """The delivery thread handed on messages that cost ``cost``: free their budget."""
        with self._lock:
            self.buffered -= cost
            self.delivering -= cost
            self.progress += 1
            self._room.notify_all()

    def close(self, *, drain: bool = False) -> None:
        """Take no more input and wake every waiting reader (they raise Closed).

        With ``drain`` the messages already whole and in order stay for ``take`` (their
        bytes were verified; a later fault does not unmake them); otherwise all is dropped.
        """
        with self._lock:
            self.closed = True
            self.ended = True
            self._partial.clear()
            self._complete.clear()
            if not drain:
                self._ready.clear()
            self.buffered = self.delivering = sum(ready.cost for ready in self._ready)
            self._room.notify_all()
            self._arrived.notify_all()

    @property
    def pending(self) -> int:
        """How many messages are partly or wholly received but not yet delivered."""
        with self._lock:
            return len(self._partial) + len(self._complete) + len(self._ready)
