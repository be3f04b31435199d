"""The sending side: one logical link striped over several TCP connections.

``MultiStreamTCPTransport`` is the public class: its lifecycle over sessions, and ``send``,
``flush`` and ``health_check``. A session's connections are opened by ``_handshake``, run by
``_session`` (with ``_admission``, ``_writer`` and ``_keepalive``), and its protocol
decisions are the core's, ``_sending``.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from datetime import timedelta
from typing import TYPE_CHECKING

from loguru import logger

from dwcp import _validation as check
from dwcp._errors import DWCPError, TransportError
from dwcp.transport import wire
from dwcp.transport._admission import YIELDS, take_contended
from dwcp.transport._handshake import check_tls_options, connect
from dwcp.transport._io import Buffer, _bounded_int, _check_address
from dwcp.transport._sending import ACK_TIMEOUT_REASON, OUTBOX_LIMIT
from dwcp.transport._session import Session
from dwcp.transport._window import Window
from dwcp.transport._writer import Stream

if TYPE_CHECKING:  # typing.Self is 3.11+ and setup.cfg still allows 3.10
    from collections.abc import Callable, Sequence

    from typing_extensions import Self

__all__ = ["ACK_TIMEOUT_REASON", "MultiStreamTCPTransport"]

# The session's parts under the names they had here (tests/unit/test_send_path.py).
_Session = Session
_Stream = Stream
_OUTBOX_LIMIT = OUTBOX_LIMIT
# What a message is cut into over several streams when chunk_size is not given: small
# enough that the streams share a message's bytes, large enough that each chunk's header and
# hand-offs cost little beside its bytes.
DEFAULT_CHUNK_SIZE = 262144
_YIELDS = YIELDS
_take_contended = take_contended
_monotonic = time.monotonic


def _as_bytes_view(data: object) -> memoryview:
    """Any other bytes-like object (a memoryview, an ``array.array``, a NumPy array...) as
    a view of its bytes (a copy when they are not contiguous); TypeError for anything else."""
    try:
        view = data if type(data) is memoryview else memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"send() needs a bytes-like object, not {type(data).__name__}") from None
    return view.cast("B") if view.c_contiguous else memoryview(view.tobytes())


class MultiStreamTCPTransport:
    """Sends messages to one ``MultiStreamReceiver`` over ``streams`` parallel TCP connections.

    Small messages go whole on one stream (round robin); larger ones are cut into
    ``chunk_size`` chunks written in parallel on all streams (with one stream, by default,
    every message goes whole). Message ids order delivery, so
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
        chunk_size: messages longer than this are cut into chunks of this size (>= 1024),
            striped over the streams. Default (None): 262144 with several streams; with one,
            no cutting (each message one chunk: nothing to stripe, and the receiver need not
            join the pieces).
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
            completed for this long; while bytes of ours still wait (queued, or in our
            kernel), also while the receiver says it is alive (within
            ``keepalive_interval + keepalive_timeout`` of its last answer). With everything
            written and only confirmations missing (a consumer paused on them), it gives up
            ``close_timeout`` after the last one, whether the receiver answers or not; the
            unconfirmed messages stay in the window for the next ``start()``. Separate from
            ``send_timeout`` so that a silent peer holds up a shutdown for ``close_timeout``
            only.
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
        chunk_size: int | None = None,
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
        if chunk_size is None:
            chunk_size = DEFAULT_CHUNK_SIZE if self._streams > 1 else wire.MAX_TOTAL_LENGTH
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
        self._server_hostname = check_tls_options(address, ssl_context, server_hostname)
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
        self._session: Session | None = None
        # A session close() is shutting down: start() waits for it, so the next session
        # knows every id it used and every message it left in the window.
        self._retiring: Session | None = None
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
        delivered): ``start`` returns once they are queued, ahead of any new send, not once
        they are written, which on a slow path can take minutes; new sends wait for room
        behind them (``BACKPRESSURE``, ``WINDOW_FULL``). A started transport, even a
        broken one, raises DWCPError (code ``ALREADY_STARTED``): ``close()`` first (as the
        manager's recovery does). Raises TransportError when any connection or handshake
        fails, after closing the connections it did open; a resend that fails later breaks
        the session like any write.
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
                socks = connect(
                    self._address,
                    self._streams,
                    session_id=session_id,
                    first_id=first_id,
                    sender_id=self._sender_id,
                    acknowledged=self._acknowledged,
                    keepalive_interval=self._keepalive_interval,
                    connect_timeout=self._connect_timeout,
                    ssl_context=self._ssl_context,
                    server_hostname=self._server_hostname,
                    congestion_control=self._congestion_control,
                )
            except TransportError:
                if window is None:
                    # Its HELLO may still reach the receiver late (a stalled link delivers
                    # it after the heal): the next session starts past this first id, so the
                    # receiver sees which of the two is newer (see wire-format.md, HELLO).
                    self._next_id = first_id + 1
                raise
            session = Session(
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

    def close(self) -> None:
        """Refuse new sends (``NOT_STARTED``), write what is queued and, with
        ``acknowledged``, wait for its acknowledgements, for as long as writes or
        acknowledgements progress or the receiver says it is alive (unless the session is
        broken): once neither came for ``close_timeout`` and the receiver has not answered
        for the keepalive bound, close every connection anyway. Then join
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
        if kind is not bytes and kind is not bytearray and not isinstance(data, (bytes, bytearray)):
            data = _as_bytes_view(data)
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

    def _room_for_delivery(self, size: int, wake: Callable[[], None] | None = None) -> bool:
        """For ``Manager.deliver()``'s thread: whether a send of ``size`` bytes would find
        room at once (in the window, in its stream's outbox, and no sender waiting for room
        before it). The thread waits for room itself, settling handles meanwhile, instead of
        blocking in ``send`` while their deadlines pass. A racy look: at worst the send
        waits a little. When the window is full, ``wake`` (if given) is called once by the
        next acknowledgement that frees room, on a reader thread (see ``Window.call_on_room``).
        """
        session = self._session
        if session is None:
            return True  # the send raises at once
        if session.waiters:
            return False
        window = self._window
        if window is not None and not window.fits(size):
            if wake is None:
                return False
            window.call_on_room(wake)
            if not window.fits(size):  # room freed before the hook was set calls no hook
                return False
        return session.streams[session.next_id % session.count].queued < OUTBOX_LIMIT

    def _queue_for_delivery(self, messages: Sequence[bytes]) -> int:
        """For ``Manager.deliver()``'s thread: queue, in order, the first of ``messages``
        (``bytes``; the transport is acknowledged) that ``send`` would queue at once, in one
        lock section, and return how many. The next one (if any) needs ``send``: it is too
        large to take this path, or must wait for room. Raises ``TransportError`` as
        ``send`` does when not started, broken or closing; then nothing was queued."""
        session = self._session
        if session is None:
            raise TransportError("transport not started", code="NOT_STARTED")
        return session.queue_tracked(messages, min(self._chunk_size, self._max_message_size))

    def flush(self, timeout: float | timedelta | None = None) -> None:
        """Wait until every message sent so far is written to the kernel and, with
        ``acknowledged``, acknowledged by the receiver. With messages unacknowledged, it asks
        the receiver to acknowledge them as soon as they are delivered (a PING behind the
        last one, see docs/wire-format.md), instead of after the receiver's ACK delay (a
        message sent into an empty window asked itself): so ``send`` then ``flush`` is as
        quick as ``send(wait=True)``, after a burst as well.

        ``timeout`` defaults to ``send_timeout``. Raises TransportError when not started,
        when the session broke, or when the timeout passed first: with ``acknowledged``, code
        ``UNCONFIRMED`` (also while messages are still being written), and the messages stay
        in the window; without, code ``BACKPRESSURE`` (messages still being written on a
        session that goes on).
        """
        session = self._session
        if session is None:
            raise TransportError("transport not started", code="NOT_STARTED")
        wait = self._send_timeout if timeout is None else check.wire_seconds("timeout", timeout)
        deadline = _monotonic() + wait
        window = self._window
        if window is not None:
            session.ask_for_ack()
        if not session.flush(wait):
            if session.broken is not None:
                session.raise_broken()
            if window is not None:
                # Still being written, on a session that lives (a slow path, a resend): they
                # are in the window, unconfirmed, as when only their ACKs are missing.
                raise TransportError(
                    f"flush: messages still being written after {wait:g} s, not confirmed",
                    code="UNCONFIRMED",
                )
            # Unacknowledged, on a session that lives: a slow path or receiver, not a fault.
            raise TransportError(
                f"flush: messages still being written after {wait:g} s; the session goes on "
                "and keeps writing them",
                code="BACKPRESSURE",
            )
        if window is not None and window.last >= 0:
            session.wait_acked(window.last, deadline)

    def health_check(self) -> None:
        """Return when every stream is up; raise TransportError saying why not.

        Any dead stream breaks the session (see ``_session.Session``), so this raises as soon as one
        stream failed since the last ``start()``, stricter than "fewer than half alive".
        """
        session = self._session
        if session is None:
            raise TransportError("transport not started", code="NOT_STARTED")
        if session.broken is not None:
            raise TransportError(f"transport broken: {session.broken}", code=session.broken_code)
