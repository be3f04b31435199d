"""Many small tracked messages queued in one order-lock section (``Manager.deliver()``'s
thread sends what queued this way).

A plain send takes the session's order lock and a stream's lock once per message; a run of
queued messages needs them once. Each message is queued exactly as ``Session.send_small``'s
fast path queues a tracked message: the same frame, the same stream, the same window entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from dwcp.transport import wire
from dwcp.transport._admission import take_contended
from dwcp.transport._sending import COPY_LIMIT, OUTBOX_LIMIT, pack_head, pack_u32

if TYPE_CHECKING:
    from dwcp.transport._session import Session

__all__ = ["queue_tracked"]

_checksum = wire.checksum_of


def queue_tracked(session: Session, messages: Sequence[bytes], limit: int) -> int:
    """Queue the first of ``messages`` (``bytes``, kept by the window until confirmed) that
    fit now, without waiting, and return how many.

    The run ends at the first message ``send_small``'s fast path would not take: over
    ``limit`` bytes or 16 KiB, no room in its stream's outbox or in the window, senders waiting for room (they
    come first), or an empty window (that message asks for its ACK at once: ACK_NOW_EMPTY).
    That one needs a send of its own. Raises ``TransportError`` as a send does when the
    session is broken or closing; then nothing was queued.
    """
    if session.broken is not None or session.sealed:
        session.raise_broken()
    window = session.window
    assert window is not None, "queue_tracked needs an acknowledged session"
    checksum = session.checksum
    flags, count, streams = session.flags, session.count, session.streams
    # Each stream's frames go into its outbox under its lock once, after the run.
    runs: list[list[bytes]] = [[] for _ in streams]
    sizes = [0] * count
    magic, version, data_type = wire.MAGIC, wire.VERSION, wire.FRAME_DATA
    limit = min(limit, COPY_LIMIT)
    order = session._order
    if not order.acquire(False):
        take_contended(order)
    try:
        if session.sealed:
            session.raise_broken()
        message_id = session.next_id
        try:
            for data in messages:
                size = len(data)
                index = message_id % count
                if not (
                    size <= limit
                    and not session.waiters
                    and streams[index].queued + sizes[index] < OUTBOX_LIMIT
                    and message_id < window.id_limit
                    and window.added + size <= window.byte_limit
                    and window.last != window.acked
                ):
                    break
                crc = _checksum(data) if checksum else 0
                head = pack_head(
                    magic, version, data_type, flags, message_id, 0, 1, size, size, crc
                )
                frame = head + pack_u32(_checksum(head)) + data
                # Nothing below can fail: the window, the run and the id move together.
                window.entries.append(data)
                window.last = message_id
                window.added += size
                runs[index].append(frame)
                sizes[index] += len(frame)
                message_id += 1
        finally:
            queued = message_id - session.next_id
            session.next_id = message_id
            for stream, frames, size in zip(streams, runs, sizes):
                if frames:
                    with stream.lock:
                        stream.outbox += frames
                        stream.queued += size
                        if not stream.kicked:
                            stream.kicked = True
                            stream.kick.release()
    finally:
        order.release()
    return queued
