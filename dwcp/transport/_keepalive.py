"""The sender's listening shells: the keepalive thread and each stream's reader.

``keepalive_loop`` keeps the time: it PINGs idle streams and breaks the session when a
PING goes unanswered or acknowledgements are overdue. ``reader_loop`` reads what the
receiver sends on a stream (ACK, PONG) and notices a closed connection. What each of those
means is decided in the core (``_sending``: ``Keepalive``, ``ack_overdue``,
``read_answer``); here are the sockets, the thread and the clock.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from dwcp.transport import wire
from dwcp.transport._io import _TIMEOUT_SLACK
from dwcp.transport._progress import tcp_progress
from dwcp.transport._sending import (
    ACK_TIMEOUT_REASON,
    ANSWER_SIZE,
    Keepalive,
    bytes_moved,
    keepalive_tick,
    next_tick,
    read_answer,
)

if TYPE_CHECKING:
    from dwcp.transport._session import Session
    from dwcp.transport._writer import Stream

__all__ = ["keepalive_loop", "reader_loop"]

_monotonic = time.monotonic


def keepalive_loop(session: Session) -> None:
    """PING streams that were idle for an interval; break the session when a PING goes
    unanswered for ``keepalive_timeout`` (the receiver vanished without FIN or RST), or,
    acknowledged, when messages await an ACK and none came for send_timeout.

    A busy stream is not pinged: its writes are bounded by send_timeout already. A
    receiver that is alive but not reading (backpressure), or still reading the bytes ahead
    of a PING (a slow or shared link), answers unprompted. The PING's
    timeout measures a stall, not a duration (see ``Keepalive``), and so does the ACK's:
    bytes the receiver's host keeps acknowledging count as hearing from it.
    """
    interval = session.keepalive_interval
    timeout = session.keepalive_timeout
    window = session.window
    send_timeout = session.send_timeout
    tick = keepalive_tick(interval, timeout, send_timeout, window is not None)
    pings = None if interval is None else Keepalive(session.count, interval, timeout, _monotonic())
    # Per stream, the kernel's last (acknowledged, outstanding) reading while confirmations
    # are awaited.
    acked: list[tuple[int, int] | None] = [None] * session.count
    try:
        while not session.stopped.wait(
            next_tick(
                tick,
                _monotonic(),
                None if window is None else window.waiting_since(),
                send_timeout,
                _TIMEOUT_SLACK,
            )
        ):
            if session.finishing:
                continue  # every stream has sent its FIN: nothing more is written
            now = _monotonic()
            if pings is not None and window is not None and window.waiting_since() is not None:
                # Confirmations are awaited. A message still crossing a slow link (one chunk
                # can take minutes) cannot be confirmed yet, and its busy stream is never
                # pinged: while the receiver's host keeps acknowledging its bytes, the link
                # is moving and the receiver counts as heard from.
                for stream in session.streams:
                    if bytes_moved(acked, stream.index, tcp_progress(stream.sock)):
                        stream.heard = now
            if window is not None and session.ack_overdue():
                # The one place that breaks a session for missing acknowledgements.
                session.break_(ACK_TIMEOUT_REASON.format(send_timeout), "ACK_TIMEOUT")
                return
            if pings is None:
                continue
            for stream in session.streams:
                i = stream.index
                sent = stream.ping_sent
                if sent is not None:
                    progress = tcp_progress(stream.sock) if pings.wants_progress(i) else None
                    if pings.answer_overdue(i, now, sent, progress):
                        session.break_(f"stream {i}: no keepalive answer within {timeout:g} s")
                        return
                    continue
                if pings.ping_due(i, now, stream.writes, bool(stream.outbox) or stream.busy):
                    # Read before the PING is queued: the bytes it waits behind.
                    pings.pinged(i, now, tcp_progress(stream.sock))
                    stream.ping_sent = now
                    stream.put((wire.pack_ping(int(now * 1000)),), ANSWER_SIZE, None)
    except Exception as exc:  # noqa: BLE001 - never die silently
        session.log.opt(exception=exc).error("Transport keepalive failed")
        session.break_(f"keepalive error {exc!r}")


def reader_loop(session: Session, stream: Stream) -> None:
    """Read ACK and PONG frames; also notices at once when the receiver drops us."""
    recv_into = stream.sock.recv_into if stream.tls is None else stream.tls.recv_into
    buf = bytearray(ANSWER_SIZE)
    view = memoryview(buf)
    got = 0
    window = session.window
    acknowledged = window is not None
    try:
        while True:
            n = recv_into(view[got:])  # blocks until data, EOF or shutdown()
            if n == 0:
                if not (session.closing or session.finishing):
                    session.break_(f"stream {stream.index}: receiver closed the connection")
                return
            got += n
            if got < ANSWER_SIZE:
                continue
            got = 0
            try:
                through = read_answer(
                    bytes(buf),
                    acknowledged=acknowledged,
                    first_id=session.first_id,
                    next_id=session.next_id,
                )
            except wire.ProtocolError as exc:
                session.break_(f"stream {stream.index}: {exc}")
                return
            # A PONG or an ACK: either proves the receiver alive.
            stream.ping_sent = None
            stream.heard = _monotonic()
            if through is not None:
                assert window is not None
                # Cumulative: an ACK at or below one already taken changes nothing.
                window.ack(through)
    except OSError as exc:
        if not (session.closing or session.finishing):
            session.break_(f"stream {stream.index}: receive failed ({exc})", cause=exc)
    except Exception as exc:  # noqa: BLE001 - never die silently
        session.log.opt(exception=exc).error("Transport reader failed")
        session.break_(f"stream {stream.index}: reader error {exc!r}")
