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

from dwcp.transport.wire import ID_WINDOW, ProtocolError

__all__ = ["FRAME_OVERHEAD", "Closed", "FrameTuple", "Ready", "Reassembly"]

# What a chunk costs beyond its payload (its entry, dict slot, list slot), so a flood of
# empty frames is bounded by the same byte budget as large ones.
FRAME_OVERHEAD = 64

# Ready messages (or bytes) that wake the delivery thread even while a reader is busy.
ANNOUNCE_COUNT = 64
ANNOUNCE_BYTES = 1 << 20


# A payload: one bytes-like object, or a list of pieces (a large frame read in parts).
Payload = bytes | bytearray | list[bytes | bytearray]


class Closed(Exception):
    """The session was closed (by another thread, or stop()); the caller just leaves."""


# A frame as the readers hand it over: (message id, chunk index, chunk count, total
# length, payload, payload length). Plain tuples: a reader builds hundreds of thousands a
# second, and a NamedTuple's constructor runs Python code.
FrameTuple = tuple[int, int, int, int, Payload, int]


# A whole message for the delivery thread: (message id, payload, cost, stream of chunk 0);
# the payload is its bytes, or a list of pieces that joined are its bytes.
Ready = tuple[int, Payload, int, int]


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

    def __init__(self, streams: int, *, max_buffered: int, first_id: int = 0) -> None:
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        # The delivery thread sleeps on this lock (released once to wake it): one C call
        # per wake-up where a Condition runs Python code, and this happens per message at
        # large sizes.
        self._kick = threading.Lock()
        self._kick.acquire()
        self._taker_asleep = False
        # An ACK was asked for while the delivery thread was not waiting: its next ``take``
        # returns at once (see ``nudge``).
        self._nudged = False
        self._taken = 0  # cost of what take() handed out and done() has not yet freed
        self._max_buffered = max_buffered
        # The session's first message id (HELLO): ids below it never arrive.
        self._last_id = [first_id] * streams
        self._ended_streams = 0
        self._streams = streams
        self.next_id = first_id
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
        #: Closed without ``drain`` (only the receiver's ``stop()`` does): what the
        #: delivery thread took but has not yet handed on is dropped too.
        self.dropped = False

    # -- the readers' side --------------------------------------------------------------

    def push(self, stream: int, frames: Sequence[FrameTuple]) -> int:
        """Admit and store ``frames`` (read in this order from ``stream``) under one lock.

        Returns how many were taken: it stops at the first frame that does not fit the
        budget (``wait_for_room``, then push the rest). Raises ProtocolError when a frame
        breaks the rules, Closed when the session is closed.
        """
        taken = 0
        overhead = FRAME_OVERHEAD
        with self._lock:
            if self.closed:
                raise Closed
            ready = self._ready
            last = self._last_id
            partial, complete, budget = self._partial, self._complete, self._max_buffered
            before = len(ready)
            # The fast path keeps the counters in locals, written back before anything
            # else reads them (the slow path, or the end); what it tests against is
            # hoisted, and looked up again after the slow path changed it.
            next_id, gained = self.next_id, 0
            # Bytes of whole messages stored ahead of next_id by the second fast path below,
            # not yet added to ``buffered``.
            stored = 0
            floor = last[stream]
            room = budget - self.buffered
            idle = not self.delivering
            entries = bool(partial or complete)
            window = ID_WINDOW
            try:
                for frame in frames:
                    mid = frame[0]
                    # The common case: the next message, whole in one frame, nothing of it
                    # seen before, and room for it (the rules _admit applies, inlined).
                    if (
                        mid == next_id
                        and frame[2] == 1
                        and frame[3] == frame[5]
                        and mid >= floor
                        and not (entries and (mid in partial or mid in complete))
                        and (gained + stored + frame[5] + overhead <= room or (idle and not gained))
                    ):
                        cost = frame[5] + overhead
                        gained += cost
                        ready.append((mid, frame[4], cost, stream))
                        next_id = mid + 1
                        taken += 1
                        continue
                    # The common case with several streams: a later message, whole in one
                    # frame, nothing of it seen before, within the id window and the budget
                    # (_admit's rules and _store's bookkeeping, inlined): it waits, complete,
                    # for the messages before it from the other streams.
                    if (
                        mid > next_id
                        and frame[2] == 1
                        and frame[3] == frame[5]
                        and mid > floor
                        and mid - next_id < window
                        and not (entries and (mid in partial or mid in complete))
                        and gained + stored + frame[5] + overhead <= room
                    ):
                        cost = frame[5] + overhead
                        stored += cost
                        complete[mid] = (mid, frame[4], cost, stream)
                        last[stream] = floor = mid
                        entries = True
                        taken += 1
                        continue
                    if gained:
                        last[stream] = max(last[stream], next_id - 1)
                    if stored:
                        self._stored(stored)
                        stored = 0
                    next_id = self._settle(next_id, gained, taken)
                    gained = 0
                    message = self._admit(stream, frame)
                    if message is None:
                        break
                    self._store(message, mid, frame[1], frame[4])
                    next_id = self.next_id
                    floor = last[stream]
                    room = budget - self.buffered
                    idle = not self.delivering
                    entries = bool(partial or complete)
                    taken += 1
            finally:
                if gained:
                    last[stream] = max(last[stream], next_id - 1)
                if stored:
                    self._stored(stored)
                if gained:
                    self._settle(next_id, gained, taken)
                if len(ready) != before:
                    self._announce_some()
        return taken

    def _stored(self, cost: int) -> None:
        """Charge the messages the fast path stored ahead of ``next_id`` (``cost`` bytes)."""
        self.buffered += cost
        self.peak = max(self.peak, self.buffered)
        self.progress += 1

    def _settle(self, next_id: int, gained: int, count: int) -> int:
        """Write the fast path's counters back; return the (possibly advanced) next id."""
        if gained:
            self.buffered += gained
            self.delivering += gained
            self.peak = max(self.peak, self.buffered)
            self.progress += 1
            self.next_id = next_id
            if self._complete:
                self._release_following()
        return self.next_id

    def reserve(self, stream: int, frame: FrameTuple) -> bool:
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
            message.chunks[frame[1]] = None
            return True

    def store(self, frame: FrameTuple) -> None:
        """Store the payload of a frame admitted by ``reserve``."""
        with self._lock:
            if self.closed:
                raise Closed
            message = self._partial[frame[0]]
            before = len(self._ready)
            self._store(message, frame[0], frame[1], frame[4])
            if len(self._ready) != before:
                self._announce_some()

    def announce(self) -> None:
        """Wake the delivery thread for whatever is ready (a reader about to block calls it).

        Readers defer the wake-up while more frames keep coming: a thread switch per message
        costs more than the message at tens of thousands a second. ``push`` and ``store``
        still wake it once ``ANNOUNCE_COUNT`` messages or ``ANNOUNCE_BYTES`` bytes wait.
        """
        with self._lock:
            self._wake_taker()

    def wait_for_room(self, frame: FrameTuple, timeout: float | None) -> bool:
        """Block until ``frame`` would be admitted; False when ``timeout`` passed first."""
        cost = frame[5] + FRAME_OVERHEAD
        with self._lock:
            if self.closed:
                raise Closed
            # Only delivery frees room: it must not sleep on messages a reader has not
            # announced yet (readers defer that while they are busy).
            self._wake_taker()
            fits = self._room.wait_for(lambda: self.closed or self._fits(frame[0], cost), timeout)
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
                self.buffered -= ready[2]
            self._partial.clear()
            self._complete.clear()
            self._wake_taker()
            return dropped

    def _fits(self, mid: int, cost: int) -> bool:
        # The next message is admitted over budget once delivery holds nothing: then the
        # budget is all out-of-order data, and only ``next_id`` can free it.
        return self.buffered + cost <= self._max_buffered or (
            mid == self.next_id and not self.delivering
        )

    def _admit(self, stream: int, frame: FrameTuple) -> _Message | None:
        mid, index, count, total, _, length = frame
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
            if (message.count, message.total) != (count, total):
                raise ProtocolError(f"chunk of message {mid} disagrees with its other chunks")
            if index in message.chunks:
                raise ProtocolError(f"chunk {index} of message {mid} received twice")
            if message.received + length > message.total:
                raise ProtocolError(f"chunks of message {mid} exceed its length")
        cost = length + FRAME_OVERHEAD
        if not self._fits(mid, cost):
            return None
        if message is None:
            message = _Message(count, total)
            self._partial[mid] = message
        self._last_id[stream] = mid
        message.cost += cost
        message.received += length
        if index == 0:
            message.ack_stream = stream
        self.buffered += cost
        self.peak = max(self.peak, self.buffered)
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
        if message.count == 1:
            whole = message.chunks[0]
            assert whole is not None
            payload = whole
        else:
            pieces: list[bytes | bytearray] = []
            for i in range(message.count):
                part = message.chunks[i]
                if isinstance(part, list):
                    pieces.extend(part)
                elif part is not None:
                    pieces.append(part)
            payload = pieces
        ready: Ready = (mid, payload, message.cost, message.ack_stream)
        self.progress += 1
        if mid != self.next_id:
            self._complete[mid] = ready
            return
        self._ready.append(ready)
        self.delivering += message.cost
        self.next_id = mid + 1
        if self._complete:
            self._release_following()

    def _release_following(self) -> None:
        """Move the complete messages that now follow in order to delivery."""
        while True:
            following = self._complete.pop(self.next_id, None)
            if following is None:
                return
            self._ready.append(following)
            self.delivering += following[2]
            self.next_id += 1

    # -- the delivery side --------------------------------------------------------------

    def take(self, timeout: float | None = None) -> list[Ready] | None:
        """Return the messages ready for delivery, in id order, waiting up to ``timeout``.

        An empty list means the timeout passed; None means the session is over (closed, or
        ended with everything delivered). One delivery thread calls this.
        """
        with self._lock:
            if self._ready:
                return self._take_all()
            if self.ended:
                return None
            if self._nudged:
                self._nudged = False
                return []
            self._taker_asleep = True
        woken = self._kick.acquire(timeout=-1 if timeout is None else timeout)
        with self._lock:
            if not woken:
                if self._taker_asleep:
                    self._taker_asleep = False  # a real timeout
                else:
                    self._kick.acquire(False)  # woken just as it expired: consume the wake
            if self._ready:
                return self._take_all()
            return None if self.ended else []

    def nudge(self) -> None:
        """An ACK was asked for (a PING in an acknowledged session): the delivery thread's
        ``take`` returns now, or its next one at once if it is not waiting, with what is ready
        or an empty list, so that it decides on an ACK without waiting out its delay."""
        with self._lock:
            if self._taker_asleep:
                self._wake_taker()
            else:
                self._nudged = True

    def last_id(self, stream: int) -> int:
        """The highest message id read on ``stream`` (the session's first id before any);
        only that stream's reader may ask."""
        return self._last_id[stream]

    def _take_all(self) -> list[Ready]:
        batch = list(self._ready)
        self._ready.clear()
        # ``delivering`` is what is ready plus what is being delivered; all of it is now.
        self._taken = self.delivering
        return batch

    def _announce_some(self) -> None:
        # Caller holds the lock.
        if len(self._ready) >= ANNOUNCE_COUNT or self.delivering >= ANNOUNCE_BYTES:
            self._wake_taker()

    def _wake_taker(self) -> None:
        # Caller holds the lock.
        if self._taker_asleep:
            self._taker_asleep = False
            self._kick.release()

    def done(self, cost: int) -> None:
        """The delivery thread handed on messages that cost ``cost``: free their budget."""
        with self._lock:
            self._taken -= cost
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
                self.dropped = True
            # What stays charged: the ready messages kept, and a batch being delivered
            # (its done() is still to come).
            kept = self.delivering if drain else self._taken
            self.buffered = self.delivering = kept
            self._room.notify_all()
            self._wake_taker()

    @property
    def pending(self) -> int:
        """How many messages are partly or wholly received but not yet delivered."""
        with self._lock:
            return len(self._partial) + len(self._complete) + len(self._ready)
