"""The receiving side: accepts sender sessions, reassembles messages and delivers them in order.

This module is the receiver's lifecycle and its thin I/O shell; the decisions live in
modules without I/O: ``wire`` (the frame codec), ``_receiving`` (a stream's frames, the
ACK policy), ``_sessions`` (what a HELLO gets, when a session is over) and ``_reassembly``
(admission, ordering, the memory budget). ``_reader`` reads streams, ``_handing`` runs
the delivery threads, ``_accept`` the listener.
"""

from __future__ import annotations

import itertools
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from datetime import timedelta

from loguru import logger

from dwcp import _validation as check
from dwcp._errors import DWCPError
from dwcp._lifecycle import Phases, StartStop
from dwcp.transport import wire
from dwcp.transport._accept import accept_loop, listen
from dwcp.transport._handing import Delivery, check_arity
from dwcp.transport._io import (
    TLSChannel,
    _bounded_int,
    _check_address,
    set_kernel_timeout,
)
from dwcp.transport._reader import Connection, StreamReader
from dwcp.transport._reassembly import Closed
from dwcp.transport._resume import resume_positions
from dwcp.transport._sessions import SENDERS_KEPT, Session, SessionTable

__all__ = ["SENDERS_KEPT", "MultiStreamReceiver"]


_STOP_JOIN_TIMEOUT = 5.0
# Bounds a WELCOME, ACK or PONG write to a sender that stopped reading.
_WRITE_TIMEOUT = 10.0


