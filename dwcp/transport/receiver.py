"""The receiving side: accepts sender sessions, reassembles messages and delivers them in order."""

from __future__ import annotations

import collections
import itertools
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING

from loguru import logger

from dwcp.transport import wire
from dwcp.transport._io import TLSChannel, _seconds, set_kernel_timeout

if TYPE_CHECKING:  # typing.Self is 3.11+ and setup.cfg still allows 3.10
    from typing_extensions import Self

__all__ = ["MultiStreamReceiver"]


# Bookkeeping a pending message costs beyond its payload (dict slot, entry object), so a
# flood of empty messages is bounded by the same byte budget as large ones.
_ENTRY_OVERHEAD = 256
# Message ids may run at most this far ahead of the next one to deliver.
_ID_WINDOW = 1 << 24
# Ids of ended sessions remembered to refuse a late stream joining a dead session.
_ENDED_SESSIONS_KEPT = 1024
_STOP_JOIN_TIMEOUT = 5.0
_ACCEPT_ERROR_BACKOFF = 0.1
# Bounds a WELCOME or ACK write to a sender that stopped reading.
_WRITE_TIMEOUT = 10.0
_READ_BUFFER = 256 * 1024
_MSG_WAITALL = getattr(socket, "MSG_WAITALL", 0)


class _Closed(Exception):
    """The session was closed by another thread; the reader just leaves."""


