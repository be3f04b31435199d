"""The sender's protocol decisions, with no I/O: fed frames, readings and times, returning
decisions.

What a DATA frame's header says and how a message is striped over the streams (``Lazy``,
``stripes``); what a receiver's ACK or PONG means and which ones are protocol errors
(``read_answer``); when a write is stalled, when acknowledgements are overdue, when a stream
is due a PING and when its PING is overdue (``stalled``, ``ack_overdue``, ``Keepalive``). No
sockets, threads or clocks here: the session (``_session.py``), its writers (``_writer.py``)
and its keepalive thread (``_keepalive.py``) do the I/O and pass the time in; these are
tested by feeding them frames and times (``tests/unit/test_sending_core.py``).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from dwcp.transport import wire
from dwcp.transport._io import Buffer

__all__ = [
    "ACK_TIMEOUT_REASON",
    "ANSWER_SIZE",
    "COPY_LIMIT",
    "DIRECT_MIN",
    "HEADER_SIZE",
    "OUTBOX_LIMIT",
    "Keepalive",
    "Lazy",
    "ack_overdue",
    "built",
    "bytes_moved",
    "keepalive_tick",
    "next_tick",
    "pack_head",
    "pack_u32",
    "read_answer",
    "stalled",
    "stripes",
    "stripes_by_load",
]

checksum_of = wire.checksum_of
# The DATA header without its own CRC, then the CRC: packed in two steps so the header CRC
# is computed over exactly the bytes that precede it.
pack_head = struct.Struct("!4sBBHQIIIII").pack
pack_u32 = struct.Struct("!I").pack
_MAGIC = wire.MAGIC
_VERSION = wire.VERSION
_DATA = wire.FRAME_DATA
# Up to this size, copying header + payload into one buffer for a single send() is
# cheaper than writev()'s scatter list; above it the copy costs more than it saves.
COPY_LIMIT = 16 * 1024
ANSWER_SIZE = wire.ACK.size  # ACK and PONG, the frames a receiver sends in a session
assert wire.PING.size == ANSWER_SIZE
HEADER_SIZE = wire.DATA_HEADER.size
# Frames at least this large are written by their caller when the stream is idle.
DIRECT_MIN = 256 * 1024
# Bytes queued on a stream before senders wait for its writer (backpressure).
OUTBOX_LIMIT = 1 << 20
# Why a session broke when acknowledgements stopped (formatted with send_timeout).
ACK_TIMEOUT_REASON = "no acknowledgement within send_timeout ({:g} s)"


class Lazy:
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
        head = pack_head(
            _MAGIC, _VERSION, _DATA, self.flags, self.message_id, self.index, self.count,
            self.total, len(payload), checksum_of(payload) if self.checksum else 0,
        )  # fmt: skip
        return head + pack_u32(checksum_of(head))


def built(parts: list[Buffer | Lazy]) -> list[Buffer]:
    """The buffers to write for ``parts``: each ``Lazy`` frame as its header and payload."""
    out: list[Buffer] = []
    for part in parts:
        if type(part) is Lazy:
            out.append(part.header())
            out.append(part.payload)
        else:
            out.append(part)  # type: ignore[arg-type]
    return out


def stripes(message_id: int, chunks: int, count: int) -> list[tuple[int, range]]:
    """How a message of ``chunks`` chunks is striped over ``count`` streams: per lane, the
    stream's index and the chunk indexes it carries, in order.

    The first chunk goes on stream ``message_id % count`` (where a one-chunk message of that
    id would go), the next on the stream after it, and so on round the streams: one lane per
    stream at most, each carrying every ``lanes``-th chunk.
    """
    lanes = min(chunks, count)
    first = message_id % count
    return [((first + share) % count, range(share, chunks, lanes)) for share in range(lanes)]


def stripes_by_load(
    message_id: int, sizes: Sequence[int], loads: Sequence[int]
) -> list[tuple[int, list[int]]]:
    """Like ``stripes``, for streams that do not move at one speed: each chunk (``sizes``,
    in order) goes on the stream with the fewest bytes waiting (``loads``, one per stream,
    plus the chunks given to it here). Ties go round the streams from ``message_id %
    count``, so with equal loads the plan is ``stripes``'s.

    On a lossy path each TCP stream has its own rate, and a message is whole only once its
    last chunk arrived: with fixed striping every stream carries an equal share, so all of
    them move at the slowest one's pace. The ordering rule holds whatever the plan: a stream
    may skip ids, and every chunk is queued under the order lock in id order.
    """
    count = len(loads)
    first = message_id % count
    rotation = [(first + step) % count for step in range(count)]
    pending = list(loads)
    shares: dict[int, list[int]] = {}
    for chunk, size in enumerate(sizes):
        lane = min(rotation, key=pending.__getitem__)  # the first least loaded, in rotation
        pending[lane] += size
        share = shares.get(lane)
        if share is None:
            shares[lane] = [chunk]
        else:
            share.append(chunk)
    return list(shares.items())


def read_answer(frame: bytes, *, acknowledged: bool, first_id: int, next_id: int) -> int | None:
    """What a receiver's frame (``ANSWER_SIZE`` bytes) on a session stream says: None for a
    PONG; for an ACK, the message id it confirms everything through.

    Either says the receiver is alive. ProtocolError for a bad frame, a frame of another
    type, an ACK in an unacknowledged session, or one through an id outside the session's
    ``first_id`` .. ``next_id - 1`` (one never sent on it).
    """
    frame_type, _ = wire.parse_prefix(frame)
    if frame_type == wire.FRAME_PONG:
        wire.parse_ping(frame, wire.FRAME_PONG)
        return None
    if frame_type != wire.FRAME_ACK:
        raise wire.ProtocolError(f"unexpected frame type {frame_type:#04x} from receiver")
    through = wire.parse_ack(frame)
    if not acknowledged:
        raise wire.ProtocolError("ACK in an unacknowledged session")
    if not first_id <= through < next_id:
        raise wire.ProtocolError(
            f"ACK through message {through}, outside the session's {first_id}..{next_id - 1}"
        )
    return through


def stalled(
    now: float, progress: float, heard: float, send_timeout: float, life: float | None
) -> bool:
    """Whether a write under way is stalled at ``now``: nothing written since ``progress``
    for send_timeout and, with a keepalive (``life``: keepalive_interval +
    keepalive_timeout), the receiver has not said it is alive (a PONG or an ACK, last at
    ``heard``) for ``life`` either. A receiver waiting for a slow consumer sends a PONG every
    interval: that is backpressure, not a fault."""
    return now - progress >= send_timeout and (life is None or now - max(progress, heard) >= life)


def ack_overdue(
    now: float, since: float | None, heard: float, send_timeout: float, life: float | None
) -> bool:
    """Acknowledged: whether acknowledgements are overdue at ``now``: messages await one
    since ``since`` (None: none do), none came for more than send_timeout and, with a
    keepalive, the receiver said nothing else either (last at ``heard``) for ``life``. A
    receiver that answers but does not confirm is waiting for a slow consumer:
    backpressure, not a fault."""
    if since is None or now - since <= send_timeout:
        return False
    return life is None or now - max(since, heard) >= life


def bytes_moved(
    seen: list[tuple[int, int] | None], index: int, progress: tuple[int, int] | None
) -> bool:
    """Whether stream ``index``'s DATA is moving: its kernel reports more bytes acknowledged
    by the receiver's host (``progress``, see ``tcp_progress``) than at the last reading
    (kept in ``seen``; None: no reading yet, and a first reading proves nothing), and more
    than a PING was outstanding then. Our own PINGs, acknowledged by the host of a receiver
    that reads but never answers, are no sign of life."""
    if progress is None:
        return False
    last, seen[index] = seen[index], progress
    return last is not None and last[1] > wire.PING.size and progress[0] > last[0]


def keepalive_tick(
    interval: float | None, timeout: float, send_timeout: float, acknowledged: bool
) -> float:
    """How often the keepalive looks: a quarter of the shortest bound it watches."""
    bounds = [] if interval is None else [interval, timeout]
    if acknowledged:
        bounds.append(send_timeout)
    return min(bounds) / 4


def next_tick(
    tick: float, now: float, since: float | None, send_timeout: float, slack: float
) -> float:
    """How long the keepalive sleeps: ``tick``, or less when acknowledgements awaited since
    ``since`` become overdue sooner (just past that moment, by ``slack``), so that a send
    waiting for that decision waits little past its own deadline."""
    if since is None:
        return tick
    due = since + send_timeout - now + slack
    return min(tick, max(due, slack))


class Keepalive:
    """When each stream of a session is due a PING, and when its PING's answer is overdue.

    A stream is due a PING once it wrote nothing for ``interval`` (a busy stream is not
    pinged: its writes are bounded by send_timeout already). A PING's ``timeout`` measures a
    stall, not a duration: a PING can wait behind megabytes the kernel still holds for a slow
    link. While the kernel's progress readings (``(acknowledged, outstanding)`` bytes, see
    ``tcp_progress``) show the bytes written before the PING being acknowledged, the stream
    is moving, and the timeout runs from the last such progress. (The kernel sees that
    progress in steps of the peer's window, and not past a proxy's buffers: the receiver's
    unprompted PONGs while the stream's bytes arrive cover the rest, see ``_receiving``.)
    """

    __slots__ = ("acked", "ahead_until", "idle_since", "interval", "moved", "seen", "timeout")

    def __init__(self, count: int, interval: float, timeout: float, now: float) -> None:
        self.interval = interval
        self.timeout = timeout
        self.seen = [-1] * count
        self.idle_since = [now] * count
        # Per stream, for its unanswered PING: the bytes acknowledged when last looked at,
        # the count once everything written before the PING is, and when it last moved.
        self.acked: list[int] = [0] * count
        self.ahead_until: list[int] = [0] * count
        self.moved = [0.0] * count

    def wants_progress(self, index: int) -> bool:
        """Whether stream ``index``'s unanswered PING still waits behind earlier bytes, so a
        progress reading can tell whether they move."""
        return self.acked[index] < self.ahead_until[index]

    def answer_overdue(
        self, index: int, now: float, sent: float, progress: tuple[int, int] | None
    ) -> bool:
        """Whether the PING stream ``index`` sent at ``sent`` is unanswered for too long at
        ``now``, given a progress reading taken if ``wants_progress`` (else None)."""
        if progress is not None and progress[0] > self.acked[index]:
            self.acked[index], self.moved[index] = progress[0], now
        return now - max(sent, self.moved[index]) > self.timeout

    def ping_due(self, index: int, now: float, writes: int, active: bool) -> bool:
        """Whether stream ``index`` (with no PING unanswered) is due one at ``now``: it has
        written ``writes`` batches, and ``active`` if it has something queued or being
        written."""
        if writes != self.seen[index] or active:
            self.seen[index], self.idle_since[index] = writes, now
            return False
        return now - self.idle_since[index] >= self.interval

    def pinged(self, index: int, now: float, progress: tuple[int, int] | None) -> None:
        """Stream ``index`` was sent a PING at ``now``, with the progress reading taken then
        (None where the kernel cannot tell: nothing to follow)."""
        if progress is not None:
            self.acked[index] = progress[0]
            self.ahead_until[index] = progress[0] + progress[1]
        else:
            self.ahead_until[index] = self.acked[index]
        self.idle_since[index] = now
