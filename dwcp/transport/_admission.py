"""Admission: room for a message in a session, first come first served.

A message is queued whole (every chunk on every lane, under the session's order lock) or
not at all. A send that finds no room (a stream's outbox at its limit, or the window full)
joins the queue of waiters; only its head waits for room, the others for their turn, and a
later sender queues behind them. A send still without room at its deadline fails alone:
nothing of it was queued, and the session goes on. Once queued, a message is written however
slowly the receiver reads; only a write that can write nothing for send_timeout (the peer
stopped reading), or a dead connection, breaks the session.

``take_contended`` takes the session's order lock when another sender holds it.
``Admission`` is the part of the session (``_session.Session``) that sends wait in; when a
write is stalled or acknowledgements are overdue is decided in the core (``_sending``).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import NoReturn

from dwcp._errors import TransportError
from dwcp.transport._sending import ACK_TIMEOUT_REASON, OUTBOX_LIMIT, ack_overdue, stalled
from dwcp.transport._window import Window
from dwcp.transport._writer import Batch, Stream

__all__ = ["YIELDS", "Admission", "take_contended"]

_monotonic = time.monotonic
# How often a sender that finds the order lock taken yields the GIL before it blocks.
YIELDS = 16
_sleep = time.sleep


def take_contended(order: threading.Lock) -> None:
    """Take the session's order lock, found held by another sender.

    Its holder holds it only to run a few hundred opcodes (no I/O), so what it lacks is the
    GIL, not time: this thread yields the GIL (``sleep(0)``) and tries again, and blocks only
    after ``YIELDS`` tries. Blocking at once made every waiter depend on a wake-up from the
    holder's release, and under the GIL those hand-offs chain into a convoy: 8 threads
    sending 1 KiB messages delivered 79-83 kmsg/s, against 118-130 with this in alternated
    runs (benchmarks/README.md, session 4).
    """
    for _ in range(YIELDS):
        _sleep(0)
        if order.acquire(False):
            return
    order.acquire()


def _root(exc: BaseException | None) -> BaseException | None:
    """The socket error under ``exc``: a writer's ``TransportError`` reaches a waiting
    sender wrapped, and README promises the socket error itself as ``__cause__``."""
    while isinstance(exc, TransportError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


class Admission:
    """The waiters' queue of a session and the waits of its sends, with the errors they end
    in; ``Session`` sets the attributes annotated here."""

    streams: list[Stream]
    window: Window | None
    send_timeout: float
    # How long a receiver may go without saying it is alive while a write makes no
    # progress (see _sending.stalled); None: no keepalive, so nothing to hear from it.
    life: float | None
    broken: str | None
    broken_code: str
    closing: bool
    sealed: bool
    broken_cause: BaseException | None

    def __init__(self) -> None:
        # Senders that found no room, first come first served. Joined under the order lock;
        # ``waiters`` (its length) is read there without this lock, so a sender that comes
        # later queues behind them instead of taking the room they wait for.
        self._queue: collections.deque[object] = collections.deque()
        self._queue_lock = threading.Lock()
        self._turn = threading.Condition(self._queue_lock)
        self.waiters = 0

    def ended(self) -> bool:
        """Whether the session broke or is closing (its acknowledgements will not come)."""
        return self.broken is not None or self.closing

    def refusing(self) -> bool:
        """Whether a send is refused: the session broke, or ``close()`` began (sealed)."""
        return self.broken is not None or self.sealed

    def raise_broken_from(self, exc: BaseException | None) -> NoReturn:
        """``raise_broken``, chained to ``exc`` (what this caller saw) where given."""
        if self.broken is None:
            raise TransportError("transport closed; start() it again", code="NOT_STARTED")
        error = TransportError(
            f"transport broken: {self.broken}; restart it", code=self.broken_code
        )
        cause = _root(exc if exc is not None else self.broken_cause)
        if cause is None:
            raise error
        raise error from cause

    def raise_broken(self) -> NoReturn:
        """Raise the session's fault, chained to the socket error that caused it (if a
        socket call failed); or, not broken but closed (``close()`` began), the error of a
        transport not started (README: sends after ``close()``)."""
        self.raise_broken_from(None)

    def wake_waiters(self) -> None:
        """Wake every send waiting for its turn (the session ended)."""
        with self._turn:
            self._turn.notify_all()

    def enqueue(self) -> object:
        """Join the waiters' queue; the caller holds the order lock."""
        me = object()
        with self._queue_lock:
            self._queue.append(me)
            self.waiters = len(self._queue)
        return me

    def leave(self, me: object) -> None:
        """Leave the waiters' queue (admitted, or given up); the next one's turn if ours."""
        with self._queue_lock:
            head = self._queue[0] is me
            self._queue.remove(me)
            self.waiters = len(self._queue)
            if head:
                self._turn.notify_all()

    def heads(self, me: object) -> bool:
        # Read without the queue lock: only ``me`` leaving can make it stop being the head.
        return self._queue[0] is me

    def await_turn(self, me: object, size: int, deadline: float) -> None:
        """Wait until ``me`` heads the waiters' queue; raise at ``deadline`` (nothing sent)."""
        with self._queue_lock:
            while self._queue[0] is not me:
                left = deadline - _monotonic()
                if left <= 0 or self.refusing():
                    break
                self._turn.wait(left)
            else:
                return
        if self.refusing():
            self.raise_broken()
        window = self.window
        if window is not None and not window.fits(size):
            self.window_error(size)  # the window is what the queue waits for
        self.backpressure()

    def backpressure(self) -> NoReturn:
        raise TransportError(
            f"no room to queue the message within send_timeout ({self.send_timeout:g} s): "
            "the receiver takes messages more slowly than they are sent; nothing was sent",
            code="BACKPRESSURE",
        )

    def wait_for_room(self, stream: Stream, deadline: float) -> None:
        """Backpressure: wait until ``stream``'s outbox is below its limit; TransportError
        (code ``BACKPRESSURE``) at ``deadline``, the session left alone.

        Unless the stream's write is stalled by then: its writer alone decides that and
        breaks the session, within one tick of its kernel timeout; this send waits for that
        decision and reports it, so a stall gives the same error whichever thread sees it.
        """
        extended = False
        with stream.drained:
            stream.waiting += 1
            try:
                while stream.queued >= OUTBOX_LIMIT:
                    if self.broken is not None or self.sealed:
                        self.raise_broken()
                    left = deadline - _monotonic()
                    if left <= 0:
                        if extended or not self.stalled(stream):
                            self.backpressure()
                        # Bounded: the writer ticks every send_timeout / 8, and a loaded
                        # machine may run it late, hence a whole send_timeout more.
                        extended = True
                        deadline = _monotonic() + self.send_timeout
                        continue
                    stream.drained.wait(left)
            finally:
                stream.waiting -= 1

    def stalled(self, stream: Stream) -> bool:
        """Whether ``stream``'s write is under way and stalled (see ``_sending.stalled``)."""
        if not stream.busy:
            return False
        return stalled(_monotonic(), stream.progress, stream.heard, self.send_timeout, self.life)

    def wait_for_window(self, size: int, deadline: float) -> None:
        """Acknowledged: wait until the window has room for ``size`` bytes, or raise
        TransportError: ``WINDOW_FULL`` while acknowledgements still come, only too slowly
        for this send, ``ACK_TIMEOUT`` when none came for send_timeout (the session breaks).
        Either way nothing was sent.

        Only the keepalive thread decides that acknowledgements are overdue and breaks the
        session for it: a send that finds them overdue waits for that decision (one tick of
        that thread) and reports it, so the fault gives ``ACK_TIMEOUT`` whichever thread
        notices it first.
        """
        window = self.window
        assert window is not None
        if window.wait_room(size, deadline, self.refusing):
            return
        self.window_error(size)

    def window_error(self, size: int) -> NoReturn:
        """Raise the error of a send that found no room in the window by its deadline (see
        ``wait_for_window``)."""
        window = self.window
        assert window is not None
        if not self.refusing() and self.ack_overdue():
            # Bounded: the keepalive thread ticks every send_timeout / 4 at most; a loaded
            # machine may run it late, hence the whole send_timeout.
            window.wait_room(size, _monotonic() + self.send_timeout, self.refusing)
        if self.refusing():
            self.raise_broken()
        if self.ack_overdue():  # the keepalive thread is late: same fault, same code
            raise TransportError(
                f"{ACK_TIMEOUT_REASON.format(self.send_timeout)}: {window.pending} messages "
                "unacknowledged; they are kept and resent after a restart",
                code="ACK_TIMEOUT",
            )
        # Acknowledgements come, only slower than this send could wait for room: the link is
        # not broken, this send just took nothing.
        raise TransportError(
            f"the window stayed full for send_timeout ({self.send_timeout:g} s); nothing was sent",
            code="WINDOW_FULL",
        )

    def ack_overdue(self) -> bool:
        """Acknowledged: whether acknowledgements are overdue now (see
        ``_sending.ack_overdue``): a receiver that answers but does not confirm is waiting
        for a slow consumer, backpressure (``WINDOW_FULL`` for the sends that find no
        room), not a fault."""
        window = self.window
        since = None if window is None else window.waiting_since()
        if since is None:
            return False
        heard = max(stream.heard for stream in self.streams)
        return ack_overdue(_monotonic(), since, heard, self.send_timeout, self.life)

    def await_written(self, batch: Batch) -> None:
        """Wait until the writers wrote a queued message: they read the caller's buffer until
        then, so never return before. Bounded: every write makes progress or fails within
        send_timeout, and a failure ends every write of the session."""
        batch.done.wait()
        if self.broken is not None:
            # The session's fault, not what it did to this write (a broken pipe, say).
            self.raise_broken_from(batch.error)
        if batch.error is not None:
            raise TransportError(f"transport broken: {batch.error}") from _root(batch.error)
