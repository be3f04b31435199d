"""Draining: waiting until what a session queued is written and, acknowledged, confirmed.

``Draining`` is the part of the session (``_session.Session``) that ``flush()``,
``send(wait=True)`` and ``close()`` wait in: every queued frame in the kernel (``flush``), one
message confirmed (``wait_acked``), everything written and confirmed while that progresses
(``linger``), and the PING that asks for an immediate ACK (``ask_for_ack``, see
docs/wire-format.md).
"""

from __future__ import annotations

import socket
import threading
import time

from dwcp._errors import TransportError
from dwcp.transport import wire
from dwcp.transport._admission import Admission
from dwcp.transport._progress import tcp_progress
from dwcp.transport._sending import ANSWER_SIZE, bytes_moved
from dwcp.transport._writer import Stream

__all__ = ["Draining"]

_monotonic = time.monotonic
_FINISH_POLL = 0.05  # how often finish() looks at the streams' readers and progress


class Draining(Admission):
    """The waits for what a session sent; ``Session`` sets the attributes annotated here."""

    close_timeout: float
    count: int
    finishing: bool
    # When the session's streams were made: a ``heard`` later than this is an answer.
    born: float
    keepalive_interval: float | None
    keepalive_timeout: float
    asked: int
    _order: threading.Lock

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

    def ask_for_ack(self) -> None:
        """Acknowledged: ask the receiver to acknowledge every message sent so far as soon
        as it is delivered, instead of after its ACK delay (``flush()``): a PING behind the
        last one, on the stream that carried it (its first chunk), unless that one is
        acknowledged already or asked for its ACK itself (sent into an empty window)."""
        window = self.window
        assert window is not None
        # Under the order lock: the last message's frames are queued, so the PING goes
        # behind them.
        with self._order:
            last = window.last
            # Closing: close() itself waits for the acknowledgements (and a PING written
            # after its FIN would break the session).
            if last == window.acked or last == self.asked or self.sealed:
                return
            ping = wire.pack_ping(int(_monotonic() * 1000))
            self.streams[last % self.count].put((ping,), ANSWER_SIZE, None)

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

    def linger(self) -> bool:
        """Wait for what is queued to be written and, acknowledged, confirmed, for as long as
        writes or acknowledgements progress: give up once none came for ``close_timeout``.
        True when everything was written (and confirmed), False when it gave up.

        A slow receiver still gets everything, and so does one that stalls while it says it
        is alive (a consumer pausing: it PONGs as it begins to wait for it, then once per
        keepalive interval): while bytes of ours still wait (queued, or in our kernel) and the
        receiver has answered on this session, it is waited for until the keepalive bound
        (``keepalive_interval + keepalive_timeout``) passed since it last did, as ``finish``
        does. (Bounded: a receiver whose consumer makes no progress for its ``idle_timeout``
        closes the session.) With everything written, only acknowledgements are waited for,
        ``close_timeout`` after the last one. A silent one, that never answered, holds ``close()`` for
        ``close_timeout``, not ``send_timeout``. A writer that has not yet begun what is
        queued (a busy machine runs it late) is waited for, up to ``send_timeout``.
        """
        window = self.window
        wait = self.close_timeout
        life = self.life
        began = _monotonic()
        latest = began + max(self.send_timeout, wait)

        def due() -> float:
            # close_timeout after a write or an acknowledgement last made progress (or
            # close() began); or the keepalive bound after the receiver last said it is alive,
            # if it ever did on this session (a PONG or an ACK: ``heard`` moved past ``born``).
            moved = max(s.progress for s in self.streams)
            if window is not None:
                moved = max(moved, window.since)
            at = max(moved, began) + wait
            heard = max(s.heard for s in self.streams)
            if life is not None and heard > self.born and _ours_waiting(self.streams):
                at = max(at, heard + life)
            return at

        while True:  # bounded: each round ends at a deadline only progress or life moves
            now = _monotonic()
            deadline = due()
            if now >= deadline:
                late = any(s.outbox and not s.busy for s in self.streams)
                if not late or now >= latest:
                    return False
            # Look again after close_timeout at most: the keepalive bound holds only while
            # bytes of ours wait, and once they are written the rest is close_timeout after
            # the last acknowledgement (a round to that bound kept close() waiting for it).
            deadline = min(deadline, now + wait) if now < deadline else min(now + wait, latest)
            if self.flush(deadline - now) and (
                window is None or window.wait_acked(window.last, deadline, self.ended)
            ):
                return True
            if self.ended():
                return False

    def finish(self) -> None:
        """Everything is written: end each stream with a FIN behind its bytes, and keep
        reading until the receiver ends its side too, for as long as it shows life.

        Closing at once would lose data the receiver has not read yet: its kernel may still
        hold the last messages (a backpressured receiver reads them later), and any answer
        it writes meanwhile (a PONG saying it waits for a slow consumer) reaching a closed
        socket is answered with a reset, which discards them. So the readers keep reading
        until each stream's end; close() gives up once nothing came from the receiver and
        none of our bytes moved for ``close_timeout``, or, while bytes of ours still wait in
        our kernel, for the keepalive bound (the receiver PONGs once an interval while it
        waits for a slow consumer).
        """
        self.finishing = True
        for stream in self.streams:
            try:
                stream.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        # Session.run_threads starts each stream's threads as [writer, reader].
        readers = [s.threads[1] for s in self.streams if len(s.threads) > 1]
        seen: list[tuple[int, int] | None] = [None] * self.count
        # While our last bytes wait in our kernel (the receiver's window is shut: it waits
        # for a slow consumer), its sign of life is a PONG once per keepalive interval.
        interval = self.keepalive_interval
        stuck_limit = self.close_timeout
        if interval is not None:
            stuck_limit = max(stuck_limit, interval + self.keepalive_timeout)
        moved = _monotonic()
        while True:  # bounded: each round ends once nothing moved for stuck_limit
            alive = [reader for reader in readers if reader.is_alive()]
            if not alive or self.ended():
                return
            now = _monotonic()
            stuck = False
            for stream in self.streams:
                progress = tcp_progress(stream.sock)
                if bytes_moved(seen, stream.index, progress):
                    moved = now
                stuck = stuck or (progress is not None and progress[1] > 0)
                moved = max(moved, stream.heard)
            if now - moved >= (stuck_limit if stuck else self.close_timeout):
                return
            # A reader still running: joining one that already ended would not wait at all.
            alive[0].join(_FINISH_POLL)


def _ours_waiting(streams: list[Stream]) -> bool:
    """Whether bytes of ours still wait on any stream: queued, being written, or in our
    kernel unacknowledged by the receiver's (where the kernel can tell)."""
    for stream in streams:
        if stream.outbox or stream.busy:
            return True
        progress = tcp_progress(stream.sock)
        if progress is not None and progress[1] > 0:
            return True
    return False
