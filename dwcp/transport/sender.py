"""The sending side: one logical link striped over several TCP connections."""

from __future__ import annotations

import collections
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, NoReturn, cast

from loguru import logger

from dwcp import _validation as check
from dwcp._errors import DWCPError, TransportError
from dwcp.transport import wire
from dwcp.transport._io import (
    _TIMEOUT_SLACK,
    Buffer,
    TLSChannel,
    _bounded_int,
    _check_address,
    _close_quietly,
    _set_send_timeout,
    is_loopback_host,
)
from dwcp.transport._progress import tcp_progress
from dwcp.transport._window import Window

if TYPE_CHECKING:  # typing.Self is 3.11+ and setup.cfg still allows 3.10
    from typing_extensions import Self

__all__ = ["MultiStreamTCPTransport"]


_checksum = wire.checksum_of
_writev = getattr(os, "writev", None)  # POSIX only; elsewhere socket.sendmsg()
_monotonic = time.monotonic
# The DATA header without its own CRC, then the CRC: packed in two steps so the header CRC
# is computed over exactly the bytes that precede it.
_pack_head = struct.Struct("!4sBBHQIIIII").pack
_pack_u32 = struct.Struct("!I").pack
_MAGIC = wire.MAGIC
_VERSION = wire.VERSION
_DATA = wire.FRAME_DATA
# Up to this size, copying header + payload into one buffer for a single send() is
# cheaper than writev()'s scatter list; above it the copy costs more than it saves.
_COPY_LIMIT = 16 * 1024
_FRAME = wire.ACK.size  # ACK and PONG, the frames a receiver sends in a session, are 20 bytes
assert wire.PING.size == _FRAME
_HEADER_SIZE = wire.DATA_HEADER.size
# Frames at least this large are written by their caller when the stream is idle.
_DIRECT_MIN = 256 * 1024
# Bytes queued on a stream before senders wait for its writer (backpressure).
_OUTBOX_LIMIT = 1 << 20
# Buffers per writev() (POSIX guarantees 16, Linux takes 1024).
_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16, 1024)
# How often a sender that finds the order lock taken yields the GIL before it blocks.
_YIELDS = 16
_sleep = time.sleep
# ACK_NOW_EMPTY: a message sent into an empty window (nothing awaits an acknowledgement)
# asks for its ACK at once (ACK_NOW), as send(wait=True) does: so send() then flush() is
# confirmed without waiting out the receiver's ACK delay. In a steady stream the window
# seldom empties, so the receiver still acknowledges in batches.
# A write syscall returns after send_timeout / _STALL_TICKS at most, so that a stall (see
# _Session._stalled) is seen within an eighth of send_timeout of being due.
_STALL_TICKS = 8
# Why a session broke when acknowledgements stopped (formatted with send_timeout).
ACK_TIMEOUT_REASON = "no acknowledgement within send_timeout ({:g} s)"


def _take_contended(order: threading.Lock) -> None:
    """Take the session's order lock, found held by another sender.

    Its holder holds it only to run a few hundred opcodes (no I/O), so what it lacks is the
    GIL, not time: this thread yields the GIL (``sleep(0)``) and tries again, and blocks only
    after ``_YIELDS`` tries. Blocking at once made every waiter depend on a wake-up from the
    holder's release, and under the GIL those hand-offs chain into a convoy: 8 threads
    sending 1 KiB messages delivered 79-83 kmsg/s, against 118-130 with this in alternated
    runs (benchmarks/README.md, session 4).
    """
    for _ in range(_YIELDS):
        _sleep(0)
        if order.acquire(False):
            return
    order.acquire()


class _Stream:
    """One TCP connection of a session: its outbox and the writer thread that drains it.

    Senders append frames to the outbox under the session's order lock, so every stream
    carries its frames in message-id order, which lets the receiver bound its memory
    without ever deadlocking (see _reassembly). The writer hands whatever has queued up to
    the kernel in one writev(), so small messages from one thread or many share syscalls.
    """

    __slots__ = (
        "busy",
        "drained",
        "fd",
        "heard",
        "index",
        "kick",
        "kicked",
        "lazy",
        "lock",
        "marks",
        "outbox",
        "ping_sent",
        "progress",
        "queued",
        "sock",
        "threads",
        "tls",
        "waiting",
        "writes",
    )

    def __init__(self, index: int, sock: socket.socket, tls: TLSChannel | None) -> None:
        self.index = index
        self.sock = sock
        self.fd = sock.fileno()
        self.tls = tls
        self.threads: list[threading.Thread] = []
        # Guarded by ``lock``: what waits to be written, its size, the completions to
        # signal once it is, and whether the writer has been woken, is writing, or has
        # senders waiting for it.
        self.lock = threading.Lock()
        self.drained = threading.Condition(self.lock)
        self.outbox: list[Buffer | _Lazy] = []
        self.lazy = False
        self.marks: list[_Batch] = []
        self.queued = 0
        self.kicked = False
        self.busy = False
        self.waiting = 0
        # Held while the writer has nothing to do; released once to wake it (a lock, not
        # an Event: releasing it costs one C call on every first frame of a batch).
        self.kick = threading.Lock()
        self.kick.acquire()
        self.writes = 0  # batches written, so the keepalive can tell an idle stream
        self.ping_sent: float | None = None  # when an unanswered PING went out
        # When the receiver last said it is alive on this stream (a PONG or an ACK), and when
        # the write under way last wrote something (or began).
        self.heard = self.progress = _monotonic()

    def put(
        self,
        parts: Sequence[Buffer | _Lazy],
        size: int,
        mark: _Batch | None,
        *,
        lazy: bool = False,
    ) -> None:
        """Queue ``parts`` (``size`` bytes on the wire); the caller holds the session's
        order lock (frames without a message id, PINGs, need not). ``lazy``: some parts
        are ``_Lazy`` frames for the writer to build."""
        with self.lock:
            self.outbox.extend(parts)
            self.lazy = self.lazy or lazy
            self.queued += size
            if mark is not None:
                self.marks.append(mark)
            if not self.kicked:
                self.kicked = True
                self.kick.release()

    def claim(self) -> bool:
        """Take the socket for a direct write if nothing is queued or being written.

        The caller holds the session's order lock, so frames of later ids go to the
        outbox, and the writer leaves them until ``unclaim``.
        """
        with self.lock:
            if self.outbox or self.busy:
                return False
            self.busy = True
            return True

    def unclaim(self) -> None:
        """A direct write is done: the writer may go on with what queued up meanwhile."""
        with self.lock:
            self.busy = False
            self.writes += 1
            if self.outbox and not self.kicked:
                self.kicked = True
                self.kick.release()
            if self.waiting:
                self.drained.notify_all()

    def wake(self) -> None:
        """Wake the writer (to drain, or to notice that the session ended)."""
        with self.lock:
            if not self.kicked:
                self.kicked = True
                self.kick.release()
            self.drained.notify_all()


class _Lazy:
    """A DATA frame whose header (and CRCs) the stream's writer builds when it writes it."""

    __slots__ = ("checksum", "count", "flags", "index", "message_id", "payload", "total")

    def __init__(
        self,
        flags: int,
        message_id: int,
        index: int,
        count: int,
        total: int,
        payload: Buffer,
        checksum: bool,
    ) -> None:
        self.flags = flags
        self.message_id = message_id
        self.index = index
        self.count = count
        self.total = total
        self.payload = payload
        self.checksum = checksum

    def header(self) -> bytes:
        payload = self.payload
        head = _pack_head(
            _MAGIC, _VERSION, _DATA, self.flags, self.message_id, self.index, self.count,
            self.total, len(payload), _checksum(payload) if self.checksum else 0,
        )  # fmt: skip
        return head + _pack_u32(_checksum(head))


def _built(parts: list[Buffer | _Lazy]) -> list[Buffer]:
    """The buffers to write for ``parts``: each ``_Lazy`` frame as its header and payload."""
    out: list[Buffer] = []
    for part in parts:
        if type(part) is _Lazy:
            out.append(part.header())
            out.append(part.payload)
        else:
            out.append(part)  # type: ignore[arg-type]
    return out


