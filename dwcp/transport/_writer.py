"""The sender's stream I/O shell: one connection's outbox and the writer that drains it.

``Stream`` holds what waits to be written on one connection; ``writer_loop`` (its writer
thread) hands whatever queued up to the kernel in one writev(); ``write`` writes frames or
breaks the session. No protocol decision here: what to write comes from the session
(``_session.py``), when a write is stalled from the core (``_sending.stalled``).
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from dwcp._errors import TransportError
from dwcp.transport._io import Buffer, TLSChannel
from dwcp.transport._sending import Lazy, built

if TYPE_CHECKING:
    from dwcp.transport._session import Session

__all__ = ["IOV_MAX", "Batch", "Stream", "write", "writer_loop"]

_writev = getattr(os, "writev", None)  # POSIX only; elsewhere socket.sendmsg()
_monotonic = time.monotonic
# Buffers per writev() (POSIX guarantees 16, Linux takes 1024).
IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16, 1024)


class Stream:
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
        self.outbox: list[Buffer | Lazy] = []
        self.lazy = False
        self.marks: list[Batch] = []
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
        parts: Sequence[Buffer | Lazy],
        size: int,
        mark: Batch | None,
        *,
        lazy: bool = False,
    ) -> None:
        """Queue ``parts`` (``size`` bytes on the wire); the caller holds the session's
        order lock (frames without a message id, PINGs, need not). ``lazy``: some parts
        are ``Lazy`` frames for the writer to build."""
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


class Batch:
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


def writer_loop(session: Session, stream: Stream) -> None:
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
                    if session.broken is not None:
                        session.raise_broken()
                    built_parts = built(parts) if lazy else cast("list[Buffer]", parts)
                    write(session, stream, built_parts, size)
                    stream.writes += 1
                except TransportError as exc:
                    error = exc
                finally:
                    with stream.lock:
                        stream.busy = False
                    del parts
                for mark in marks:
                    mark.finish(error)
            if session.writers_stop:
                return
    except Exception as exc:  # noqa: BLE001 - a bug must fail the sends, not hang them
        session.log.opt(exception=exc).error("Transport writer failed")
        session.break_(f"stream {stream.index}: writer error {exc!r}")
        with stream.lock:
            marks, stream.marks, stream.outbox = stream.marks, [], []
        for mark in marks:
            mark.finish(exc)


def write(session: Session, stream: Stream, parts: list[Buffer], size: int) -> None:
    """Write ``parts`` (``size`` bytes in all), or break the session.

    A write may take as long as the receiver reads: only a stall (see ``_send_rest``:
    nothing written for send_timeout while the receiver does not say it is alive) or a
    socket error breaks the session. How long frames waited in the outbox does not
    count: a slow consumer is backpressure, which senders wait out before they queue
    (see ``_admission``), not a fault.
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
                _send_rest(session, stream, [records], 0)
            return
        try:
            if len(parts) == 1:
                sent = sock.send(parts[0])
            elif len(parts) <= IOV_MAX:
                sent = _writev(stream.fd, parts) if _writev else sock.sendmsg(parts)
            else:
                sent = 0  # more buffers than one writev takes: _send_rest goes in groups
        except BlockingIOError:
            sent = 0  # nothing in one tick of the kernel timeout: _send_rest goes on
        if sent < size:
            if sent:
                stream.progress = _monotonic()
            _send_rest(session, stream, parts, sent)
    except (BlockingIOError, TimeoutError) as exc:
        session.fail(stream, "stalled: nothing could be written for send_timeout", exc)
    except ssl.SSLError as exc:
        session.fail(stream, "TLS error", exc)
    except OSError as exc:
        session.fail(stream, "send failed", exc)


def _send_rest(session: Session, stream: Stream, parts: Sequence[Buffer], sent: int) -> None:
    """Write ``parts`` but their first ``sent`` bytes; BlockingIOError once the write is
    stalled (see ``Admission.stalled``)."""
    rest: list[Buffer] = []
    for whole in parts:
        if sent >= len(whole):
            sent -= len(whole)
            continue
        rest.append(memoryview(whole).cast("B")[sent:] if sent else whole)
        sent = 0
    sock = stream.sock
    while rest:  # bounded: each round writes, or fails once send_timeout passed
        group = rest[:IOV_MAX]
        try:
            done = _writev(stream.fd, group) if _writev else sock.sendmsg(group)
        except BlockingIOError:
            if session.stalled(stream):  # else a kernel timeout tick with nothing written
                raise
            continue
        stream.progress = _monotonic()
        while rest and done >= len(rest[0]):
            done -= len(rest.pop(0))
        if done:
            rest[0] = memoryview(rest[0]).cast("B")[done:]