class _Reader:
    """Exact-length reads from a blocking socket.

    Small frames are parsed out of one bulk ``recv_into``; a large payload goes straight
    into its destination with MSG_WAITALL, one wake-up instead of dozens, which matters
    when several reader threads share the GIL.
    """

    __slots__ = ("_buf", "_end", "_sock", "_start", "_view")

    def __init__(self, sock: socket.socket) -> None:
        self._sock: socket.socket | TLSChannel = sock
        self._buf = bytearray(_READ_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    def read(self, size: int) -> bytes:
        """Return ``size`` bytes, fewer only when the peer closed the connection first."""
        if self._end - self._start < size:
            if size > len(self._buf):
                out = bytearray(size)
                with memoryview(out) as view:
                    got = self.readinto(view)
                return bytes(out) if got == size else bytes(out[:got])
            self._fill(size)
            size = min(size, self._end - self._start)
        start = self._start
        self._start = start + size
        return bytes(self._view[start : start + size])

    def _fill(self, size: int) -> None:
        buf, start, end = self._buf, self._start, self._end
        if start:
            left = end - start
            # From a memoryview the move is one memcpy, safe only without overlap.
            buf[:left] = self._view[start:end] if left <= start else buf[start:end]
            end = left
            self._start = 0
        while end < size:
            got = self._sock.recv_into(self._view[end:])
            if not got:
                break
            end += got
        self._end = end

    def readinto(self, target: memoryview) -> int:
        """Fill ``target``; return how many bytes arrived (fewer only at end of stream)."""
        size = len(target)
        got = min(self._end - self._start, size)
        if got:
            target[:got] = self._view[self._start : self._start + got]
            self._start += got
        while got < size:
            part = self._sock.recv_into(target[got:], 0, _MSG_WAITALL)
            if not part:
                break
            got += part
        return got

    def use_tls(self, tls: TLSChannel) -> None:
        """Read decrypted bytes from now on (nothing is buffered before the handshake)."""
        self._sock = tls

    def close(self) -> None:
        self._view.release()


class _Connection:
    """One accepted socket and the thread that reads it."""

    __slots__ = ("index", "peer", "reader", "session", "sock", "thread", "tls", "write_lock")

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.reader = _Reader(sock)
        self.write_lock = threading.Lock()
        self.tls: TLSChannel | None = None
        self.session: _Session | None = None
        self.index = -1
        self.thread: threading.Thread | None = None

    def shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def write(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.sendall(data)
            return
        with self.write_lock:
            self.sock.sendall(data)


class _Pending:
    """A message being reassembled, then waiting for its turn to be delivered."""

    __slots__ = (
        "ack_conn",
        "buf",
        "chunk_size",
        "chunks_left",
        "cost",
        "count",
        "payload",
        "seen",
        "total",
    )

    def __init__(self, header: wire.DataHeader, cost: int) -> None:
        self.count = header.chunk_count
        self.chunk_size = header.chunk_size
        self.total = header.total_length
        self.chunks_left = header.chunk_count
        self.cost = cost
        multi = header.chunk_count > 1
        # Lengths were validated by parse_data_header before we allocate from them.
        self.buf = bytearray(header.total_length) if multi else None
        self.seen = bytearray(header.chunk_count) if multi else None
        self.payload: bytes | None = None
        self.ack_conn: _Connection | None = None


class _Session:
    """The receiving state of one sender session (all its streams)."""

    def __init__(self, session_id: bytes, stream_count: int, acknowledged: bool) -> None:
        self.id = session_id
        self.name = session_id.hex()
        self.stream_count = stream_count
        self.acknowledged = acknowledged
        # Guarded by the receiver's lock.
        self.connections: list[_Connection | None] = [None] * stream_count
        self.open_streams = 0
        # Guarded by ``lock``; ``cond`` (same lock) wakes readers waiting for buffer room.
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.next_id = 0
        self.pending: dict[int, _Pending] = {}
        self.ready: dict[int, _Pending] = {}
        self.buffered = 0
        self.progress = 0
        self.waiting = 0
        self.delivering = False
        self.closed = False


class MultiStreamReceiver:
    """Accepts ``MultiStreamTCPTransport`` sessions and calls ``on_message`` for each message.

    ``on_message(data)`` runs on a receiver thread, exactly once per complete, verified
    message, in the sender's message-id order, never concurrently for one session.
    Malformed or hostile input closes that connection and its session, and nothing else.
    Per session, reassembly memory stays under ``max_buffered_bytes + max_message_size``.

    With ``ssl_context`` (a ``PROTOCOL_TLS_SERVER`` context holding the receiver's
    certificate) every connection must complete a TLS handshake within
    ``tls_handshake_timeout`` before its DWCP handshake; a context with ``verify_mode =
    CERT_REQUIRED`` and a CA also requires a client certificate (mutual TLS). A failed
    handshake closes only that connection.
    """

    def __init__(
        self,
        address: tuple[str, int] = ("127.0.0.1", 0),
        *,
        on_message: Callable[[bytes], object],
        max_message_size: int = wire.DEFAULT_MAX_MESSAGE_SIZE,
        max_sessions: int = 16,
        idle_timeout: float | timedelta | None = 300.0,
        max_buffered_bytes: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        tls_handshake_timeout: float | timedelta = 10.0,
    ) -> None:
        if not callable(on_message):
            raise TypeError("on_message must be callable")
        if not isinstance(address, tuple) or len(address) != 2:
            raise TypeError("address must be a (host, port) tuple")
        if ssl_context is not None:
            if not isinstance(ssl_context, ssl.SSLContext):
                raise TypeError("ssl_context must be an ssl.SSLContext or None")
            if ssl_context.protocol == ssl.PROTOCOL_TLS_CLIENT:
                raise ValueError(
                    "ssl_context is a client context; build it for PROTOCOL_TLS_SERVER"
                )
        self._ssl_context = ssl_context
        self._tls_handshake_timeout = _seconds("tls_handshake_timeout", tls_handshake_timeout)
        self._requested = address
        self._on_message = on_message
        self._max_message_size = _bounded_int(
            "max_message_size", max_message_size, 0, wire.MAX_TOTAL_LENGTH
        )
        self._max_sessions = _bounded_int("max_sessions", max_sessions, 1, 1 << 16)
        if max_buffered_bytes is None:
            max_buffered_bytes = 2 * max(self._max_message_size, 1 << 20)
        self._max_buffered = _bounded_int("max_buffered_bytes", max_buffered_bytes, 1, 1 << 62)
        if idle_timeout is not None:
            seconds = (
                idle_timeout.total_seconds()
                if isinstance(idle_timeout, timedelta)
                else idle_timeout
            )
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
                raise TypeError("idle_timeout must be seconds, a timedelta, or None")
            if not seconds > 0:
                raise ValueError(f"idle_timeout must be > 0 or None, got {idle_timeout!r}")
            idle_timeout = float(seconds)
        self._idle_timeout: float | None = idle_timeout
        self._max_connections = self._max_sessions * wire.MAX_STREAMS

        self._lock = threading.Lock()
        self._bound: tuple[str, int] | None = None
        self._running = False
        self._listener: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._accept_thread: threading.Thread | None = None
        self._sessions: dict[bytes, _Session] = {}
        self._ended: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._connections: set[_Connection] = set()
        # Every reader thread until joined: a thread leaves ``_connections`` while still
        # finishing, and stop() must join it all the same.
        self._readers: list[threading.Thread] = []
        self._conn_numbers = itertools.count(1)
        self._delivered = 0
        self._delivered_waiters = 0
        # A plain lock for the per-message increment; the condition (same lock) is only
        # notified when someone waits in wait_delivered().
        self._delivered_lock = threading.Lock()
        self._delivered_cond = threading.Condition(self._delivered_lock)

    # -- public surface ---------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); after a restart, the same port as before."""
        if self._bound is None:
            raise RuntimeError("receiver not started")
        return self._bound

    @property
    def delivered_count(self) -> int:
        """How many messages ``on_message`` has been called with since construction."""
        return self._delivered

    @property
    def session_count(self) -> int:
        """How many sender sessions are open right now."""
        with self._lock:
            return len(self._sessions)

    def wait_delivered(self, count: int, timeout: float) -> bool:
        """Wait until ``delivered_count >= count``; return False if ``timeout`` passes first."""
        with self._delivered_cond:
            self._delivered_waiters += 1
            try:
                return self._delivered_cond.wait_for(lambda: self._delivered >= count, timeout)
            finally:
                self._delivered_waiters -= 1

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Bind and start accepting; a no-op when running. Restarts reuse the bound port."""
        with self._lock:
            if self._running:
                return
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                # Lets a restarted receiver bind its port again while old connections linger
                # in TIME_WAIT (the "peer restarts" case).
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(self._bound or self._requested)
                listener.listen(128)
                listener.setblocking(False)
            except OSError:
                listener.close()
                raise
            host, port = listener.getsockname()[:2]
            self._bound = (host, port)
            self._listener = listener
            self._wake = socket.socketpair()
            self._sessions.clear()
            self._running = True
            self._accept_thread = threading.Thread(
                target=self._accept_loop,
                args=(listener, self._wake[0]),
                name="dwcp-receiver-accept",
                daemon=True,
            )
            self._accept_thread.start()
        logger.bind(address=f"{host}:{port}", tls=self._ssl_context is not None).info(
            "Receiver started"
        )

    def stop(self) -> None:
        """Close the listener and every connection, and join every thread; idempotent."""
        with self._lock:
            if not self._running:
                return
            self._running = False
            wake, accept_thread = self._wake, self._accept_thread
            sessions = list(self._sessions.values())
        assert wake is not None and accept_thread is not None
        wake[1].send(b"x")
        accept_thread.join()
        for session in sessions:
            self._close_session(session)
        with self._lock:
            connections = list(self._connections)
            readers, self._readers = self._readers, []
        for conn in connections:
            conn.shutdown()
        deadline = time.monotonic() + _STOP_JOIN_TIMEOUT
        for thread in readers:
            thread.join(max(deadline - time.monotonic(), 0.0))
            if thread.is_alive():
                # Only user code (on_message) can hold a reader this long.
                logger.bind(thread=thread.name).warning("Receiver thread did not stop")
        for sock in wake:
            sock.close()
        with self._lock:
            self._wake = self._accept_thread = self._listener = None
        logger.bind(address=f"{self.address[0]}:{self.address[1]}").info("Receiver stopped")

    # -- accepting --------------------------------------------------------------------------

    def _accept_loop(self, listener: socket.socket, wake: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ)
        selector.register(wake, selectors.EVENT_READ)
        try:
            while True:
                for key, _ in selector.select():
                    if key.fileobj is wake:
                        return
                    try:
                        sock, addr = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:
                        # E.g. out of file descriptors: back off instead of spinning.
                        logger.bind(error=str(exc)).warning("Receiver accept failed")
                        if selector.select(_ACCEPT_ERROR_BACKOFF):
                            break
                        continue
                    self._admit_connection(sock, f"{addr[0]}:{addr[1]}")
        except Exception as exc:  # noqa: BLE001 - the accept thread must not die silently
            logger.opt(exception=exc).error("Receiver accept loop failed")
        finally:
            selector.close()
            listener.close()

    def _admit_connection(self, sock: socket.socket, peer: str) -> None:
        with self._lock:
            full = len(self._connections) >= self._max_connections
            if not full:
                conn = _Connection(sock, peer)
                self._connections.add(conn)
                conn.thread = threading.Thread(
                    target=self._serve,
                    args=(conn,),
                    name=f"dwcp-receiver-conn-{next(self._conn_numbers)}",
                    daemon=True,
                )
                self._readers = [t for t in self._readers if t.is_alive()]
                self._readers.append(conn.thread)
        if full:
            logger.bind(peer=peer, reason="too many connections").warning(
                "Receiver closed connection"
            )
            sock.close()
            return
        sock.setblocking(True)
        if self._idle_timeout is not None:
            set_kernel_timeout(sock, socket.SO_RCVTIMEO, self._idle_timeout)
        set_kernel_timeout(sock, socket.SO_SNDTIMEO, _WRITE_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert conn.thread is not None
        conn.thread.start()

    # -- per-connection reading -------------------------------------------------------------

    def _serve(self, conn: _Connection) -> None:
        session: _Session | None = None
        try:
            # Here, not on the accept thread: a client that never speaks TLS stalls only
            # its own connection.
            if self._ssl_context is not None and not self._start_tls(conn, self._ssl_context):
                return
            session = self._handshake(conn)
            if session is not None:
                self._read_frames(conn, session)
                self._stream_ended(session)
        except _Closed:
            pass
        except wire.ProtocolError as exc:
            self._abort(conn, conn.session, str(exc))
        except (BlockingIOError, TimeoutError):  # SO_RCVTIMEO expired
            self._abort(conn, conn.session, "idle timeout")
        except ssl.SSLError as exc:
            self._abort(conn, conn.session, f"TLS error: {exc}")
        except OSError as exc:
            self._abort(conn, conn.session, f"socket error: {exc}")
        except Exception as exc:  # noqa: BLE001 - a bug closes the session, not the receiver
            logger.opt(exception=exc).error("Receiver connection failed")
            self._abort(conn, conn.session, f"internal error: {exc!r}")
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.reader.close()
            conn.sock.close()

    def _start_tls(self, conn: _Connection, context: ssl.SSLContext) -> bool:
        """Run the TLS handshake; on failure close the connection, say why, return False."""
        try:
            tls = TLSChannel.handshake(
                conn.sock, context, server_side=True, timeout=self._tls_handshake_timeout
            )
        except TimeoutError:
            self._abort(conn, None, "TLS handshake timed out")
            return False
        except OSError as exc:  # ssl.SSLError included: refused certificate, not TLS at all
            self._abort(conn, None, f"TLS handshake failed: {exc}")
            return False
        # Blocking again, so the kernel timeouts set on accepting (idle_timeout) apply.
        conn.sock.settimeout(None)
        conn.tls = tls
        conn.reader.use_tls(tls)
        return True

    def _handshake(self, conn: _Connection) -> _Session | None:
        raw = conn.reader.read(wire.HANDSHAKE.size)
        if len(raw) < wire.HANDSHAKE.size:
            raise wire.ProtocolError("connection closed during handshake")
        hello = wire.parse_handshake(raw)
        reject: str | None = None
        busy = False
        with self._lock:
            if not self._running:
                raise _Closed
            session = self._sessions.get(hello.session_id)
            if hello.session_id in self._ended:
                reject = "session already ended"
            elif session is None:
                if len(self._sessions) >= self._max_sessions:
                    reject, busy = "too many sessions", True
                else:
                    session = _Session(hello.session_id, hello.stream_count, hello.acknowledged)
                    self._sessions[hello.session_id] = session
            elif (session.stream_count, session.acknowledged) != (
                hello.stream_count,
                hello.acknowledged,
            ):
                reject = "handshake disagrees with its session"
            elif session.connections[hello.stream_index] is not None:
                reject = f"stream {hello.stream_index} already connected"
            if reject is None:
                assert session is not None
                session.connections[hello.stream_index] = conn
                session.open_streams += 1
                conn.session, conn.index = session, hello.stream_index
        if reject is not None:
            # Only this connection is refused: a stranger must not be able to close a
            # session by replaying its id.
            logger.bind(peer=conn.peer, reason=reject, session=hello.session_id.hex()).warning(
                "Receiver closed connection"
            )
            if busy:
                conn.write(wire.pack_welcome(wire.STATUS_BUSY))
            return None
        conn.write(wire.pack_welcome(wire.STATUS_ACCEPTED))
        return session

    def _read_frames(self, conn: _Connection, session: _Session) -> None:
        read, readinto = conn.reader.read, conn.reader.readinto
        header_size = wire.DATA_HEADER.size
        parse, verify = wire.parse_data_header, wire.verify_checksum
        limit = self._max_message_size
        while True:
            raw = read(header_size)
            if not raw:
                return  # clean end of stream, between frames
            if len(raw) < header_size:
                raise wire.ProtocolError("connection closed inside a frame header")
            header = parse(raw, limit)
            length = header.payload_length
            if header.chunk_count == 1 and self._claim_turn(session, header.message_id):
                # Fast path: the next message in order, whole in one frame, goes straight
                # to on_message without a reassembly entry.
                payload = read(length)
                if len(payload) < length:
                    raise wire.ProtocolError("connection closed inside a frame")
                verify(header, payload)
                self._deliver_one(session, header.message_id, payload, conn)
                self._deliver(session)
                continue
            entry = self._reserve(session, header, conn)
            if entry.buf is None:
                payload = read(length)
                if len(payload) < length:
                    raise wire.ProtocolError("connection closed inside a frame")
                verify(header, payload)
                entry.payload = payload
                turn = self._complete(session, header.message_id, entry)
            else:
                offset = header.offset
                view = memoryview(entry.buf)[offset : offset + length]
                try:
                    if readinto(view) < length:
                        raise wire.ProtocolError("connection closed inside a frame")
                    verify(header, view)
                finally:
                    view.release()
                turn = self._chunk_done(session, header.message_id, entry)
            if turn:
                self._deliver(session)

    # -- reassembly and ordering (state under session.cond) ---------------------------------

    def _claim_turn(self, session: _Session, mid: int) -> bool:
        """Take the delivery turn for ``mid`` if it is next and nobody else delivers."""
        with session.lock:
            if session.closed:
                raise _Closed
            if mid != session.next_id or session.delivering or mid in session.pending:
                return False  # the general path sorts it out (or reports the duplicate)
            session.delivering = True
            session.next_id += 1
            session.progress += 1
            return True

    def _reserve(self, session: _Session, header: wire.DataHeader, conn: _Connection) -> _Pending:
        """Find or create the entry for a frame's message, within the session's limits."""
        mid = header.message_id
        with session.lock:
            if session.closed:
                raise _Closed
            entry = session.pending.get(mid)
            if entry is None:
                if mid < session.next_id or mid in session.ready:
                    raise wire.ProtocolError(f"message {mid} received twice")
                if mid >= session.next_id + _ID_WINDOW:
                    raise wire.ProtocolError(f"message id {mid} too far ahead")
                cost = header.total_length + header.chunk_count + _ENTRY_OVERHEAD
                self._wait_for_room(session, mid, cost)
                entry = _Pending(header, cost)
                session.pending[mid] = entry
                session.buffered += cost
            elif entry.seen is None:
                raise wire.ProtocolError(f"message {mid} received twice")
            elif (entry.count, entry.chunk_size, entry.total) != (
                header.chunk_count,
                header.chunk_size,
                header.total_length,
            ):
                raise wire.ProtocolError(f"chunk of message {mid} disagrees with its first chunk")
            if entry.seen is not None:
                if entry.seen[header.chunk_index]:
                    raise wire.ProtocolError(f"chunk {header.chunk_index} of {mid} received twice")
                entry.seen[header.chunk_index] = 1
            if header.chunk_index == 0:
                entry.ack_conn = conn
            return entry

    def _wait_for_room(self, session: _Session, mid: int, cost: int) -> None:
        """Block (backpressure) while the session's buffers are full; caller holds the lock.

        The next message to deliver is always admitted, so the session can make progress.
        Without any progress for ``idle_timeout`` the reorder window is hopeless: give up.
        """
        while session.buffered + cost > self._max_buffered and mid != session.next_id:
            progress = session.progress
            session.waiting += 1
            try:
                session.cond.wait(self._idle_timeout)
            finally:
                session.waiting -= 1
            if session.closed:
                raise _Closed
            if session.progress == progress and session.buffered + cost > self._max_buffered:
                raise wire.ProtocolError("reassembly buffer limit exceeded")

    def _chunk_done(self, session: _Session, mid: int, entry: _Pending) -> bool:
        with session.lock:
            if session.closed:
                raise _Closed
            entry.chunks_left -= 1
            if entry.chunks_left:
                return False
        # The last chunk's reader copies outside the lock; nobody else touches ``buf`` now.
        assert entry.buf is not None
        entry.payload = bytes(entry.buf)
        entry.buf = None
        return self._complete(session, mid, entry)

    def _complete(self, session: _Session, mid: int, entry: _Pending) -> bool:
        """Move a whole message to the ready set; True when this thread must deliver."""
        with session.lock:
            if session.closed:
                raise _Closed
            del session.pending[mid]
            session.ready[mid] = entry
            session.progress += 1
            if session.waiting:
                session.cond.notify_all()
            if session.delivering or mid != session.next_id:
                return False
            session.delivering = True
            return True

    def _deliver(self, session: _Session) -> None:
        """Deliver ready messages in id order until the next one is missing.

        Only one thread per session delivers at a time (``delivering``); others leave their
        completed messages in ``ready`` for it, so no lock is held across ``on_message``.
        """
        while True:
            with session.lock:
                entry = None if session.closed else session.ready.pop(session.next_id, None)
                if entry is None:
                    session.delivering = False
                    return
                mid = session.next_id
                session.next_id += 1
                session.buffered -= entry.cost
                session.progress += 1
                if session.waiting:
                    session.cond.notify_all()
            payload, entry.payload = entry.payload, None
            assert payload is not None
            self._deliver_one(session, mid, payload, entry.ack_conn)

    def _deliver_one(
        self, session: _Session, mid: int, payload: bytes, ack_conn: _Connection | None
    ) -> None:
        try:
            self._on_message(payload)
        except Exception as exc:  # noqa: BLE001 - the application's bug must not kill the session
            logger.bind(session=session.name, message_id=mid).opt(exception=exc).error(
                "Message handler failed"
            )
        with self._delivered_lock:
            self._delivered += 1
            if self._delivered_waiters:
                self._delivered_cond.notify_all()
        if session.acknowledged and ack_conn is not None:
            try:
                ack_conn.write(wire.pack_ack(mid))
            except OSError as exc:
                # The sender times out waiting and breaks its side; keep delivering.
                logger.bind(session=session.name, message_id=mid, error=str(exc)).warning(
                    "Receiver could not acknowledge message"
                )

    # -- ending sessions --------------------------------------------------------------------

    def _stream_ended(self, session: _Session) -> None:
        """A stream closed cleanly; the session ends when all its streams have."""
        with self._lock:
            session.open_streams -= 1
            if session.open_streams:
                return
        with session.lock:
            left = len(session.pending) + len(session.ready)
        if left:
            logger.bind(session=session.name, undelivered=left).warning(
                "Session ended with incomplete messages"
            )
        self._close_session(session)

    def _abort(self, conn: _Connection, session: _Session | None, reason: str) -> None:
        if session is not None and session.closed:
            return  # another thread closed it and said why
        if not self._running:
            return  # stop() is closing everything
        logger.bind(
            peer=conn.peer, reason=reason, session=session.name if session else None
        ).warning("Receiver closed connection")
        if session is None:
            conn.shutdown()
        else:
            self._close_session(session)

    def _close_session(self, session: _Session) -> None:
        """Forget a session, drop its undelivered messages and shut all its connections."""
        with self._lock:
            if self._sessions.get(session.id) is session:
                del self._sessions[session.id]
            self._ended[session.id] = None
            while len(self._ended) > _ENDED_SESSIONS_KEPT:
                self._ended.popitem(last=False)
            connections = [c for c in session.connections if c is not None]
        with session.lock:
            session.closed = True
            session.pending.clear()
            session.ready.clear()
            session.buffered = 0
            session.cond.notify_all()
        for conn in connections:
            conn.shutdown()


def _bounded_int(name: str, value: int, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value}")
    return value
