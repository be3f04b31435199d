"""Delivery that rides out outages: the queue behind ``Manager.deliver()`` and its thread.

A message accepted by ``deliver()`` counts against a byte budget until it settles. It is
sent, in order, through the manager's guarded send: by the caller when nothing is queued
and nothing stands in the way, otherwise from the queue by one thread (``dwcp-delivery``).
A send that fails is retried, the same message first, after a pause; while the breaker is
open nothing is sent: the thread waits until it reads half-open, and its next send is the
trial. A message whose send returned is in the acknowledged transport's window, which
resends it after reconnects; the thread reads the window's confirmation mark and settles
each handle once the receiver confirmed its message, or fails it once its deadline passed.

Locking: one lock guards the queue, the sent lists, the budget and every handle's state;
sends, breaker reads and user callbacks run with it released. One sender at a time holds
the send path (``_busy``); only it takes from the queue's head (the thread), or puts a
message back there (a caller whose own send failed). Producers append.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

from loguru import logger

from dwcp import _validation as check
from dwcp._delivery import Delivery, DeliveryError, run_callback
from dwcp._errors import CircuitOpenError, DWCPError

if TYPE_CHECKING:
    from dwcp._components import Transport

__all__ = ["Outbox"]

_monotonic = time.monotonic
#: Messages the thread sends per look at the queue (one lock round trip per batch).
_BATCH = 256
_IN_CALLBACK = (
    " (called in a delivery callback, on the dwcp-delivery thread, which alone settles "
    "messages: it does not wait there)"
)
#: While confirmations are awaited, the thread reads the window's confirmation mark every
#: _POLL_MAX; while someone also waits for them (flush(), result(), room in the budget),
#: after 1 ms, doubling up to _POLL_MAX. The window offers no wake-up for its ACKs.
_POLL_MIN = 0.001
_POLL_MAX = 0.05
#: How often an open breaker is looked at again (each look is a state read, no send).
_BREAKER_POLL = 0.05
#: Pauses after a failed send: the first, doubling up to the last.
_RETRY_FIRST = 0.05
_RETRY_MAX = 1.0

Marks = Callable[[], "tuple[int, int] | None"]


class Outbox:
    """The accepted, unconfirmed messages of one manager, and the thread that delivers them.

    One sender at a time holds the send path (``_busy``), so messages go out in the order
    they were accepted: ``deliver()`` sends on its caller's thread when nothing is queued,
    the transport's window is empty and nothing stands in the way (no other send in
    progress, breaker not seen open, no retry pause), which spares a lone message a thread
    hand-off; otherwise it queues and the thread sends. The thread sends a run of queued
    messages as one call through the breaker (``send_run``: one lock section of the
    transport for the run, where a send takes one per message), one at a time after a
    failure or rejection until one goes through. Either way a sent message joins ``_unstamped``; the thread stamps those
    with the window's highest id (read after they were sent, so at or past theirs) and
    settles each stamped group once the window's confirmation mark reaches its stamp.

    Args:
        send: the manager's guarded send (admit, send, record).
        breaker_state: reads the breaker's state (``"open"`` while nothing may be sent).
        transport: the manager's transport; ``deliver()`` needs its confirmation marks.
        budget: bytes of accepted messages not yet confirmed or failed, at most.
        timeout: the default delivery deadline, seconds after ``deliver()``.
        max_block: how long ``deliver()`` waits for room in the budget.
        name: the manager's name, for logs.
        send_run: the manager's guarded run (admit, queue the first messages the transport
            takes at once, record; returns how many), or None: one send per message.
    """

    def __init__(
        self,
        send: Callable[[bytes], None],
        breaker_state: Callable[[], str],
        transport: Transport | None,
        *,
        send_run: Callable[[Sequence[bytes]], int] | None = None,
        budget: int,
        timeout: float,
        max_block: float,
        name: str,
    ) -> None:
        self._send = send
        self._send_run = send_run
        self._breaker_state = breaker_state
        marks = getattr(transport, "_delivery_marks", None)
        self._marks: Marks | None = marks if callable(marks) else None
        room = getattr(transport, "_room_for_delivery", None)
        # Whether a send would find room at once: the thread waits for room itself,
        # settling meanwhile, instead of blocking in a send while deadlines pass; an ACK
        # that frees room in a full window wakes it (_room_freed).
        self._room: Callable[[int, Callable[[], None]], bool] | None = (
            room if callable(room) else None
        )
        self._has_transport = transport is not None
        # Confirmations are read from an acknowledged MultiStreamTCPTransport's window.
        self.acknowledged = self._marks is not None and self._marks() is not None
        self.budget = budget
        self.timeout = timeout
        self.max_block = max_block
        self._name = name
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the thread waits here
        self._settled = threading.Condition(self._lock)  # producers, flush(), result()
        self._queue: collections.deque[Delivery] = collections.deque()  # not sent yet
        self._unstamped: list[Delivery] = []  # sent since the thread last read the marks
        # Sent, awaiting confirmation: (the window mark that confirms them, the messages).
        self._inflight: collections.deque[tuple[int, list[Delivery]]] = collections.deque()
        self._busy = False  # a send is in progress (the thread's or a caller's)
        self._inline: Delivery | None = None  # the message a caller is sending itself
        self._breaker_open = False  # a send was rejected: look at the breaker first
        self._probing = False  # a send failed or was rejected: one at a time until one goes
        self._pause_until = 0.0  # after a failed send: no send before this
        self._retry = _RETRY_FIRST  # the next pause
        self._room_poll = _POLL_MIN  # the next look for room in the transport
        self._room_wait = False  # the pause is for room (which an ACK may end early)
        self._sending = False  # the thread is inside a send: waiters settle for it
        self._batch_len = 0  # the queue's head the thread is sending: waiters leave it be
        self._current: Delivery | None = None  # the one the thread sends on its own
        self._used = 0
        self._open = False
        self._accepting = False  # open and acknowledged: deliver() reads one flag
        self._closing = False
        self._idle = False  # the thread waits for work (a producer notifies only then)
        self._wake_at = float("inf")  # ...until then at the latest
        self._asleep = False  # ...and is not polling for confirmations either
        self._due: list[Delivery] = []  # settled by a caller; callbacks for the thread to run
        self._thread: threading.Thread | None = None  # the running thread, until it ends
        self._started: list[threading.Thread] = []  # every thread started, until joined
        self._next_expiry = float("inf")  # no deadline is earlier than this
        self._confirmed = 0  # groups confirmed so far: the thread's measure of progress
        self._waiters = 0  # threads waiting for messages to settle (flush, result, room)

    # -- lifecycle (the manager's) -------------------------------------------------------------

    def open(self) -> None:
        """The manager started: accept messages."""
        with self._lock:
            self._open, self._closing = True, False
            self._accepting = self.acknowledged
            self._breaker_open, self._pause_until, self._retry = False, 0.0, _RETRY_FIRST

    def refuse(self) -> None:
        """The manager began to stop: refuse new messages (``NOT_STARTED``), also those
        waiting for room; the thread goes on settling until ``close()``."""
        with self._lock:
            self._open = self._accepting = False
            self._settled.notify_all()

    def close(self) -> None:
        """The manager is stopping: refuse new messages; the thread fails what is left
        (``STOPPED``) once the send in progress, if any, returned."""
        with self._lock:
            self._open = self._accepting = False
            self._closing = True
            self._work.notify_all()
            self._settled.notify_all()

    def join(self, deadline: float) -> None:
        """Join the threads started so far by ``deadline`` (monotonic), but the calling one;
        each is forgotten once joined."""
        with self._lock:
            started = list(self._started)
        for thread in started:
            if thread is threading.current_thread():
                continue  # (stop() from a delivery callback: it ends after it returns)
            thread.join(max(deadline - _monotonic(), 0.0))
            if thread.is_alive():
                logger.bind(manager=self._name).warning(
                    "Delivery thread did not end by the stop deadline (a callback still runs?)"
                )
            else:
                with self._lock:
                    self._started.remove(thread)

    # -- the caller's side --------------------------------------------------------------------

    def deliver(
        self,
        data: bytes | bytearray | memoryview,
        timeout: float | None,
        callback: Callable[[Delivery], object] | None,
    ) -> Delivery:
        """Accept ``data``; see ``Manager.deliver``."""
        if type(data) is not bytes:
            try:
                view = memoryview(data)  # any bytes-like object (not bytes(5): five zeros)
            except TypeError:
                raise TypeError(
                    f"data must be bytes-like (bytes, bytearray, memoryview or another object "
                    f"exporting a buffer), got {type(data).__name__}"
                ) from None
            data = view.tobytes()  # a copy: the caller may reuse its buffer at once
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        size = len(data)
        if size > self.budget:
            raise ValueError(f"message of {size} bytes exceeds delivery_buffer_bytes {self.budget}")
        now = _monotonic()
        deadline = now + (self.timeout if timeout is None else check.seconds("timeout", timeout))
        handle = Delivery(self, data, size, deadline, callback)
        # Every message takes this path, so it is kept lean: acquire()/release() rather than
        # "with", comparisons rather than min(), one flag for open and acknowledged. Over a
        # transport that confirms at once, 22.5k -> 17.5k CPU instructions per message
        # (callgrind; the guarded send alone: 6.3k).
        lock = self._lock
        lock.acquire()
        try:
            if not self._accepting:
                self._refuse()
            if self._used + size > self.budget:
                # Not past the message's own deadline either: it would fail at once.
                self._wait_for_room(size, min(deadline, now + self.max_block))
                now = _monotonic()
            self._used += size
            if deadline < self._next_expiry:  # noqa: PLR1730 - see above: min() costs more
                self._next_expiry = deadline
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dwcp-delivery", daemon=True)
                self._started.append(self._thread)
                self._thread.start()
            if (
                self._busy
                or self._queue
                or self._breaker_open
                or now < self._pause_until
                or (self._send_run is not None and self._awaiting())
            ):
                # In a stream of messages the window seldom empties: they queue, and the
                # thread sends them in runs.
                queue = self._queue
                # The thread waits for something an append does not change (a pause, room,
                # the breaker, the caller's send) unless the queue was empty, or this
                # deadline comes before it would wake. A notify() costs 0.46 us a message,
                # and a thread notified but not yet running is still idle.
                if self._idle and (not queue or deadline < self._wake_at):
                    self._work.notify()
                queue.append(handle)
                return handle
            self._busy = True
            self._inline = handle
            if self._idle and deadline < self._wake_at:
                # The thread fails this message at its deadline even while we still send
                # it (see _expire): it must not sleep past it.
                self._work.notify()
        finally:
            lock.release()
        # Nothing queued, nothing in the way: send it here, as the thread would.
        try:
            self._send(data)
        except (TypeError, ValueError) as exc:  # this message, never any other
            with lock:
                if not handle.done_:
                    self._refused(handle, exc, self._due)  # its callbacks run on the thread
                    self._settled.notify_all()
                self._released()
        except DWCPError as exc:  # failed or rejected: the thread retries it
            with lock:
                if not handle.done_:
                    self._queue.appendleft(handle)
                self._failed(exc)
                self._released()
        except BaseException:  # interrupted: kept, first in line
            with lock:
                if not handle.done_:
                    self._queue.appendleft(handle)
                self._released()
            raise
        else:
            handle.data = None  # only a sender reads it, and this one has sent it
            lock.acquire()
            try:
                # _released(), inlined.
                self._busy = False
                self._inline = None
                self._retry, self._probing = _RETRY_FIRST, False
                handle.sent = True
                if not handle.done_:  # (its deadline may have passed during the send)
                    if deadline < self._next_expiry:  # noqa: PLR1730 - min() costs more
                        self._next_expiry = deadline
                    self._unstamped.append(handle)
                # The thread sends what queued meanwhile; asleep, it was not polling for
                # confirmations either, and now has one to wait for.
                if (self._queue and self._idle) or self._asleep:
                    self._asleep = False
                    self._work.notify()
            finally:
                lock.release()
        return handle

    def _awaiting(self) -> bool:
        """Whether messages in the transport's window await confirmation."""
        marks = self._marks() if self._marks is not None else None
        return marks is not None and marks[0] != marks[1]

    def _refuse(self) -> NoReturn:
        # Caller holds the lock.
        if not self._has_transport:
            raise DWCPError("manager has no transport to deliver through", code="NO_TRANSPORT")
        if not self._open:
            raise DWCPError("manager is not started", code="NOT_STARTED")
        raise DWCPError(
            "deliver() needs an acknowledged transport: "
            "MultiStreamTCPTransport(..., acknowledged=True)",
            code="NOT_ACKNOWLEDGED",
        )

    def _released(self) -> None:
        # Caller holds the lock: the send path is free; the thread sends what queued.
        handle = self._inline
        if handle is not None and not handle.done_ and handle.deadline < self._next_expiry:
            self._next_expiry = handle.deadline
        self._busy, self._inline = False, None
        if (self._queue or self._due) and self._idle:
            self._work.notify()

    def _wait_settled(self, timeout: float | None) -> None:
        # Caller holds the lock. While someone waits, the thread reads the confirmations
        # often (from 1 ms); otherwise every _POLL_MAX, which keeps it off the sender's CPU.
        # While the thread is inside a send (a large message being written), the waiter
        # settles itself every _POLL_MAX: confirmations and deadlines do not wait for the
        # write; the callbacks of what it settles run on the thread afterwards.
        self._waiters += 1
        if self._idle:
            self._work.notify()  # settle what was confirmed now, not at the next poll
        try:
            if self._sending:
                self._settled.wait(_POLL_MAX if timeout is None else min(timeout, _POLL_MAX))
            else:
                self._settled.wait(timeout)
            if self._sending:
                self._due = self._settle(_monotonic(), self._batch_len)
        finally:
            self._waiters -= 1

    def _wait_for_room(self, size: int, deadline: float) -> None:
        # Caller holds the lock; bounded by deadline.
        if threading.current_thread() is self._thread:
            # deliver() from a done callback: only this thread sends and settles, so no
            # room can come while it waits. Settle what is due, then take it or refuse.
            self._due = self._settle(_monotonic())
            if self._used + size > self.budget:
                raise DeliveryError(
                    f"no room for {size} bytes in delivery_buffer_bytes ({self.budget}), and "
                    "deliver() from a delivery callback cannot wait for it (only the "
                    "dwcp-delivery thread frees room)",
                    code="BUFFER_FULL",
                )
            return
        while self._used + size > self.budget:
            left = deadline - _monotonic()
            if left <= 0:
                raise DeliveryError(
                    f"no room for {size} bytes in delivery_buffer_bytes ({self.budget}) "
                    f"within delivery_max_block ({self.max_block:g} s) or the message's "
                    "timeout, whichever came first",
                    code="BUFFER_FULL",
                )
            self._wait_settled(left)
            if not self._open:
                self._refuse()

    def _limit(self, timeout: float | None) -> tuple[float | None, bool]:
        """A wait's limit in seconds (None: none), and whether it waits in a done callback."""
        limit = None if timeout is None else check.seconds("timeout", timeout, allow_zero=True)
        in_callback = threading.current_thread() is self._thread
        if in_callback:
            limit = 0.0  # only this thread settles, so waiting cannot end
        return limit, in_callback

    def flush(self, timeout: float | None) -> None:
        """Wait until every message accepted before the call has settled."""
        limit, in_callback = self._limit(timeout)
        deadline = None if limit is None else _monotonic() + limit
        with self._lock:
            if in_callback:
                self._due = self._settle(_monotonic())
            waiting = [handle for _, group in self._inflight for handle in group]
            waiting += self._unstamped
            if self._inline is not None:
                waiting.append(self._inline)
            waiting.extend(self._queue)
            for handle in waiting:  # they settle roughly in this order
                while not handle.done_:
                    left = None if deadline is None else deadline - _monotonic()
                    if left is not None and left <= 0:
                        unsettled = sum(not h.done_ for h in waiting)
                        raise DeliveryError(
                            f"{unsettled} message(s) not settled within {limit:g} s"
                            + (_IN_CALLBACK if in_callback else ""),
                            code="FLUSH_TIMEOUT",
                        )
                    self._wait_settled(left)

    def wait_settled(self, handle: Delivery, timeout: float | None) -> None:
        """Wait until ``handle`` settles; ``TimeoutError`` if ``timeout`` passes first."""
        if handle.done_:
            return
        limit, in_callback = self._limit(timeout)
        deadline = None if limit is None else _monotonic() + limit
        with self._lock:
            if in_callback:
                self._due = self._settle(_monotonic())
            while not handle.done_:
                left = None if deadline is None else deadline - _monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(
                        f"delivery not settled within {limit:g} s"
                        + (_IN_CALLBACK if in_callback else "")
                    )
                self._wait_settled(left)

    def add_callback(self, handle: Delivery, fn: Callable[[Delivery], object]) -> bool:
        """Register ``fn`` for when ``handle`` settles; False if it already has."""
        with self._lock:
            if handle.done_:
                return False
            if handle._callbacks is None:
                handle._callbacks = [fn]
            else:
                handle._callbacks.append(fn)
            return True

    # -- the delivery thread ------------------------------------------------------------------

    def _run(self) -> None:
        log = logger.bind(manager=self._name)
        poll = _POLL_MIN
        while True:
            try:
                # Read outside the lock: with a shared breaker the read may reach Redis.
                was_open = self._breaker_open
                still_open = was_open and self._breaker_state() == "open"
                with self._lock:
                    if was_open and not still_open:
                        self._breaker_open = False
                    now = _monotonic()
                    confirmed = self._confirmed
                    settled = self._settle(now)
                    progressed = settled or self._confirmed != confirmed
                    batch: list[Delivery] = []
                    if self._closing and not self._busy:
                        # Confirmed by the transport's close: their callbacks run below,
                        # with _fail_all()'s (it takes what is due first).
                        self._due = settled
                        break
                    if (
                        self._queue
                        and not self._busy
                        and not self._closing
                        and not self._breaker_open
                        and now >= self._pause_until
                        # Callbacks first, with no batch taken: one that calls deliver(),
                        # flush() or result() settles here itself (see _wait_for_room).
                        and not settled
                    ):
                        self._busy = True
                        batch = list(itertools.islice(self._queue, _BATCH))
                        one_by_one = self._probing
                    elif not progressed:
                        wait = self._next_expiry - now
                        if self._breaker_open:
                            wait = min(wait, _BREAKER_POLL)
                        elif self._queue and not self._busy:
                            wait = min(wait, self._pause_until - now)
                        polling = bool(self._inflight or self._unstamped or self._busy)
                        if polling and self._waiters:
                            wait = min(wait, poll)
                            poll = min(poll * 2, _POLL_MAX)
                        elif polling:
                            wait = min(wait, _POLL_MAX)
                        self._idle, self._asleep = True, not polling
                        self._wake_at = now + wait
                        self._work.wait(None if wait == float("inf") else max(wait, 0.0))
                        self._idle = self._asleep = False
                        continue
                poll = _POLL_MIN
                self._finish(settled)
                if batch:
                    self._send_batch(batch, one_by_one)
            except Exception as exc:  # noqa: BLE001 - never die silently; keep delivering
                log.opt(exception=exc).error("Delivery thread failed; going on")
                with self._lock:
                    self._pause_until = _monotonic() + _RETRY_MAX
        self._finish(self._fail_all())
        with self._lock:  # ended: the next deliver() starts a new thread
            if self._thread is threading.current_thread():
                self._thread = None

    def _send_batch(self, batch: list[Delivery], one_by_one: bool) -> None:
        """Send ``batch`` (the queue's head) in order, with no lock held, until one fails or
        finds no room; then record what went, and the failure. Called holding the send path
        (``_busy``)."""
        try:
            self._send_some(batch, one_by_one)
        finally:
            with self._lock:
                self._busy = self._sending = False
                self._batch_len, self._current = 0, None

    def _send_some(self, batch: list[Delivery], one_by_one: bool) -> None:
        send, room = self._send, self._room
        send_run = None if one_by_one else self._send_run
        messages = [handle.data for handle in batch]
        count = len(batch)
        done = 0
        refused: list[tuple[Delivery, BaseException]] = []
        failure: DWCPError | None = None
        full = False  # the transport had no room for the next one
        while done < count:  # each pass sends at least one message, or ends
            try:
                if send_run is not None:
                    queued = send_run(messages[done:])  # type: ignore[arg-type]
                    if queued:
                        done += queued
                        continue
                data = messages[done]
                assert data is not None
                if room is not None and not room(len(data), self._room_freed):
                    # A send would wait for room (a full window, say) with nothing settling
                    # meanwhile: look again shortly instead, settling in between.
                    full = True
                    break
                # On its own (too large for a run, or the first into an empty window), it
                # can take as long as the receiver takes to read it: waiters settle the
                # rest meanwhile (see _wait_settled), all but the head sent so far and it.
                with self._lock:
                    self._sending, self._current, self._batch_len = True, batch[done], done + 1
                    if self._waiters:
                        self._settled.notify_all()  # to wait in steps, settling (see above)
                send(data)
            except (TypeError, ValueError) as exc:  # this message, never any other
                refused.append((batch[done], exc))
            except DWCPError as exc:  # failed or rejected (or the manager is stopping)
                failure = exc
                break
            done += 1
            if self._current is not None:
                break  # the rest of the batch may have settled meanwhile: take it afresh
        settled: list[Delivery] = []
        with self._lock:
            # From here on waiters leave settling to the thread again (see _wait_settled).
            self._sending, self._current, self._batch_len = False, None, 0
            queue, unstamped = self._queue, self._unstamped
            for _ in range(done):
                handle = queue.popleft()
                # A waiter may have failed it at its deadline meanwhile (see _wait_settled).
                if refused and refused[0][0] is handle:
                    why = refused.pop(0)[1]
                    if not handle.done_:
                        self._refused(handle, why, settled)
                    continue
                handle.sent, handle.data = True, None
                if not handle.done_:
                    unstamped.append(handle)
            if failure is not None:
                self._failed(failure)
            elif done:
                self._retry, self._probing = _RETRY_FIRST, False
            if full:
                self._pause_until = _monotonic() + self._room_poll
                self._room_poll = min(self._room_poll * 2, _POLL_MAX)
                self._room_wait = True
            elif done:
                self._room_poll = _POLL_MIN
            if settled:
                self._settled.notify_all()
        self._finish(settled)
        if failure is not None:
            logger.bind(manager=self._name, error=str(failure)).debug("Delivery send failed")

    def _room_freed(self) -> None:
        # Called by the transport's reader thread, holding none of its locks, when an ACK
        # freed room in the window the thread found full: the pause ends now, not after
        # _room_poll (which alone covers the other cases of no room: a full stream outbox,
        # senders waiting). Up to _POLL_MAX of idle link per full window otherwise: a
        # stream of 1 KiB messages filled 4096 of them 9-69 times in 20,000, and the thread
        # had paused for 7-40 % of the time it took.
        with self._lock:
            if self._room_wait:
                self._room_wait = False
                self._pause_until = 0.0
                if self._idle:
                    self._work.notify()

    def _failed(self, failure: DWCPError) -> None:
        # Caller holds the lock: wait for the breaker, or pause before the next try.
        self._probing, self._room_wait = True, False
        if isinstance(failure, CircuitOpenError):
            self._breaker_open = True
        else:
            self._pause_until = _monotonic() + self._retry
            self._retry = min(self._retry * 2, _RETRY_MAX)

    def _refused(self, handle: Delivery, why: BaseException, settled: list[Delivery]) -> None:
        # Caller holds the lock.
        error = DeliveryError(f"transport refused the message: {why}", code="REFUSED")
        error.__cause__ = why
        self._fail(handle, error, settled)

    def _settle(self, now: float, skip: int = 0) -> list[Delivery]:
        """Stamp what was sent, confirm what the receiver confirmed, fail what is past its
        deadline (but the first ``skip`` queued, which the thread is sending: see
        ``_expire``); return the handles with callbacks to run. Caller holds the lock."""
        settled, self._due = self._due, []
        inflight = self._inflight
        if (inflight or self._unstamped) and self._marks is not None:
            marks = self._marks()
            last, acked = (-1, -1) if marks is None else marks
            if self._unstamped:
                # Read after they were sent: at or past each one's message id.
                inflight.append((last, self._unstamped))
                self._unstamped = []
            if inflight and inflight[0][0] <= acked:
                used = self._used  # a local: this loop runs once per message
                while inflight and inflight[0][0] <= acked:
                    self._confirmed += 1
                    for handle in inflight.popleft()[1]:
                        if handle.done_:
                            continue  # (failed at its deadline already: counted then)
                        handle.done_ = True
                        used -= handle.size
                        if handle._callbacks:
                            settled.append(handle)
                self._used = used
                self._settled.notify_all()
        if now >= self._next_expiry:
            self._expire(now, settled, skip)
        return settled

    def _expire(self, now: float, settled: list[Delivery], skip: int = 0) -> None:
        # Caller holds the lock. O(pending), run only when the earliest deadline passed.
        # A waiter settling while the thread sends leaves the queue's first ``skip`` alone:
        # the thread removes them from the head once sent, and any of them may be on its
        # way; but the one it sends on its own fails at its deadline, as sent.
        nearest = float("inf")
        queue = self._queue
        if any(handle.deadline <= now for handle in itertools.islice(queue, skip, None)):
            queued = collections.deque(itertools.islice(queue, skip))
            for handle in itertools.islice(queue, skip, None):
                if handle.deadline <= now:
                    self._expired(handle, settled)
                else:
                    queued.append(handle)
            self._queue = queued
        current = self._current
        if skip and current is not None and not current.done_ and current.deadline <= now:
            current.sent = True
            self._expired(current, settled)
        groups = [(mark, group) for mark, group in self._inflight]
        groups.append((-1, self._unstamped))
        for index, (mark, group) in enumerate(groups):
            if any(handle.deadline <= now for handle in group):
                kept = []
                for handle in group:
                    if handle.deadline > now:
                        kept.append(handle)
                    elif not handle.done_:
                        self._expired(handle, settled)
                groups[index] = (mark, kept)
        self._unstamped = groups.pop()[1]
        self._inflight = collections.deque(g for g in groups if g[1])
        for handle in itertools.chain(self._queue, self._unstamped, *(g for _, g in groups)):
            if not handle.done_:  # (the thread's own, failed above, stays queued till it ends)
                nearest = min(nearest, handle.deadline)
        inline = self._inline
        if inline is not None and not inline.done_:
            # A message its caller is still sending fails at its deadline too, not when the
            # send returns (up to send_timeout later): part of it may be on its way.
            if inline.deadline <= now:
                inline.sent = True
                self._expired(inline, settled)
            else:
                nearest = min(nearest, inline.deadline)
        self._next_expiry = nearest
        self._settled.notify_all()

    def _expired(self, handle: Delivery, settled: list[Delivery]) -> None:
        where = "sent, not confirmed" if handle.sent else "never sent"
        error = DeliveryError(
            f"delivery deadline passed ({where})", code="DELIVERY_TIMEOUT", sent=handle.sent
        )
        self._fail(handle, error, settled)

    def _fail(self, handle: Delivery, error: DeliveryError, settled: list[Delivery]) -> None:
        # Caller holds the lock.
        handle.done_ = True
        handle._error = error
        handle.data = None
        self._used -= handle.size
        if handle._callbacks:
            settled.append(handle)

    def _fail_all(self) -> list[Delivery]:
        """The manager stopped: fail everything unsettled (after taking the confirmations)."""
        with self._lock:
            settled = self._settle(_monotonic())
            self._inflight.append((-1, self._unstamped))
            rest = [handle for _, group in self._inflight for handle in group]
            for handle in rest + list(self._queue):
                error = DeliveryError(
                    "manager stopped before the message was confirmed",
                    code="STOPPED",
                    sent=handle.sent,
                )
                self._fail(handle, error, settled)
            self._inflight.clear()
            self._unstamped = []
            self._queue.clear()
            self._next_expiry = float("inf")
            self._settled.notify_all()
        return settled

    @staticmethod
    def _finish(settled: list[Delivery]) -> None:
        """Run the callbacks of settled handles; no lock held."""
        for handle in settled:
            callbacks, handle._callbacks = handle._callbacks, None
            for fn in callbacks or ():
                run_callback(fn, handle)