class MultiStreamReceiver(StartStop):
    """Accepts ``MultiStreamTCPTransport`` sessions and calls ``on_message`` for each message.

    ``on_message(data)`` runs on the session's delivery thread, exactly once per complete,
    verified message, in the sender's message-id order, never concurrently for one session
    (nor for two sessions of one sender: a sender's new session waits for its old one).
    What an acknowledged sender resends after a reconnect and was delivered before is
    acknowledged and dropped, so each message is delivered once while this object lives
    (the positions of at most ``SENDERS_KEPT`` senders are remembered). Malformed or hostile
    input closes that connection and its session, and nothing else.

    Memory: a session holds at most ``max_buffered_bytes + max_message_size`` of message
    data (plus 64 bytes a chunk) and about 1.5 MiB a stream (read buffer, parsed frames, the
    piece of a large frame being read); the receiver at most
    ``max_sessions`` times that. Memory follows bytes received: a header alone reserves
    budget but allocates at most 1 MiB (for as long as the peer trickles the frame on: a
    bound of size, not of time).

    Parameters:
        address: (host, port) to listen on; port 0 picks a free one, IPv6 hosts work.
        on_message: called with each message's bytes; with ``with_ids``, as
            ``on_message(data, sender_id, message_id)``.
        max_message_size: the largest message accepted; larger ones close the session.
        max_sessions: sender sessions served at once; more are answered BUSY.
        idle_timeout: a connection silent this long is closed (senders ping while idle),
            and so is a session whose reassembly makes no progress this long; None: never.
        max_buffered_bytes: per session, the message bytes held before readers wait.
        ssl_context: a ``PROTOCOL_TLS_SERVER`` context: every connection runs TLS (mutual
            TLS when it requires client certificates).
        tls_handshake_timeout: bound on each TLS handshake.
        handshake_timeout: bound on receiving a connection's HELLO (idle_timeout too).
        join_timeout: every stream a session announced must connect within this.
        frame_timeout: a frame whose first bytes arrived fails once no further byte of it
            came for this long (a stall); one that keeps arriving may take any time.
        with_ids: also hand ``on_message`` the sender's id (``str``, 32 hex digits, its
            ``MultiStreamTCPTransport.sender_id``) and the message's id (``int``, counted
            from 0 per sender), for the application to record what it processed.
        resume_from: ``{sender_id: message_id}``, the last message the application
            durably processed per sender (at most ``SENDERS_KEPT``): that sender's resent
            messages at or below it are dropped (and confirmed), as duplicates are within
            one receiver's life. A message is confirmed once ``on_message`` returned, so
            record it before returning.
    """

    def __init__(
        self,
        address: tuple[str, int] = ("127.0.0.1", 0),
        *,
        on_message: Callable[[bytes], object] | Callable[[bytes, str, int], object],
        max_message_size: int = wire.DEFAULT_MAX_MESSAGE_SIZE,
        max_sessions: int = 16,
        idle_timeout: float | timedelta | None = 60.0,
        max_buffered_bytes: int = 32 * 1024 * 1024,
        ssl_context: ssl.SSLContext | None = None,
        tls_handshake_timeout: float | timedelta = 10.0,
        handshake_timeout: float | timedelta = 10.0,
        join_timeout: float | timedelta = 10.0,
        frame_timeout: float | timedelta = 30.0,
        with_ids: bool = False,
        resume_from: Mapping[str, int] | None = None,
    ) -> None:
        if not callable(on_message):
            raise TypeError("on_message must be callable")
        _check_address(address, lowest_port=0)
        check.host_name("address host", address[0])
        if ssl_context is not None:
            if not isinstance(ssl_context, ssl.SSLContext):
                raise TypeError("ssl_context must be an ssl.SSLContext or None")
            if ssl_context.protocol == ssl.PROTOCOL_TLS_CLIENT:
                raise ValueError(
                    "ssl_context is a client context; build it for PROTOCOL_TLS_SERVER"
                )
        self._ssl_context = ssl_context
        self._tls_handshake_timeout = check.seconds("tls_handshake_timeout", tls_handshake_timeout)
        self._handshake_timeout = check.seconds("handshake_timeout", handshake_timeout)
        self._join_timeout = check.seconds("join_timeout", join_timeout)
        self._frame_timeout = check.seconds("frame_timeout", frame_timeout)
        self._requested = address
        self._max_message_size = _bounded_int(
            "max_message_size", max_message_size, 0, wire.MAX_TOTAL_LENGTH
        )
        self._max_sessions = _bounded_int("max_sessions", max_sessions, 1, 1 << 16)
        self._max_buffered = _bounded_int("max_buffered_bytes", max_buffered_bytes, 1, 1 << 62)
        self._idle_timeout = (
            None if idle_timeout is None else check.seconds("idle_timeout", idle_timeout)
        )
        self._max_connections = self._max_sessions * wire.MAX_STREAMS
        self._reader = StreamReader(
            max_message_size=self._max_message_size,
            idle_timeout=self._idle_timeout,
            frame_timeout=self._frame_timeout,
        )

        self._lock = threading.Lock()
        self._bound: tuple[str, int] | None = None
        self._running = False  # accepting: the phase is "running"
        self._phases = Phases(self._lock)  # a stop() racing a start() waits, then stops
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._accept_thread: threading.Thread | None = None
        self._table = SessionTable(
            max_sessions=self._max_sessions,
            max_buffered=self._max_buffered,
            join_timeout=self._join_timeout,
        )
        self._connections: set[Connection] = set()
        # Every thread until joined: a thread leaves ``_connections`` (or its session ends)
        # while still finishing, and stop() must join it all the same.
        self._threads: list[threading.Thread] = []
        self._numbers = itertools.count(1)
        if not isinstance(with_ids, bool):
            raise TypeError(f"with_ids must be a bool, got {type(with_ids).__name__}")
        check_arity(on_message, 3 if with_ids else 1)
        for sender_id, next_id in resume_positions(resume_from, SENDERS_KEPT).items():
            self._table.sender(sender_id).next_id = next_id
        self._delivery = Delivery(on_message, self._session_finished, with_ids=with_ids)

    # -- public surface ---------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); after a restart, the same port as before.

        Raises DWCPError (code ``NOT_STARTED``) before the first ``start()``.
        """
        if self._bound is None:
            raise DWCPError("receiver not started: no address bound yet", code="NOT_STARTED")
        return self._bound

    @property
    def duplicates_dropped(self) -> int:
        """How many resent messages were acknowledged and not delivered again (delivered
        before, in an earlier session of the same sender)."""
        return self._delivery.duplicates

    @property
    def senders_remembered(self) -> int:
        """How many senders' delivery positions are kept (at most ``SENDERS_KEPT``, or more
        while more of them have a session open)."""
        with self._lock:
            return len(self._table.senders)

    @property
    def delivered_count(self) -> int:
        """How many messages ``on_message`` has been called with since construction."""
        return self._delivery.delivered

    @property
    def session_count(self) -> int:
        """How many sender sessions are open right now."""
        with self._lock:
            return len(self._table.sessions)

    def wait_delivered(self, count: int, timeout: float | timedelta) -> bool:
        """Wait until ``delivered_count >= count``; return False if ``timeout`` passes first.

        ``count`` is an int of at least 0; ``timeout`` seconds or a ``timedelta``, finite and
        at least 0 (there is no "wait forever": ``None`` is refused). A wrong type is a
        ``TypeError``, a wrong value a ``ValueError``, each naming the parameter.
        """
        wanted = check.count("count", count, minimum=0)
        wait = check.seconds("timeout", timeout, allow_zero=True)
        return self._delivery.wait(wanted, wait)

    def __repr__(self) -> str:
        if self._bound is None:
            where = f"{self._requested[0]}:{self._requested[1]} (not bound)"
        else:
            where = f"{self._bound[0]}:{self._bound[1]}"
        state = "running" if self._running else "stopped"
        return (
            f"<MultiStreamReceiver {where} {state} sessions={len(self._table.sessions)} "
            f"delivered={self._delivery.delivered} max_sessions={self._max_sessions}>"
        )

    def start(self) -> None:
        """Bind and start accepting. Restarts (after ``stop()``) reuse the bound port.

        A ``start()`` that arrives while a ``stop()`` runs waits for it to finish, then starts.
        Raises DWCPError (code ``ALREADY_STARTED``) when running or starting, and
        TransportError (code ``LISTEN_FAILED``, the cause chained) when the address cannot be
        resolved, bound or listened on.
        """
        with self._lock:
            self._phases.begin_start("receiver")
            host, port = self._bound or self._requested
        try:
            listener = listen(host, port)  # resolves and binds: not under the lock
            try:
                wake = socket.socketpair()
            except BaseException:
                listener.close()
                raise
        except BaseException:
            with self._lock:
                self._phases.enter("stopped")
            raise
        host, port = listener.getsockname()[:2]
        with self._lock:
            self._bound = (host, port)
            self._wake = wake
            self._table.sessions.clear()
            self._running = True
            self._accept_thread = threading.Thread(
                target=accept_loop,
                args=(listener, wake[0], self._admit_connection, self._expire_joins),
                name="dwcp-receiver-accept",
                daemon=True,
            )
            self._accept_thread.start()
            self._phases.enter("running")
        logger.bind(address=f"{host}:{port}", tls=self._ssl_context is not None).info(
            "Receiver started"
        )

    def stop(self) -> None:
        """Close the listener and every connection, and join every thread; idempotent.

        Messages not yet handed to ``on_message`` are dropped, also those a delivery thread
        has taken: only the call in progress finishes. Every thread is joined within one
        deadline of 5 s (an ``on_message`` still running then holds its thread past it;
        ``stop()`` returns anyway and logs a warning).
        A ``stop()`` during a ``start()`` waits for that start, then stops; one during another
        ``stop()`` returns when that stop has finished. It may be called from
        ``on_message``: it then joins every other thread, and the calling delivery thread
        ends when ``on_message`` returns.
        """
        current = threading.current_thread()
        with self._lock:
            if not self._phases.begin_stop(self._threads):
                return  # stopped, or being stopped by the stop() that is joining this thread
            self._running = False
            wake, accept_thread = self._wake, self._accept_thread
            sessions = list(self._table.sessions.values())
        try:
            self._stop(wake, accept_thread, sessions, current)
        finally:
            with self._lock:
                self._wake = self._accept_thread = None
                self._phases.enter("stopped")
        logger.bind(address=f"{self.address[0]}:{self.address[1]}").info("Receiver stopped")

    def _stop(
        self,
        wake: tuple[socket.socket, socket.socket] | None,
        accept_thread: threading.Thread | None,
        sessions: list[Session],
        current: threading.Thread,
    ) -> None:
        # stop()'s work, with the phase "stopping" and no lock held.
        if wake is not None:
            wake[1].send(b"x")
        if accept_thread is not None:
            accept_thread.join()
        for session in sessions:
            self._close_session(session, drain=False)
        with self._lock:
            connections = list(self._connections)
            threads, self._threads = self._threads, []
        for conn in connections:
            conn.shutdown()
        deadline = time.monotonic() + _STOP_JOIN_TIMEOUT
        for thread in threads:
            if thread is current:  # called from on_message: it ends once that returns
                continue
            thread.join(max(deadline - time.monotonic(), 0.0))
            if thread.is_alive():
                logger.bind(thread=thread.name).warning("Receiver thread did not stop")
        for sock in wake or ():
            sock.close()

    # -- accepting --------------------------------------------------------------------------

    def close(self) -> None:
        """Alias of ``stop()``: every dwcp class that starts has both names."""
        self.stop()

    def _expire_joins(self) -> None:
        """Close sessions whose announced streams did not all connect within join_timeout,
        and replaced (unacknowledged) ones that stopped making progress."""
        with self._lock:
            late = self._table.expired(time.monotonic())
        for session in late:
            logger.bind(
                session=session.name, joined=session.joined, announced=session.stream_count
            ).warning(
                "Receiver closed session: its streams did not join within join_timeout, or, "
                "replaced by a newer one, it stopped making progress"
            )
            self._close_session(session, drain=True)

    def _admit_connection(self, sock: socket.socket, peer: str) -> None:
        try:
            sock.setblocking(True)
            set_kernel_timeout(sock, socket.SO_SNDTIMEO, _WRITE_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # reset before we got to it: its trouble, not the listener's
            logger.bind(peer=peer, reason=f"socket error: {exc}").warning(
                "Receiver closed connection"
            )
            sock.close()
            return
        with self._lock:
            full = len(self._connections) >= self._max_connections
            if not full:
                conn = Connection(sock, peer)
                self._connections.add(conn)
                thread = conn.thread = self._thread(self._serve, conn, "conn")
        if full:
            logger.bind(peer=peer, reason="too many connections").warning(
                "Receiver closed connection"
            )
            sock.close()
            return
        thread.start()

    def _thread(self, target: Callable[..., object], arg: object, kind: str) -> threading.Thread:
        """A named thread for the receiver to join on stop(); caller holds the lock."""
        thread = threading.Thread(
            target=target, args=(arg,), name=f"dwcp-receiver-{kind}-{next(self._numbers)}",
            daemon=True,
        )  # fmt: skip
        self._threads = [t for t in self._threads if t.is_alive() or t.ident is None]
        self._threads.append(thread)
        return thread

    # -- per-connection reading -------------------------------------------------------------

    def _serve(self, conn: Connection) -> None:
        session: Session | None = None
        try:
            # Here, not on the accept thread: a client that never speaks TLS stalls only
            # its own connection.
            if self._ssl_context is not None and not self._start_tls(conn, self._ssl_context):
                return
            session = self._handshake(conn)
            if session is not None:
                self._reader.read_frames(conn, session)
                self._stream_ended(session)
        except Closed:
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
            self._release(conn)

    def _start_tls(self, conn: Connection, context: ssl.SSLContext) -> bool:
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
        # Blocking again: kernel timeouts bound each read from here on.
        conn.sock.settimeout(None)
        conn.tls = tls
        return True

    def _handshake(self, conn: Connection) -> Session | None:
        # One deadline for the whole HELLO: a peer trickling a byte a second cannot hold
        # its connection longer than that.
        bound = self._handshake_timeout
        if self._idle_timeout is not None:
            bound = min(bound, self._idle_timeout)
        deadline = time.monotonic() + bound
        prefix = self._reader.read_exactly(conn, wire.PREFIX.size, deadline, "handshake")
        wire.check_prefix(prefix, (wire.FRAME_HELLO,))  # a connection starts with HELLO
        rest = self._reader.read_exactly(
            conn, wire.HANDSHAKE.size - wire.PREFIX.size, deadline, "HELLO"
        )
        hello = wire.parse_handshake(prefix + rest)
        with self._lock:
            if not self._running:
                raise Closed
            admission = self._table.admit(hello, conn, time.monotonic())
            session, superseded = admission.session, admission.replaced
            if session is not None:
                conn.session, conn.index = session, hello.stream_index
                conn.holders += 1  # the session's delivery thread writes its ACKs
                if session.delivery is None:
                    session.delivery = self._thread(self._delivery.run, session, "deliver")
                    session.delivery.start()
        if superseded is not None and admission.close_replaced:
            logger.bind(session=superseded.name, successor=hello.session_id.hex()).info(
                "Receiver closed a session its sender replaced"
            )
            self._close_session(superseded, drain=True)
        elif superseded is not None:  # finished by its streams' end, or by _expire_joins
            logger.bind(session=superseded.name, successor=hello.session_id.hex()).info(
                "Receiver finishing a session its sender replaced"
            )
        if session is None:
            # Only this connection is refused: a stranger must not be able to close a
            # session by replaying its id.
            logger.bind(
                peer=conn.peer, reason=admission.reason, session=hello.session_id.hex()
            ).warning("Receiver closed connection")
            conn.write(wire.pack_welcome(admission.status))
            return None
        conn.write(wire.pack_welcome(wire.STATUS_ACCEPTED))
        return session

    # -- ending sessions --------------------------------------------------------------------

    def _stream_ended(self, session: Session) -> None:
        """A stream closed cleanly; the session ends when all its streams have.

        A session some of whose announced streams never joined ends as soon as every stream
        that did join has ended: its sender gave up on it (it ends a session only after
        every stream was welcomed), so it must not hold a slot until ``join_timeout``.
        """
        session.reassembly.announce()  # what this stream completed last is delivered now
        with self._lock:
            abandoned = self._table.stream_ended(session)
        if abandoned:
            logger.bind(
                session=session.name, joined=session.joined, announced=session.stream_count
            ).warning("Receiver closed session: its streams ended before all joined")
            self._close_session(session, drain=True)
            return
        dropped = session.reassembly.end_stream()
        if dropped:
            logger.bind(session=session.name, undelivered=dropped).warning(
                "Session ended with incomplete messages"
            )

    def _abort(self, conn: Connection, session: Session | None, reason: str) -> None:
        if session is not None and session.aborted:
            return  # another thread closed it and said why
        if not self._running:
            return  # stop() is closing everything
        logger.bind(
            peer=conn.peer, reason=reason, session=session.name if session else None
        ).warning("Receiver closed connection")
        if session is None:
            conn.shutdown()
        else:
            self._close_session(session, drain=True)

    def _close_session(self, session: Session, *, drain: bool) -> None:
        """Stop a session's input and shut all its connections (delivery may drain)."""
        with self._lock:
            session.aborted = True
            connections = [c for c in session.connections if c is not None]
            started = session.delivery is not None
        session.reassembly.close(drain=drain)
        for conn in connections:
            conn.shutdown()
        if not started:
            self._session_finished(session)

    def _session_finished(self, session: Session) -> None:
        """Forget a session once nothing more will be delivered for it (once)."""
        with self._lock:
            if not self._table.finish(session):
                return
            connections = [c for c in session.connections if c is not None]
        for conn in connections:
            conn.shutdown()
            self._release(conn)

    def _release(self, conn: Connection) -> None:
        """One holder (its reader, or its session's delivery) is done with ``conn``; the
        last one closes it. Until then a half-closed sender still gets its ACKs, and no
        socket is closed while another thread may be inside a call on it."""
        with self._lock:
            conn.holders -= 1
            last = conn.holders == 0
        if last:
            conn.close()