class _Batch:
    """Completion of a message's writes on the streams that carry it."""

    __slots__ = ("_lock", "_remaining", "done", "error")

    def __init__(self, shares: int) -> None:
        self._lock = threading.Lock()
        self._remaining = shares
        self.error: BaseException | None = None
        self.done = threading.Event()
        if shares == 0:
            self.done.set()

    def finish(self, error: BaseException | None) -> None:
        with self._lock:
            if error is not None and self.error is None:
                self.error = error
            self._remaining -= 1
            last = self._remaining == 0
        if last:
            self.done.set()


class _Session:
    """Everything one ``start()`` creates; ``close()`` or a failure retires it as a whole.

    A stream failure breaks the whole session: a message id that never reaches the receiver
    leaves a gap it cannot deliver past, so later sends on the session would be lost anyway.

    Who decides to break, one thread per kind of fault, with the code every later error of
    the session carries (``broken_code``): the thread writing a stream (its writer, or a
    sender writing a large frame directly) for a failed or stalled write; the stream's
    reader for a closed connection or a bad frame; the keepalive thread for an unanswered
    PING and, acknowledged, for acknowledgements overdue (``ACK_TIMEOUT``). A send never
    breaks the session: it fails alone when it gets no room in time, and when it finds a
    fault due that its owner has not decided yet, it waits for that decision and reports it.
    """

    def __init__(
        self,
        address: tuple[str, int],
        connections: Sequence[tuple[socket.socket, TLSChannel | None]],
        *,
        session_id: bytes,
        send_timeout: float,
        acknowledged: bool,
        checksum: bool,
        keepalive_interval: float | None,
        keepalive_timeout: float,
        first_id: int = 0,
        window: Window | None = None,
        close_timeout: float | None = None,
    ) -> None:
        self.address = address
        # How long shutdown() waits for queued writes and acknowledgements.
        self.close_timeout = send_timeout if close_timeout is None else close_timeout
        self.checksum = checksum
        self.flags = 0 if checksum else wire.FLAG_UNCHECKED
        self.urgent_flags = self.flags | wire.FLAG_ACK_NOW
        self.session_id = session_id
        self.send_timeout = send_timeout
        self.acknowledged = acknowledged
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        # How long a receiver may go without saying it is alive while a write makes no
        # progress (see _send_rest); None: no keepalive, so nothing to hear from it.
        self.life = None if keepalive_interval is None else keepalive_interval + keepalive_timeout
        self.streams = [_Stream(i, sock, tls) for i, (sock, tls) in enumerate(connections)]
        for stream in self.streams:
            # Every syscall returns within a quarter of send_timeout; _write counts how long
            # nothing could be written from that (the only write deadline).
            _set_send_timeout(stream.sock, send_timeout / _STALL_TICKS)
        self.count = len(self.streams)
        # Message ids are handed out, and frames queued, under this lock: so each stream's
        # outbox is in id order.
        self._order = threading.Lock()
        # Senders that found no room, first come first served (see _admit). Joined under the
        # order lock; ``waiters`` (its length) is read there without this lock, so a sender
        # that comes later queues behind them instead of taking the room they wait for.
        self._queue: collections.deque[object] = collections.deque()
        self._queue_lock = threading.Lock()
        self._turn = threading.Condition(self._queue_lock)
        self.waiters = 0
        self.first_id = first_id
        self.next_id = first_id
        # Acknowledged: the transport's window, which outlives this session (see Window).
        self.window = window
        self.broken: str | None = None
        # The TransportError code of the fault that broke the session, set with ``broken``:
        # every send that finds the session broken raises with it, whichever thread noticed.
        self.broken_code = "TRANSPORT_ERROR"
        self.closing = False
        self._writers_stop = False
        self._stopped = threading.Event()
        self._keepalive: threading.Thread | None = None
        self._state_lock = threading.Lock()
        self._log = logger.bind(peer=f"{address[0]}:{address[1]}", session=session_id.hex())

    # -- lifecycle ----------------------------------------------------------------------

    def run_threads(self) -> None:
        """Start one writer and one reader (ACK, PONG, EOF) per stream, and the keepalive."""
        for stream in self.streams:
            writer = threading.Thread(
                target=self._writer_loop,
                args=(stream,),
                name=f"dwcp-transport-writer-{stream.index}",
                daemon=True,
            )
            reader = threading.Thread(
                target=self._reader_loop,
                args=(stream,),
                name=f"dwcp-transport-reader-{stream.index}",
                daemon=True,
            )
            stream.threads = [writer, reader]
            writer.start()
            reader.start()
        if self.keepalive_interval is not None or self.window is not None:
            self._keepalive = threading.Thread(
                target=self._keepalive_loop, name="dwcp-transport-keepalive", daemon=True
            )
            self._keepalive.start()

    def flush(self, timeout: float) -> bool:
        """Wait until every queued frame is in the kernel; False if ``timeout`` passed first
        (or the session broke, which drops what was queued)."""
        deadline = _monotonic() + timeout
        for stream in self.streams:
            with stream.drained:
                stream.waiting += 1
                try:
                    while stream.outbox or stream.busy:
                        left = deadline - _monotonic()
                        if left <= 0 or self.broken is not None:
                            return False
                        stream.drained.wait(left)
                finally:
                    stream.waiting -= 1
        return self.broken is None

    def ended(self) -> bool:
        """Whether the session broke or is closing (its acknowledgements will not come)."""
        return self.broken is not None or self.closing

    def wait_acked(self, message_id: int, deadline: float) -> None:
        """Wait until the receiver acknowledged ``message_id``; TransportError (code
        ``UNCONFIRMED``: sent, kept in the window, not confirmed yet) when the deadline
        passes or the session ends first."""
        window = self.window
        assert window is not None
        if window.wait_acked(message_id, deadline, self.ended):
            return
        if self.broken is not None:
            raise TransportError(
                f"transport broken: {self.broken}; message {message_id} is kept and resent "
                "after a restart",
                code="UNCONFIRMED",
            )
        if self.closing:
            raise TransportError(
                "transport closed before the acknowledgement came", code="UNCONFIRMED"
            )
        raise TransportError(
            f"no acknowledgement for message {message_id} in time; it is kept and resent "
            "after a restart",
            code="UNCONFIRMED",
        )

    def _linger(self) -> None:
        """Wait for what is queued to be written and, acknowledged, confirmed, for as long as
        writes or acknowledgements progress: give up once none came for ``close_timeout``.

        A slow receiver still gets everything; a silent one holds ``close()`` for
        ``close_timeout``, not ``send_timeout``. A writer that has not yet begun what is
        queued (a busy machine runs it late) is waited for, up to ``send_timeout``.
        """
        window = self.window
        wait = self.close_timeout
        began = _monotonic()
        latest = began + max(self.send_timeout, wait)

        def last_progress() -> float:
            # When a write or an acknowledgement last made progress (or close() began).
            moved = max(s.progress for s in self.streams)
            if window is not None:
                moved = max(moved, window.since)
            return max(moved, began)

        while True:  # bounded: each round ends at a deadline only progress moves
            now = _monotonic()
            deadline = last_progress() + wait
            if now >= deadline:
                late = any(s.outbox and not s.busy for s in self.streams)
                if not late or now >= latest:
                    return
                deadline = min(now + wait, latest)
            if self.flush(deadline - now) and (
                window is None or window.wait_acked(window.last, deadline, self.ended)
            ):
                return
            if self.ended():
                return

    def shutdown(self) -> None:
        """Write what is queued and, acknowledged, wait for the acknowledgements (while they
        progress, see ``_linger``), then stop every stream and join the session's threads
        (``close()``). What is still unacknowledged stays in the window for the next session;
        unacknowledged, what is still queued then is dropped."""
        if self.broken is None:
            self._linger()
        # Under the order lock, which every send re-checks it under before it takes an id:
        # nothing joins the window once this session is closing (start() snapshots it next).
        with self._order:
            self.closing = True
        self._writers_stop = True
        self._stopped.set()
        for stream in self.streams:
            self._shutdown_socket(stream.sock)
            stream.wake()
        if self.window is not None:
            self.window.wake()
        with self._turn:
            self._turn.notify_all()
        current = threading.current_thread()
        threads = [t for s in self.streams for t in s.threads]
        if self._keepalive is not None:
            threads.append(self._keepalive)
        for thread in threads:
            if thread is not current:
                thread.join()
        for stream in self.streams:
            # After the writer is joined: nothing can use the old descriptor number any
            # more, which the kernel may hand to another socket once closed.
            stream.fd = -1
            _close_quietly(stream.sock)

    @staticmethod
    def _shutdown_socket(sock: socket.socket) -> None:
        # shutdown() (unlike close()) is safe while other threads block on the socket, and
        # wakes them: a blocked recv returns b"", a blocked send fails.
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def break_(self, reason: str, code: str = "TRANSPORT_ERROR") -> None:
        """Mark the session broken (the first reason and its error ``code`` win) and abort
        every stream."""
        with self._state_lock:
            if self.broken is not None or self.closing:
                return
            self.broken_code = code
            self.broken = reason
        self._log.bind(reason=reason).warning(f"Transport stream failed: {reason}")
        self._stopped.set()
        for stream in self.streams:
            self._shutdown_socket(stream.sock)
            stream.wake()
        if self.window is not None:
            self.window.wake()
        with self._turn:
            self._turn.notify_all()

    def _raise_broken_from(self, exc: BaseException | None) -> NoReturn:
        raise TransportError(
            f"transport broken: {self.broken or 'closed'}; restart it", code=self.broken_code
        ) from exc

    def _raise_broken(self) -> NoReturn:
        raise TransportError(
            f"transport broken: {self.broken or 'closed'}; restart it", code=self.broken_code
        )

    def _fail(self, stream: _Stream, what: str, exc: BaseException | None) -> NoReturn:
        reason = f"stream {stream.index}: {what}" + (f" ({exc})" if exc is not None else "")
        self.break_(reason)
        if self.broken is not None and self.broken != reason:
            # Another fault broke the session first (this one is likely its consequence):
            # report that one, as every other send does.
            self._raise_broken_from(exc)
        raise TransportError(reason) from exc

    # -- sending ------------------------------------------------------------------------

    # -- admission: room for a message, first come first served --------------------------
    #
    # A message is queued whole (every chunk on every lane, under the order lock) or not at
    # all. A send that finds no room (a stream's outbox at its limit, or the window full)
    # joins the queue of waiters; only its head waits for room, the others for their turn,
    # and a later sender queues behind them. A send still without room at its deadline fails
    # alone: nothing of it was queued, and the session goes on. Once queued, a message is
    # written however slowly the receiver reads; only a write that can write nothing for
    # send_timeout (the peer stopped reading), or a dead connection, breaks the session.

    def _enqueue(self) -> object:
        """Join the waiters' queue; the caller holds the order lock."""
        me = object()
        with self._queue_lock:
            self._queue.append(me)
            self.waiters = len(self._queue)
        return me

    def _leave(self, me: object) -> None:
        """Leave the waiters' queue (admitted, or given up); the next one's turn if ours."""
        with self._queue_lock:
            head = self._queue[0] is me
            self._queue.remove(me)
            self.waiters = len(self._queue)
            if head:
                self._turn.notify_all()

    def _heads(self, me: object) -> bool:
        # Read without the queue lock: only ``me`` leaving can make it stop being the head.
        return self._queue[0] is me

    def _await_turn(self, me: object, size: int, deadline: float) -> None:
        """Wait until ``me`` heads the waiters' queue; raise at ``deadline`` (nothing sent)."""
        with self._queue_lock:
            while self._queue[0] is not me:
                left = deadline - _monotonic()
                if left <= 0 or self.ended():
                    break
                self._turn.wait(left)
            else:
                return
        if self.ended():
            self._raise_broken()
        window = self.window
        if window is not None and not window.fits(size):
            self._window_error(size)  # the window is what the queue waits for
        self._backpressure()

    def _backpressure(self) -> NoReturn:
        raise TransportError(
            f"no room to queue the message within send_timeout ({self.send_timeout:g} s): "
            "the receiver takes messages more slowly than they are sent; nothing was sent",
            code="BACKPRESSURE",
        )

    def _wait_for_room(self, stream: _Stream, deadline: float) -> None:
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
                while stream.queued >= _OUTBOX_LIMIT:
                    if self.broken is not None or self.closing:
                        self._raise_broken()
                    left = deadline - _monotonic()
                    if left <= 0:
                        if extended or not self._stalled(stream):
                            self._backpressure()
                        # Bounded: the writer ticks every send_timeout / 8, and a loaded
                        # machine may run it late, hence a whole send_timeout more.
                        extended = True
                        deadline = _monotonic() + self.send_timeout
                        continue
                    stream.drained.wait(left)
            finally:
                stream.waiting -= 1

    def _stalled(self, stream: _Stream) -> bool:
        """Whether ``stream``'s write is stalled: under way, nothing written for send_timeout,
        and, with a keepalive, no PONG or ACK for keepalive_interval + keepalive_timeout
        either (a receiver waiting for a slow consumer sends a PONG every interval: that is
        backpressure, not a fault)."""
        if not stream.busy:
            return False
        now = _monotonic()
        progress = stream.progress
        life = self.life
        return now - progress >= self.send_timeout and (
            life is None or now - max(progress, stream.heard) >= life
        )

    def _wait_for_window(self, size: int, deadline: float) -> None:
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
        if window.wait_room(size, deadline, self.ended):
            return
        self._window_error(size)

    def _window_error(self, size: int) -> NoReturn:
        """Raise the error of a send that found no room in the window by its deadline (see
        ``_wait_for_window``)."""
        window = self.window
        assert window is not None
        if not self.ended() and self._ack_overdue():
            # Bounded: the keepalive thread ticks every send_timeout / 4 at most; a loaded
            # machine may run it late, hence the whole send_timeout.
            window.wait_room(size, _monotonic() + self.send_timeout, self.ended)
        if self.ended():
            self._raise_broken()
        if self._ack_overdue():  # the keepalive thread is late: same fault, same code
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

    def _ack_overdue(self) -> bool:
        """Acknowledged: whether messages await an ACK, none came for send_timeout, and,
        with a keepalive, the receiver said nothing else either (no PONG) for
        keepalive_interval + keepalive_timeout. A receiver that answers but does not
        confirm is waiting for a slow consumer: backpressure (``WINDOW_FULL`` for the sends
        that find no room), not a fault."""
        window = self.window
        since = None if window is None else window.waiting_since()
        if since is None:
            return False
        now = _monotonic()
        if now - since <= self.send_timeout:
            return False
        life = self.life
        if life is None:
            return True
        heard = max(stream.heard for stream in self.streams)
        return now - max(since, heard) >= life

    def _await_written(self, batch: _Batch) -> None:
        """Wait until the writers wrote a queued message: they read the caller's buffer until
        then, so never return before. Bounded: every write makes progress or fails within
        send_timeout, and a failure ends every write of the session."""
        batch.done.wait()
        if self.broken is not None:
            # The session's fault, not what it did to this write (a broken pipe, say).
            self._raise_broken_from(batch.error)
        if batch.error is not None:
            raise TransportError(f"transport broken: {batch.error}") from batch.error

    def send_small(
        self,
        data: Buffer,
        size: int,
        track: bool = False,
        urgent: bool = False,
        deadline: float = 0.0,
    ) -> int:
        """Queue a message that fits one chunk as one frame on the next stream (round robin);
        return its message id.

        Positional, with defaults for the unacknowledged case: this runs per message, and a
        keyword call costs more.
        ``track``: add it to the window (under the order lock, so the window is in id order),
        waiting while the window is full; once it is there, a failure to write it is the
        session's, not this send's: the message is resent by the next session, and the send
        returns. ``urgent``: ask the receiver to acknowledge it at once (ACK_NOW), for a
        sender waiting on it. ``deadline``: when waiting for room must end (0: send_timeout
        from the first wait).
        """
        if self.broken is not None or self.closing:
            self._raise_broken()
        window = self.window if track else None
        flags = self.urgent_flags if urgent else self.flags
        if size <= _COPY_LIMIT:
            # The common case, inlined: one frame copied into a stream's outbox with room,
            # and, tracked, into a window with room (Window.fits and Window.add, inlined).
            crc = _checksum(data) if self.checksum else 0
            order = self._order
            if not order.acquire(False):
                _take_contended(order)
            try:
                if self.closing:
                    self._raise_broken()
                message_id = self.next_id
                stream = self.streams[message_id % self.count]
                if (not self.waiters and stream.queued < _OUTBOX_LIMIT) and (
                    window is None
                    or (message_id < window.id_limit and window.added + size <= window.byte_limit)
                    or window.last == window.acked
                ):
                    self.next_id = message_id + 1
                    if window is not None:
                        if window.last == window.acked:
                            window.since = _monotonic()
                            # Into an empty window: ask for an ACK at once (see ACK_NOW_EMPTY).
                            flags = self.urgent_flags
                        window.entries.append(data)  # type: ignore[arg-type]
                        window.last = message_id
                        window.added += size
                    head = _pack_head(
                        _MAGIC, _VERSION, _DATA, flags, message_id, 0, 1, size, size, crc
                    )  # fmt: skip
                    frame = head + _pack_u32(_checksum(head)) + data
                    with stream.lock:
                        stream.outbox.append(frame)
                        stream.queued += len(frame)
                        if not stream.kicked:
                            stream.kicked = True
                            stream.kick.release()
                    return message_id
            finally:
                order.release()
        if not deadline:
            deadline = _monotonic() + self.send_timeout
        # Frames up to 16 KiB are copied into the outbox, and a bytes object cannot change
        # under the writer; a mutable buffer, or a message over the outbox limit, is written
        # before send() returns (the caller may reuse the buffer; a large send's failure
        # belongs to that send).
        early = size <= _COPY_LIMIT or (type(data) is bytes and size <= _OUTBOX_LIMIT)
        mark = None if early else _Batch(1)
        # Computed here, before the order lock: for a large frame, while the stream's writer
        # is still writing the previous one (the GIL is released for both).
        crc = _checksum(data) if self.checksum else 0
        # A frame of 256 KiB or more gains nothing from batching: when its stream is idle
        # the caller writes it itself, saving the writer thread's hand-off (and it is in the
        # kernel when send returns). Smaller ones share the writer's writev.
        wants_direct = size >= _DIRECT_MIN
        order = self._order
        me: object | None = None  # our place among the waiters, once we wait (see _enqueue)
        try:
            while True:  # bounded by the deadline: every wait below raises at it
                if not order.acquire(False):
                    _take_contended(order)
                try:
                    if self.broken is not None or self.closing:
                        self._raise_broken()
                    turn = not self.waiters if me is None else self._heads(me)
                    if turn:
                        message_id = self.next_id
                        stream = self.streams[message_id % self.count]
                        full = window is not None and not window.fits(size)
                        if not full and stream.queued < _OUTBOX_LIMIT:
                            self.next_id = message_id + 1
                            if window is not None:
                                if window.last == window.acked:  # see ACK_NOW_EMPTY
                                    flags = self.urgent_flags
                                window.add(message_id, data)  # type: ignore[arg-type]
                            head = _pack_head(
                                _MAGIC, _VERSION, _DATA, flags, message_id, 0, 1, size, size,
                                crc,
                            )  # fmt: skip
                            head += _pack_u32(_checksum(head))
                            # Claimed under the order lock, so frames of later ids queue
                            # behind it.
                            direct = wants_direct and stream.claim()
                            if not direct:
                                parts = (head + data,) if size <= _COPY_LIMIT else (head, data)
                                stream.put(parts, _HEADER_SIZE + size, mark)
                            break
                    if me is None:
                        me = self._enqueue()
                finally:
                    order.release()
                if not turn:
                    self._await_turn(me, size, deadline)
                elif full:
                    self._wait_for_window(size, deadline)
                else:
                    self._wait_for_room(stream, deadline)
        finally:
            if me is not None:
                self._leave(me)
        try:
            if direct:
                try:
                    self._write(stream, [head, data], _HEADER_SIZE + size)
                finally:
                    stream.unclaim()
            elif mark is not None:
                self._await_written(mark)
            if self.broken is not None:
                # Another stream failed meanwhile; the receiver may never get past the gap.
                self._raise_broken()
        except TransportError:
            if window is None:
                raise
        return message_id

    def send_large(
        self,
        data: Buffer,
        size: int,
        chunk_size: int,
        *,
        track: bool,
        urgent: bool = False,
        deadline: float = 0.0,
    ) -> int:
        """Cut a message into chunks striped over the streams, queued on each in id order;
        return its message id (``track``, ``urgent`` and ``deadline`` as for ``send_small``)."""
        if self.broken is not None or self.closing:
            self._raise_broken()
        window = self.window if track else None
        if not deadline:
            deadline = _monotonic() + self.send_timeout
        view = memoryview(data).cast("B")
        chunks = -(-size // chunk_size)
        shares = min(chunks, self.count)
        flags, checksum = self.flags | (wire.FLAG_ACK_NOW if urgent else 0), self.checksum
        payloads = [view[i * chunk_size : (i + 1) * chunk_size] for i in range(chunks)]
        early = type(data) is bytes and size <= _OUTBOX_LIMIT
        batch = _Batch(shares)
        order = self._order
        me: object | None = None  # our place among the waiters, once we wait (see _enqueue)
        try:
            while True:  # bounded by the deadline: every wait below raises at it
                if not order.acquire(False):
                    _take_contended(order)
                try:
                    if self.broken is not None or self.closing:
                        self._raise_broken()
                    turn = not self.waiters if me is None else self._heads(me)
                    if turn:
                        message_id = self.next_id
                        first = message_id % self.count
                        lanes = [
                            self.streams[(first + share) % self.count] for share in range(shares)
                        ]
                        # One look at each lane: a lane seen full is the one waited for
                        # below, even if its writer drained it since (_wait_for_room looks
                        # again, under its lock).
                        full = next((lane for lane in lanes if lane.queued >= _OUTBOX_LIMIT), None)
                        no_room = window is not None and not window.fits(size)
                        if full is None and not no_room:
                            # Every chunk on every lane, under this one hold of the order
                            # lock: the message is queued whole or not at all.
                            self.next_id = message_id + 1
                            if window is not None:
                                if window.last == window.acked:  # see ACK_NOW_EMPTY
                                    flags |= wire.FLAG_ACK_NOW
                                window.add(message_id, data)  # type: ignore[arg-type]
                            for share, lane in enumerate(lanes):
                                # Each stream's writer computes its chunks' CRCs: in parallel,
                                # and off the caller's thread.
                                parts = [
                                    _Lazy(flags, message_id, i, chunks, size, payloads[i], checksum)
                                    for i in range(share, chunks, shares)
                                ]
                                queued = sum(
                                    _HEADER_SIZE + len(payloads[i])
                                    for i in range(share, chunks, shares)
                                )
                                lane.put(parts, queued, batch, lazy=True)
                            break
                    if me is None:
                        me = self._enqueue()
                finally:
                    order.release()
                if not turn:
                    self._await_turn(me, size, deadline)
                elif no_room:
                    self._wait_for_window(size, deadline)
                else:
                    assert full is not None
                    self._wait_for_room(full, deadline)
        finally:
            if me is not None:
                self._leave(me)
        try:
            if not early:
                self._await_written(batch)
            if self.broken is not None:
                self._raise_broken()
        except TransportError:
            if window is None:
                raise
        return message_id

    def replay(self, messages: list[tuple[int, bytes]], chunk_size: int) -> None:
        """Resend the window's messages first, under their own ids (``start()``, before any
        new send can take an id); TransportError when the new session fails meanwhile."""
        for message_id, data in messages:
            size = len(data)
            if size <= chunk_size:
                sent = self.send_small(data, size)
            else:
                sent = self.send_large(data, size, chunk_size, track=False)
            assert sent == message_id, (sent, message_id)
        if not self.flush(self.send_timeout):
            if self.broken is not None:
                self._raise_broken()
            raise TransportError("resent messages not written within send_timeout")

    # -- writing ------------------------------------------------------------------------

    def _writer_loop(self, stream: _Stream) -> None:
        """Drain ``stream``'s outbox: whatever queued up goes to the kernel in one writev."""
        try:
            while True:
                stream.kick.acquire()  # blocks until something is queued (or we must stop)
                while True:
                    with stream.lock:
                        while stream.busy:
                            # A caller is writing directly (see claim()); its frames come
                            # before these.
                            stream.waiting += 1
                            stream.drained.wait()
                            stream.waiting -= 1
                        parts, marks = stream.outbox, stream.marks
                        if not parts:
                            stream.kicked = False
                            if stream.waiting:
                                stream.drained.notify_all()
                            break
                        size, lazy = stream.queued, stream.lazy
                        stream.outbox, stream.marks, stream.queued = [], [], 0
                        stream.lazy = False
                        stream.busy = True
                        # Senders may fill the next batch while this one is written.
                        if stream.waiting:
                            stream.drained.notify_all()
                    error: BaseException | None = None
                    try:
                        if self.broken is not None:
                            self._raise_broken()
                        built = _built(parts) if lazy else cast("list[Buffer]", parts)
                        self._write(stream, built, size)
                        stream.writes += 1
                    except TransportError as exc:
                        error = exc
                    finally:
                        with stream.lock:
                            stream.busy = False
                        del parts
                    for mark in marks:
                        mark.finish(error)
                if self._writers_stop:
                    return
        except Exception as exc:  # noqa: BLE001 - a bug must fail the sends, not hang them
            self._log.opt(exception=exc).error("Transport writer failed")
            self.break_(f"stream {stream.index}: writer error {exc!r}")
            with stream.lock:
                marks, stream.marks, stream.outbox = stream.marks, [], []
            for mark in marks:
                mark.finish(exc)

    def _write(self, stream: _Stream, parts: list[Buffer], size: int) -> None:
        """Write ``parts`` (``size`` bytes in all), or break the session.

        A write may take as long as the receiver reads: only a stall (see ``_send_rest``:
        nothing written for send_timeout while the receiver does not say it is alive) or a
        socket error breaks the session. How long frames waited in the outbox does not
        count: a slow consumer is backpressure, which senders wait out before they queue
        (see "admission" above), not a fault.
        """
        sock = stream.sock
        stream.progress = _monotonic()
        try:
            tls = stream.tls
            if tls is not None:
                # Records go out on the plain socket, so the kernel timeout bounds them too;
                # the channel's write lock keeps records in the order they were sealed.
                with tls.write_lock:
                    records = tls.encrypt(*parts)
                    self._send_rest(stream, [records], 0)
                return
            try:
                if len(parts) == 1:
                    sent = sock.send(parts[0])
                elif len(parts) <= _IOV_MAX:
                    sent = _writev(stream.fd, parts) if _writev else sock.sendmsg(parts)
                else:
                    sent = 0  # more buffers than one writev takes: _send_rest goes in groups
            except BlockingIOError:
                sent = 0  # nothing in one tick of the kernel timeout: _send_rest goes on
            if sent < size:
                if sent:
                    stream.progress = _monotonic()
                self._send_rest(stream, parts, sent)
        except (BlockingIOError, TimeoutError) as exc:
            self._fail(stream, "stalled: nothing could be written for send_timeout", exc)
        except ssl.SSLError as exc:
            self._fail(stream, "TLS error", exc)
        except OSError as exc:
            self._fail(stream, "send failed", exc)

    def _send_rest(self, stream: _Stream, parts: Sequence[Buffer], sent: int) -> None:
        """Write ``parts`` but their first ``sent`` bytes; BlockingIOError once the write is
        stalled (see ``_stalled``)."""
        rest: list[Buffer] = []
        for whole in parts:
            if sent >= len(whole):
                sent -= len(whole)
                continue
            rest.append(memoryview(whole).cast("B")[sent:] if sent else whole)
            sent = 0
        sock = stream.sock
        while rest:  # bounded: each round writes, or fails once send_timeout passed
            group = rest[:_IOV_MAX]
            try:
                done = _writev(stream.fd, group) if _writev else sock.sendmsg(group)
            except BlockingIOError:
                if self._stalled(stream):  # else a kernel timeout tick with nothing written
                    raise
                continue
            stream.progress = _monotonic()
            while rest and done >= len(rest[0]):
                done -= len(rest.pop(0))
            if done:
                rest[0] = memoryview(rest[0]).cast("B")[done:]

    # -- keepalive ----------------------------------------------------------------------

    def _keepalive_loop(self) -> None:
        """PING streams that were idle for an interval; break the session when a PING goes
        unanswered for ``keepalive_timeout`` (the receiver vanished without FIN or RST), or,
        acknowledged, when messages await an ACK and none came for send_timeout.

        A busy stream is not pinged: its writes are bounded by send_timeout already. A
        receiver that is alive but not reading (backpressure) answers unprompted.

        The timeout measures a stall, not a duration: a PING can wait behind megabytes the
        kernel still holds for a slow link. While the kernel sees the bytes written before
        the PING being acknowledged (``tcp_progress``), the stream is moving, and the PING's
        timeout runs from the last such progress seen.
        """
        interval = self.keepalive_interval
        timeout = self.keepalive_timeout
        bounds = [] if interval is None else [interval, timeout]
        if self.window is not None:
            bounds.append(self.send_timeout)
        tick = min(bounds) / 4
        seen = [-1] * self.count
        idle_since = [_monotonic()] * self.count
        # Per stream, for its unanswered PING: the bytes acknowledged when last looked at,
        # the count once everything written before the PING is, and when it last moved.
        acked: list[int] = [0] * self.count
        ahead_until: list[int] = [0] * self.count
        moved = [0.0] * self.count
        window = self.window
        try:
            while not self._stopped.wait(self._next_tick(tick)):
                now = _monotonic()
                if window is not None and self._ack_overdue():
                    # The one place that breaks a session for missing acknowledgements.
                    self.break_(ACK_TIMEOUT_REASON.format(self.send_timeout), "ACK_TIMEOUT")
                    return
                if interval is None:
                    continue
                for stream in self.streams:
                    sent = stream.ping_sent
                    if sent is not None:
                        i = stream.index
                        if acked[i] < ahead_until[i]:
                            progress = tcp_progress(stream.sock)
                            if progress is not None and progress[0] > acked[i]:
                                acked[i], moved[i] = progress[0], now
                        if now - max(sent, moved[i]) > timeout:
                            self.break_(
                                f"stream {stream.index}: no keepalive answer within {timeout:g} s"
                            )
                            return
                        continue
                    if stream.writes != seen[stream.index] or stream.outbox or stream.busy:
                        seen[stream.index], idle_since[stream.index] = stream.writes, now
                    elif now - idle_since[stream.index] >= interval:
                        progress = tcp_progress(stream.sock)
                        if progress is not None:
                            acked[stream.index] = progress[0]
                            ahead_until[stream.index] = progress[0] + progress[1]
                        else:
                            ahead_until[stream.index] = acked[stream.index]  # nothing to follow
                        stream.ping_sent = now
                        stream.put((wire.pack_ping(int(now * 1000)),), _FRAME, None)
                        idle_since[stream.index] = now
        except Exception as exc:  # noqa: BLE001 - never die silently
            self._log.opt(exception=exc).error("Transport keepalive failed")
            self.break_(f"keepalive error {exc!r}")

    def _next_tick(self, tick: float) -> float:
        """How long the keepalive sleeps: ``tick``, or less when acknowledgements become
        overdue sooner, so that a send waiting for that decision waits little past its own
        deadline."""
        window = self.window
        since = None if window is None else window.waiting_since()
        if since is None:
            return tick
        # Just past the moment (``_ack_overdue`` asks for more than send_timeout).
        due = since + self.send_timeout - _monotonic() + _TIMEOUT_SLACK
        return min(tick, max(due, _TIMEOUT_SLACK))

    # -- receiving (ACK, PONG and connection loss) --------------------------------------

    def _reader_loop(self, stream: _Stream) -> None:
        """Read ACK and PONG frames; also notices at once when the receiver drops us."""
        recv_into = stream.sock.recv_into if stream.tls is None else stream.tls.recv_into
        buf = bytearray(_FRAME)
        view = memoryview(buf)
        got = 0
        try:
            while True:
                n = recv_into(view[got:])  # blocks until data, EOF or shutdown()
                if n == 0:
                    if not self.closing:
                        self.break_(f"stream {stream.index}: receiver closed the connection")
                    return
                got += n
                if got < _FRAME:
                    continue
                got = 0
                try:
                    self._received(stream, bytes(buf))
                except wire.ProtocolError as exc:
                    self.break_(f"stream {stream.index}: {exc}")
                    return
        except OSError as exc:
            if not self.closing:
                self.break_(f"stream {stream.index}: receive failed ({exc})")
        except Exception as exc:  # noqa: BLE001 - never die silently
            self._log.opt(exception=exc).error("Transport reader failed")
            self.break_(f"stream {stream.index}: reader error {exc!r}")

    def _received(self, stream: _Stream, frame: bytes) -> None:
        frame_type, _ = wire.parse_prefix(frame)
        if frame_type == wire.FRAME_PONG:
            wire.parse_ping(frame, wire.FRAME_PONG)
            stream.ping_sent = None
            stream.heard = _monotonic()
            return
        if frame_type != wire.FRAME_ACK:
            raise wire.ProtocolError(f"unexpected frame type {frame_type:#04x} from receiver")
        through = wire.parse_ack(frame)
        window = self.window
        if window is None:
            raise wire.ProtocolError("ACK in an unacknowledged session")
        if not self.first_id <= through < self.next_id:
            raise wire.ProtocolError(
                f"ACK through message {through}, outside the session's {self.first_id}.."
                f"{self.next_id - 1}"
            )
        stream.ping_sent = None  # an ACK proves the receiver alive as well as a PONG
        stream.heard = _monotonic()
        # Cumulative: an ACK at or below one already taken changes nothing.
        window.ack(through)


class MultiStreamTCPTransport:
    """Sends messages to one ``MultiStreamReceiver`` over ``streams`` parallel TCP connections.

    Small messages go whole on one stream (round robin); larger ones are cut into
    ``chunk_size`` chunks written in parallel on all streams. Message ids order delivery, so
    the receiver hands messages to the application in the order ``send`` allocated them.
    ``send`` is thread-safe. Any stream failure breaks the transport until ``close()`` and
    ``start()`` (what recovery does) open a fresh session.

    With ``ssl_context`` every connection runs TLS, handshaken before the DWCP handshake;
    the context decides what is verified (``ssl.create_default_context()`` checks the
    receiver's certificate and that it names ``server_hostname``, by default the host of
    ``address``). Load a client certificate into it for receivers that require one.

    Parameters:
        address: the receiver's (host, port); IPv4 or IPv6.
        streams: TCP connections per session (1..32).
        chunk_size: messages longer than this are cut into chunks of this size (>= 1024).
        connect_timeout: bound on opening every stream and its handshake.
        send_timeout: how long a ``send`` waits for room (in the streams' queues and, with
            ``acknowledged``, the window; then it fails alone, code ``BACKPRESSURE`` or
            ``WINDOW_FULL``), and with ``wait=True`` for its acknowledgement. A write that
            could write nothing for this long breaks the session, unless the receiver said
            it is alive meanwhile (see ``keepalive_timeout``).
        max_message_size: larger messages raise ValueError before any I/O (at least 1).
        acknowledged: the receiver confirms delivery; messages are kept in a window until
            it does, resent by the next session after a failure, and delivered exactly once
            (see "Delivery guarantees" in the README). ``flush()`` and ``send(wait=True)``
            wait for the confirmation.
        max_in_flight, max_in_flight_bytes: with ``acknowledged``, the window's bounds:
            unacknowledged messages, and their bytes (one larger message still goes alone).
            ``send`` waits, within ``send_timeout``, while the window is full.
        checksum: CRC-32C over every payload (headers are always checked).
        ssl_context, server_hostname: TLS, see above.
        keepalive_interval: a stream idle this long is pinged; None: never.
        keepalive_timeout: a PING unanswered this long breaks the session, so a receiver
            that vanished silently shows in ``health_check()`` within about
            ``keepalive_interval + keepalive_timeout``. A write that makes no progress
            breaks the session once the receiver has also said nothing (no PONG, no ACK) for
            ``keepalive_interval + keepalive_timeout``: a receiver waiting for a slow
            consumer says it is alive every ``keepalive_interval``.
        close_timeout: ``close()`` (and so ``Manager.stop()``) waits for queued messages
            to be written and, with ``acknowledged``, confirmed while that progresses, and
            closes the connections anyway once neither a write nor an acknowledgement
            completed for this long; separate from ``send_timeout`` so that a silent peer
            holds up a shutdown for ``close_timeout`` only.
        congestion_control: the TCP congestion control algorithm of every stream (Linux
            ``TCP_CONGESTION``, e.g. ``"bbr"`` or ``"cubic"``); None keeps the kernel's
            default. A name this process cannot set raises ValueError listing the ones
            the kernel has (see "Sending across a WAN" in the README).
    """

    def __init__(
        self,
        address: tuple[str, int],
        *,
        streams: int = 4,
        chunk_size: int = 262144,
        connect_timeout: float | timedelta = 5.0,
        send_timeout: float | timedelta = 10.0,
        max_message_size: int = wire.DEFAULT_MAX_MESSAGE_SIZE,
        acknowledged: bool = False,
        checksum: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        keepalive_interval: float | timedelta | None = 5.0,
        keepalive_timeout: float | timedelta = 10.0,
        max_in_flight: int = 4096,
        max_in_flight_bytes: int = 64 * 1024 * 1024,
        close_timeout: float | timedelta = 1.0,
        congestion_control: str | None = None,
    ) -> None:
        _check_address(address, lowest_port=1)
        check.host_name("address host", address[0])
        self._congestion_control = check.congestion_control(
            "congestion_control", congestion_control
        )
        self._address = address
        self._streams = _bounded_int("streams", streams, 1, wire.MAX_STREAMS)
        self._chunk_size = _bounded_int(
            "chunk_size", chunk_size, wire.MIN_CHUNK_SIZE, wire.MAX_TOTAL_LENGTH
        )
        self._connect_timeout = check.wire_seconds("connect_timeout", connect_timeout)
        self._send_timeout = check.wire_seconds("send_timeout", send_timeout)
        # At least 1: with 0 every send but of b"" would raise.
        self._max_message_size = _bounded_int(
            "max_message_size", max_message_size, 1, wire.MAX_TOTAL_LENGTH
        )
        if not isinstance(acknowledged, bool):
            raise TypeError("acknowledged must be a bool")
        self._acknowledged = acknowledged
        if not isinstance(checksum, bool):
            raise TypeError("checksum must be a bool")
        self._checksum = checksum
        self._ssl_context = ssl_context
        self._server_hostname = _check_tls_options(address, ssl_context, server_hostname)
        self._keepalive_interval = (
            None
            if keepalive_interval is None
            else check.wire_seconds("keepalive_interval", keepalive_interval)
        )
        self._keepalive_timeout = check.wire_seconds("keepalive_timeout", keepalive_timeout)
        self._close_timeout = check.wire_seconds("close_timeout", close_timeout)
        max_in_flight = _bounded_int("max_in_flight", max_in_flight, 1, 1 << 20)
        max_in_flight_bytes = _bounded_int("max_in_flight_bytes", max_in_flight_bytes, 1, 1 << 40)
        self._window = Window(max_in_flight, max_in_flight_bytes) if acknowledged else None
        # Names this transport across its sessions, so that the receiver recognises resent
        # messages (never all zero: that is the anonymous sender).
        self._sender_id = os.urandom(wire.SENDER_ID_SIZE)
        while self._sender_id == wire.ANONYMOUS_SENDER:  # pragma: no cover - 2^-128
            self._sender_id = os.urandom(wire.SENDER_ID_SIZE)
        # The next message id: ids go on from session to session.
        self._next_id = 0
        self._lifecycle = threading.Lock()
        self._session: _Session | None = None
        # A session close() is shutting down: start() waits for it, so the next session
        # knows every id it used and every message it left in the window.
        self._retiring: _Session | None = None
        self._retired = threading.Condition(self._lifecycle)

    @property
    def address(self) -> tuple[str, int]:
        """The receiver's (host, port)."""
        return self._address

    @property
    def started(self) -> bool:
        """Whether ``start()`` succeeded and ``close()`` has not been called since."""
        return self._session is not None

    @property
    def unacknowledged(self) -> int:
        """How many sent messages await their acknowledgement (0 when not ``acknowledged``);
        they survive ``close()`` and are resent first by the next ``start()``."""
        return 0 if self._window is None else self._window.pending

    @property
    def sender_id(self) -> str:
        """This transport's sender id, 32 hex digits: the same for every session of this
        object, new for every object. An acknowledged receiver hands it to ``on_message``
        with ``with_ids=True``, and keys ``resume_from`` with it."""
        return self._sender_id.hex()

    def _delivery_marks(self) -> tuple[int, int] | None:
        """For ``Manager.deliver()``: (the highest message id in the window, the highest
        acknowledged), or None when not ``acknowledged``. Read without a lock: each only
        grows and has one writer, so a stale read is behind, never ahead."""
        window = self._window
        return None if window is None else (window.last, window.acked)

    def __repr__(self) -> str:
        session = self._session
        state = "closed" if session is None else ("broken" if session.broken else "started")
        mode = (
            "unacknowledged"
            if self._window is None
            else f"acknowledged in_flight={self._window.pending}"
        )
        next_id = self._next_id if session is None else session.next_id
        return (
            f"<MultiStreamTCPTransport {self._address[0]}:{self._address[1]} "
            f"streams={self._streams} {mode} next_id={next_id} {state}>"
        )

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Open ``streams`` connections as one new session.

        With ``acknowledged``, the messages still unacknowledged from earlier sessions are
        resent first, in order, under their own ids (the receiver drops those it already
        delivered), and ``start`` returns once they are written. A started transport, even a
        broken one, raises DWCPError (code ``ALREADY_STARTED``): ``close()`` first (as the
        manager's recovery does). Raises TransportError when any connection, handshake or
        resend fails, after closing the connections it did open.
        """
        with self._lifecycle:
            while self._retiring is not None:  # bounded: shutdown() is
                self._retired.wait()
            if self._session is not None:
                raise DWCPError(
                    "transport is already started; close() it first", code="ALREADY_STARTED"
                )
            session_id = os.urandom(wire.SESSION_ID_SIZE)
            window = self._window
            replay = window.replay() if window is not None else []
            first_id = replay[0][0] if replay else self._next_id
            try:
                socks = self._connect(session_id, first_id)
            except TransportError:
                if window is None:
                    # Its HELLO may still reach the receiver late (a stalled link delivers
                    # it after the heal): the next session starts past this first id, so the
                    # receiver sees which of the two is newer (see wire-format.md, HELLO).
                    self._next_id = first_id + 1
                raise
            session = _Session(
                self._address,
                socks,
                session_id=session_id,
                send_timeout=self._send_timeout,
                acknowledged=self._acknowledged,
                checksum=self._checksum,
                keepalive_interval=self._keepalive_interval,
                keepalive_timeout=self._keepalive_timeout,
                first_id=first_id,
                window=window,
                close_timeout=self._close_timeout,
            )
            session.run_threads()
            failed: TransportError | None = None
            if replay:
                try:
                    session.replay(replay, self._chunk_size)
                except TransportError as exc:
                    failed = exc
            if failed is None:
                self._session = session
        if failed is not None:
            # Joined outside the lock; the window still holds every message it resent.
            session.break_(f"resending failed: {failed}")  # (so shutdown waits for nothing)
            session.shutdown()
            raise failed
        logger.bind(
            peer=f"{self._address[0]}:{self._address[1]}",
            session=session_id.hex(),
            streams=self._streams,
            tls=self._ssl_context is not None,
            first_id=first_id,
            resent=len(replay),
        ).info("Transport started")

    def _connect(
        self, session_id: bytes, first_id: int
    ) -> list[tuple[socket.socket, TLSChannel | None]]:
        connections: list[tuple[socket.socket, TLSChannel | None]] = []
        socks: list[socket.socket] = []
        deadline = _monotonic() + self._connect_timeout
        peer = f"{self._address[0]}:{self._address[1]}"
        try:
            for index in range(self._streams):
                sock = socket.create_connection(
                    self._address, timeout=max(deadline - _monotonic(), _TIMEOUT_SLACK)
                )
                socks.append(sock)
                # Small frames must leave at once: Nagle plus delayed ACKs would add tens of
                # milliseconds per acknowledged send.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self._congestion_control is not None:
                    # Set on the connected socket: Linux switches the algorithm of an open
                    # connection, and no data has been sent on it yet.
                    sock.setsockopt(
                        socket.IPPROTO_TCP,
                        socket.TCP_CONGESTION,
                        self._congestion_control.encode("ascii"),
                    )
                hello = wire.pack_handshake(
                    session_id,
                    index,
                    self._streams,
                    acknowledged=self._acknowledged,
                    # Whole milliseconds, at least 1 (the constructor's bounds).
                    keepalive_ms=round((self._keepalive_interval or 0) * 1000),
                    sender_id=self._sender_id,
                    first_id=first_id,
                )
                if self._ssl_context is None:
                    connections.append((sock, None))
                    sock.sendall(hello)
                else:
                    channel = TLSChannel.handshake(
                        sock,
                        self._ssl_context,
                        server_side=False,
                        server_hostname=self._server_hostname,
                        timeout=max(deadline - _monotonic(), _TIMEOUT_SLACK),
                    )
                    connections.append((sock, channel))
                    channel.sendall(hello)
            # Handshakes go out first and answers are read after, so connecting N streams
            # costs about one round trip, not N (plus the TLS handshakes, one at a time).
            for sock, tls in connections:
                sock.settimeout(max(deadline - _monotonic(), _TIMEOUT_SLACK))
                try:
                    welcome = _recv_exactly(tls or sock, wire.WELCOME.size)
                except TimeoutError as exc:  # connected, but what answers is not a receiver
                    raise TransportError(
                        f"no WELCOME from {peer} within connect_timeout "
                        f"({self._connect_timeout:g} s): is a dwcp receiver listening there?"
                    ) from exc
                status = wire.parse_welcome(welcome)
                if status != wire.STATUS_ACCEPTED:
                    why = {wire.STATUS_BUSY: "busy", wire.STATUS_REFUSED: "refused"}.get(
                        status, "unknown status"
                    )
                    raise TransportError(f"receiver refused the session (status {status}: {why})")
                sock.settimeout(None)  # blocking; the session sets the kernel send timeout
        except ssl.SSLError as exc:
            # Also a client certificate the receiver refused: TLS 1.3 tells the client only
            # after its side of the handshake, so the refusal arrives instead of WELCOME.
            for sock in socks:
                _close_quietly(sock)
            raise TransportError(f"TLS with {peer} failed: {exc}") from exc
        except OSError as exc:
            for sock in socks:
                _close_quietly(sock)
            raise TransportError(f"cannot connect to {peer}: {exc}") from exc
        except (wire.ProtocolError, TransportError) as exc:
            for sock in socks:
                _close_quietly(sock)
            if isinstance(exc, TransportError):
                raise
            raise TransportError(f"handshake failed: {exc}") from exc
        return connections

    def close(self) -> None:
        """Write what is queued and, with ``acknowledged``, wait for its acknowledgements,
        for as long as writes or acknowledgements progress (unless the session is broken):
        once neither came for ``close_timeout``, close every connection anyway. Then join
        the transport's threads; idempotent. Messages still unacknowledged are kept for the
        next ``start()``; unacknowledged, messages not written by then are dropped."""
        with self._lifecycle:
            while self._retiring is not None:  # another close() of the same session
                self._retired.wait()
            session, self._session = self._session, None
            self._retiring = session
        if session is None:
            return
        try:
            session.shutdown()
        finally:
            with self._lifecycle:
                self._next_id = max(self._next_id, session.next_id)
                self._retiring = None
                self._retired.notify_all()
        logger.bind(
            peer=f"{self._address[0]}:{self._address[1]}", session=session.session_id.hex()
        ).info("Transport closed")

    def stop(self) -> None:
        """Alias of ``close()`` (the ``Transport`` protocol's name): every dwcp class that
        starts has both names."""
        self.close()

    def send(self, data: Buffer, *, wait: bool = False) -> None:
        """Send ``data`` as the next message, in order.

        Unacknowledged, a message up to 16 KiB, or a ``bytes`` message up to 1 MiB, is
        queued in order and ``send`` returns (each stream's writer thread hands what queued
        up to the kernel in one syscall); a larger message, or a larger mutable buffer the
        caller may reuse, is in the kernel when ``send`` returns. A message is queued whole
        or not at all: when the queues are full (the receiver takes messages more slowly
        than they come), ``send`` waits for room, first come first served, within
        ``send_timeout``, then raises TransportError code ``BACKPRESSURE``: nothing of that
        message was sent, and the session goes on. Once queued, a message is written as
        fast as the receiver reads; only a stall (nothing written for ``send_timeout``
        while the receiver does not say it is alive, see ``keepalive_timeout``) or a socket
        error breaks the session, and the next ``send`` raises. As with bytes the kernel
        accepted, a message queued just before the peer dies may be lost (use
        ``acknowledged``). ``flush()`` waits until everything queued is written.

        With ``acknowledged``, ``send`` returns once the message is in the window (a copy,
        unless it is ``bytes``) and queued as above; it waits, within ``send_timeout``,
        while the window is full. A send that returned is delivered exactly once while the
        receiver process lives, resent after ``close()``/``start()`` if need be; a send
        that raised left nothing behind and is never delivered. ``wait=True`` also waits
        (within ``send_timeout``) for this message's acknowledgement, raising
        TransportError with code ``UNCONFIRMED`` if it does not come in time: that message
        was sent and stays in the window (do not send it again).

        TypeError and ValueError (not bytes-like, over ``max_message_size``, ``wait`` not a
        bool, ``wait`` without ``acknowledged``) are raised before any I/O. TransportError: not started
        (code ``NOT_STARTED``), no room in time (code ``BACKPRESSURE``, see above), broken
        (with the code of the fault that broke the session: ``TRANSPORT_ERROR`` when a
        stream failed or stalled, ``ACK_TIMEOUT`` when acknowledgements did not come within
        ``send_timeout``), or (code ``WINDOW_FULL``) they came, but too slowly to make room
        within it.
        """
        if wait is not False and wait is not True:  # "yes" or 1 would be read as True
            raise TypeError(f"wait must be a bool, got {type(wait).__name__}")
        kind = type(data)
        if kind is not bytes and kind is not bytearray:
            if isinstance(data, memoryview):
                data = data.cast("B") if data.c_contiguous else data.tobytes()
            elif not isinstance(data, (bytes, bytearray)):
                raise TypeError(f"send() needs a bytes-like object, not {kind.__name__}")
        size = len(data)
        if size > self._max_message_size:
            raise ValueError(
                f"message of {size} bytes exceeds max_message_size {self._max_message_size}"
            )
        session = self._session
        window = self._window
        if window is None:
            if wait:
                raise ValueError("send(wait=True) needs acknowledged=True")
            if session is None:
                raise TransportError("transport not started", code="NOT_STARTED")
            if size <= self._chunk_size:
                session.send_small(data, size)
            else:
                session.send_large(data, size, self._chunk_size, track=False)
            return
        if session is None:
            raise TransportError("transport not started", code="NOT_STARTED")
        if kind is not bytes:
            data = bytes(data)  # the window keeps it until the receiver confirms it
        if not wait:
            if size <= self._chunk_size:
                session.send_small(data, size, True)
            else:
                session.send_large(data, size, self._chunk_size, track=True)
            return
        # One deadline for the room in the window and for the acknowledgement.
        deadline = _monotonic() + self._send_timeout
        if size <= self._chunk_size:
            message_id = session.send_small(data, size, True, True, deadline)
        else:
            message_id = session.send_large(
                data, size, self._chunk_size, track=True, urgent=True, deadline=deadline
            )
        session.wait_acked(message_id, deadline)

    def flush(self, timeout: float | timedelta | None = None) -> None:
        """Wait until every message sent so far is written to the kernel and, with
        ``acknowledged``, acknowledged by the receiver (a message sent while nothing awaited
        an acknowledgement asked for it at once, so ``send`` then ``flush`` after a lull is
        as quick as ``send(wait=True)``; after a burst the receiver's ACK delay may apply).

        ``timeout`` defaults to ``send_timeout``. Raises TransportError when not started,
        when the session broke, or when the timeout passed first (code ``UNCONFIRMED`` when
        only acknowledgements are missing); unacknowledged messages stay in the window.
        """
        session = self._session
        if session is None:
            raise TransportError("transport not started", code="NOT_STARTED")
        wait = self._send_timeout if timeout is None else check.wire_seconds("timeout", timeout)
        deadline = _monotonic() + wait
        if not session.flush(wait):
            if session.broken is not None:
                session._raise_broken()
            raise TransportError(f"flush did not complete within {wait:g} s")
        window = self._window
        if window is not None and window.last >= 0:
            session.wait_acked(window.last, deadline)

    def health_check(self) -> None:
        """Return when every stream is up; raise TransportError saying why not.

        Any dead stream breaks the session (see ``_Session``), so this raises as soon as one
        stream failed since the last ``start()``, stricter than "fewer than half alive".
        """
        session = self._session
        if session is None:
            raise TransportError("transport not started", code="NOT_STARTED")
        if session.broken is not None:
            raise TransportError(f"transport broken: {session.broken}", code=session.broken_code)


def _recv_exactly(source: socket.socket | TLSChannel, size: int) -> bytes:
    """Read exactly ``size`` bytes (a handshake answer); EOF first is a ConnectionError."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        part = source.recv_into(view[got:])
        if not part:
            raise ConnectionError("connection closed during handshake")
        got += part
    return bytes(buf)


def _check_tls_options(
    address: tuple[str, int], context: ssl.SSLContext | None, server_hostname: str | None
) -> str | None:
    """Validate the TLS arguments, warn about unsafe choices; return the name to verify."""
    peer = f"{address[0]}:{address[1]}"
    if server_hostname is not None and not isinstance(server_hostname, str):
        raise TypeError("server_hostname must be a str or None")
    if context is None:
        if server_hostname is not None:
            raise ValueError("server_hostname needs ssl_context")
        if not is_loopback_host(address[0]):
            logger.bind(peer=peer).warning(
                "Plaintext transport to a non-loopback address; pass ssl_context to encrypt"
            )
        return None
    if not isinstance(context, ssl.SSLContext):
        raise TypeError("ssl_context must be an ssl.SSLContext or None")
    if context.protocol == ssl.PROTOCOL_TLS_SERVER:
        raise ValueError("ssl_context is a server context; build it for PROTOCOL_TLS_CLIENT")
    name = address[0] if server_hostname is None else server_hostname
    if not name or name.startswith("."):
        raise ValueError(f"server_hostname must be a host name, got {name!r}")
    if context.verify_mode == ssl.CERT_NONE:
        logger.bind(peer=peer).warning("TLS without server verification")
    return name
