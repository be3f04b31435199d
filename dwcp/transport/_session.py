"""The sender's session shell: one ``start()``'s connections, their threads, and the sends.

``Session`` hands out message ids and queues frames on its streams in id order (under its
order lock), waits for room (``_admission``), and owns the session's threads: a writer and a
reader per stream (``_writer``, ``_keepalive``) and the keepalive. The protocol decisions are
the core's (``_sending``): the frames, the striping, what an ACK frees, when a stream stalls.
Waiting for what was sent to be written and confirmed is ``_draining``'s.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Sequence
from typing import NoReturn

from loguru import logger

from dwcp._errors import TransportError
from dwcp.transport import wire
from dwcp.transport._admission import take_contended
from dwcp.transport._batching import queue_tracked
from dwcp.transport._draining import Draining
from dwcp.transport._io import Buffer, TLSChannel, _close_quietly, _set_send_timeout
from dwcp.transport._keepalive import keepalive_loop, reader_loop
from dwcp.transport._sending import (
    COPY_LIMIT,
    DIRECT_MIN,
    HEADER_SIZE,
    OUTBOX_LIMIT,
    Lazy,
    pack_head,
    pack_u32,
    stripes,
    stripes_by_load,
)
from dwcp.transport._window import Window
from dwcp.transport._writer import Batch, Stream, write, writer_loop

__all__ = ["Session"]

_checksum = wire.checksum_of
_monotonic = time.monotonic
_MAGIC = wire.MAGIC
_VERSION = wire.VERSION
_DATA = wire.FRAME_DATA
_pack_head = pack_head
_pack_u32 = pack_u32
_COPY_LIMIT = COPY_LIMIT
_OUTBOX_LIMIT = OUTBOX_LIMIT
_HEADER_SIZE = HEADER_SIZE
# ACK_NOW_EMPTY: a message sent into an empty window (nothing awaits an acknowledgement)
# asks for its ACK at once (ACK_NOW), as send(wait=True) does: so send() then flush() is
# confirmed without waiting out the receiver's ACK delay. In a steady stream the window
# seldom empties, so the receiver still acknowledges in batches.
# A write syscall returns after send_timeout / _STALL_TICKS at most, so that a stall (see
# _sending.stalled) is seen within an eighth of send_timeout of being due.
_STALL_TICKS = 8


class Session(Draining):
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
        # progress (see _sending.stalled); None: no keepalive, so nothing to hear from it.
        self.life = None if keepalive_interval is None else keepalive_interval + keepalive_timeout
        self.streams = [Stream(i, sock, tls) for i, (sock, tls) in enumerate(connections)]
        self.born = max(stream.heard for stream in self.streams)
        for stream in self.streams:
            # Every syscall returns within an eighth of send_timeout; write counts how long
            # nothing could be written from that (the only write deadline).
            _set_send_timeout(stream.sock, send_timeout / _STALL_TICKS)
        self.count = len(self.streams)
        # Message ids are handed out, and frames queued, under this lock: so each stream's
        # outbox is in id order.
        self._order = threading.Lock()
        # Senders that found no room, first come first served (see _admission).
        super().__init__()
        self.first_id = first_id
        self.next_id = first_id
        # The last message sent into an empty window, which asked for its ACK itself (see
        # ACK_NOW_EMPTY): flush() need not ask again (see ask_for_ack).
        self.asked = -1
        # Acknowledged: the transport's window, which outlives this session (see Window).
        self.window = window
        self.broken: str | None = None
        # The TransportError code of the fault that broke the session, set with ``broken``:
        # every send that finds the session broken raises with it, whichever thread noticed.
        self.broken_code = "TRANSPORT_ERROR"
        self.broken_cause: BaseException | None = None
        self.closing = False
        # close() began: every send is refused from here on (set under the order lock, which
        # every send takes its id under), so what close() writes is everything a send
        # returned for. ``closing`` comes once that is written (or given up on).
        self.sealed = False
        # close() wrote everything and sent FIN: a receiver that ends its side is expected.
        self.finishing = False
        self.writers_stop = False
        self.stopped = threading.Event()
        self._keepalive: threading.Thread | None = None
        self._state_lock = threading.Lock()
        self.log = logger.bind(peer=f"{address[0]}:{address[1]}", session=session_id.hex())

    # -- lifecycle ----------------------------------------------------------------------

    def run_threads(self) -> None:
        """Start one writer and one reader (ACK, PONG, EOF) per stream, and the keepalive."""
        for stream in self.streams:
            writer = threading.Thread(
                target=writer_loop,
                args=(self, stream),
                name=f"dwcp-transport-writer-{stream.index}",
                daemon=True,
            )
            reader = threading.Thread(
                target=reader_loop,
                args=(self, stream),
                name=f"dwcp-transport-reader-{stream.index}",
                daemon=True,
            )
            stream.threads = [writer, reader]
            writer.start()
            reader.start()
        if self.keepalive_interval is not None or self.window is not None:
            self._keepalive = threading.Thread(
                target=keepalive_loop, args=(self,), name="dwcp-transport-keepalive", daemon=True
            )
            self._keepalive.start()

    def shutdown(self) -> None:
        """Refuse every new send, write what is queued and, acknowledged, wait for the
        acknowledgements (while they progress, see ``linger``), then stop every stream and
        join the session's threads (``close()``). What is still unacknowledged stays in the
        window for the next session; unacknowledged, what is still queued then is dropped."""
        # Under the order lock, which every send checks it under before it takes an id:
        # nothing is queued (nor joins the window) once close() began, so what linger()
        # writes is everything a send returned for (start() snapshots the window next).
        with self._order:
            self.sealed = True
        # Sends waiting for room, their turn or the window give up now (NOT_STARTED).
        self.wake_waiters()
        for stream in self.streams:
            stream.wake()
        if self.window is not None:
            self.window.wake()
        if self.broken is None and self.linger():
            self.finish()
        with self._order:
            self.closing = True
        self.writers_stop = True
        self.stopped.set()
        for stream in self.streams:
            self._shutdown_socket(stream.sock)
            stream.wake()
        if self.window is not None:
            self.window.wake()
        self.wake_waiters()
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

    def break_(
        self, reason: str, code: str = "TRANSPORT_ERROR", cause: BaseException | None = None
    ) -> None:
        """Mark the session broken (the first reason, its error ``code`` and the socket
        error that ``cause``d it, if any, win) and abort every stream."""
        with self._state_lock:
            if self.broken is not None or self.closing:
                return
            self.broken_code = code
            self.broken = reason
            self.broken_cause = cause
        self.log.bind(reason=reason).warning(f"Transport stream failed: {reason}")
        self.stopped.set()
        for stream in self.streams:
            self._shutdown_socket(stream.sock)
            stream.wake()
        if self.window is not None:
            self.window.wake()
        self.wake_waiters()

    def fail(self, stream: Stream, what: str, exc: BaseException | None) -> NoReturn:
        reason = f"stream {stream.index}: {what}" + (f" ({exc})" if exc is not None else "")
        self.break_(reason, cause=exc)
        if self.broken is not None and self.broken != reason:
            # Another fault broke the session first (this one is likely its consequence):
            # report that one, as every other send does.
            self.raise_broken_from(exc)
        raise TransportError(reason) from exc

    # -- sending ------------------------------------------------------------------------

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
        if self.broken is not None or self.sealed:
            self.raise_broken()
        window = self.window if track else None
        flags = self.urgent_flags if urgent else self.flags
        if size <= _COPY_LIMIT and not urgent:
            # The common case, inlined: one frame copied into a stream's outbox with room,
            # and, tracked, into a window with room but not empty (Window.fits and
            # Window.add, inlined). Into an empty window the message asks for its ACK (see
            # ACK_NOW_EMPTY) and is someone's wait: the path below writes it directly.
            crc = _checksum(data) if self.checksum else 0
            order = self._order
            if not order.acquire(False):
                take_contended(order)
            try:
                if self.sealed:
                    self.raise_broken()
                message_id = self.next_id
                stream = self.streams[message_id % self.count]
                if (not self.waiters and stream.queued < _OUTBOX_LIMIT) and (
                    window is None
                    or (
                        message_id < window.id_limit
                        and window.added + size <= window.byte_limit
                        and window.last != window.acked
                    )
                ):
                    self.next_id = message_id + 1
                    if window is not None:
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
        mark = None if early else Batch(1)
        # Computed here, before the order lock: for a large frame, while the stream's writer
        # is still writing the previous one (the GIL is released for both).
        crc = _checksum(data) if self.checksum else 0
        # A frame of 256 KiB or more gains nothing from batching: when its stream is idle
        # the caller writes it itself, saving the writer thread's hand-off (and it is in the
        # kernel when send returns). Smaller ones share the writer's writev, unless someone
        # waits for their ACK (urgent, or into an empty window: see ACK_NOW_EMPTY), where the
        # hand-off would be a tenth of the round trip.
        wants_direct = size >= DIRECT_MIN or urgent
        order = self._order
        me: object | None = None  # our place among the waiters, once we wait (see enqueue)
        try:
            while True:  # bounded by the deadline: every wait below raises at it
                if not order.acquire(False):
                    take_contended(order)
                try:
                    if self.broken is not None or self.sealed:
                        self.raise_broken()
                    turn = not self.waiters if me is None else self.heads(me)
                    if turn:
                        message_id = self.next_id
                        stream = self.streams[message_id % self.count]
                        full = window is not None and not window.fits(size)
                        if not full and stream.queued < _OUTBOX_LIMIT:
                            self.next_id = message_id + 1
                            if window is not None:
                                if window.last == window.acked:  # see ACK_NOW_EMPTY
                                    flags = self.urgent_flags
                                    self.asked = message_id
                                    wants_direct = True
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
                        me = self.enqueue()
                finally:
                    order.release()
                if not turn:
                    self.await_turn(me, size, deadline)
                elif full:
                    self.wait_for_window(size, deadline)
                else:
                    self.wait_for_room(stream, deadline)
        finally:
            if me is not None:
                self.leave(me)
        try:
            if direct:
                try:
                    write(self, stream, [head, data], _HEADER_SIZE + size)
                finally:
                    stream.unclaim()
            elif mark is not None:
                self.await_written(mark)
            if self.broken is not None:
                # Another stream failed meanwhile; the receiver may never get past the gap.
                self.raise_broken()
        except TransportError:
            if window is None:
                raise
        return message_id

    def queue_tracked(self, messages: Sequence[bytes], limit: int) -> int:
        """Queue the first of ``messages`` that fit now, without waiting; see ``_batching``."""
        return queue_tracked(self, messages, limit)

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
        if self.broken is not None or self.sealed:
            self.raise_broken()
        window = self.window if track else None
        if not deadline:
            deadline = _monotonic() + self.send_timeout
        payloads = _cut(data, size, chunk_size)
        sizes = [len(payload) for payload in payloads]
        streams = self.streams
        flags = self.flags | (wire.FLAG_ACK_NOW if urgent else 0)
        early = type(data) is bytes and size <= _OUTBOX_LIMIT
        batch: Batch | None = None
        order = self._order
        me: object | None = None  # our place among the waiters, once we wait (see enqueue)
        try:
            while True:  # bounded by the deadline: every wait below raises at it
                if not order.acquire(False):
                    take_contended(order)
                try:
                    if self.broken is not None or self.sealed:
                        self.raise_broken()
                    turn = not self.waiters if me is None else self.heads(me)
                    if turn:
                        message_id = self.next_id
                        plan = stripes_by_load(
                            message_id, sizes, [stream.queued for stream in streams]
                        )
                        lanes = [streams[index] for index, _ in plan]
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
                                    self.asked = message_id
                                window.add(message_id, data)  # type: ignore[arg-type]
                            batch = Batch(len(plan))
                            self._queue_chunks(message_id, payloads, size, flags, plan, batch)
                            break
                    if me is None:
                        me = self.enqueue()
                finally:
                    order.release()
                if not turn:
                    self.await_turn(me, size, deadline)
                elif no_room:
                    self.wait_for_window(size, deadline)
                else:
                    assert full is not None
                    self.wait_for_room(full, deadline)
        finally:
            if me is not None:
                self.leave(me)
        assert batch is not None  # the loop ends having queued the message, or raises
        try:
            if not early:
                self.await_written(batch)
            if self.broken is not None:
                self.raise_broken()
        except TransportError:
            if window is None:
                raise
        return message_id

    def replay(self, messages: list[tuple[int, bytes]], chunk_size: int) -> None:
        """Queue the window's messages first, under their own ids (``start()``, before any
        new send can take an id), and return without waiting for them to be written.

        They are queued whole, past the outbox limit: each is already held by the window, so
        queuing costs no memory, and on a slow path their writes take as long as the path
        needs (a 64 MiB window at 3 Mbit/s: three minutes). Waiting for them here would keep
        the transport not started, and ``close()`` waiting on ``start()``, for that long.
        The writers watch them like any write: a stall breaks the session, whose next
        ``start()`` resends them again. New sends queue behind them, waiting for room."""
        flags, count = self.flags, self.count
        with self._order:
            if self.broken is not None or self.sealed:
                self.raise_broken()
            for message_id, data in messages:
                assert message_id == self.next_id, (message_id, self.next_id)
                size = len(data)
                payloads = _cut(data, size, chunk_size)
                plan = stripes(message_id, len(payloads), count)
                self._queue_chunks(message_id, payloads, size, flags, plan, None)
                self.next_id = message_id + 1

    def _queue_chunks(
        self,
        message_id: int,
        payloads: list[memoryview],
        size: int,
        flags: int,
        plan: Sequence[tuple[int, Sequence[int]]],
        batch: Batch | None,
    ) -> None:
        """Queue every chunk of message ``message_id`` on the lanes ``plan`` names (see
        ``stripes``), ``batch`` to complete once each lane wrote its share; the caller holds
        the order lock, so the message is queued whole, in id order on every lane."""
        chunks, checksum = len(payloads), self.checksum
        for index, indexes in plan:
            # Each stream's writer computes its chunks' CRCs: in parallel, and off the
            # caller's thread.
            parts = [
                Lazy(flags, message_id, i, chunks, size, payloads[i], checksum) for i in indexes
            ]
            queued = sum(_HEADER_SIZE + len(payloads[i]) for i in indexes)
            self.streams[index].put(parts, queued, batch, lazy=True)


def _cut(data: Buffer, size: int, chunk_size: int) -> list[memoryview]:
    """``data`` (``size`` bytes) cut into its chunks of ``chunk_size`` bytes, the last one
    shorter; one empty chunk for an empty message (docs/wire-format.md, DATA)."""
    view = memoryview(data).cast("B")
    return [view[i : i + chunk_size] for i in range(0, size, chunk_size)] or [view]
