"""The receiver's protocol decisions, with no I/O: fed bytes and events, returning decisions.

``StreamParser`` turns the bytes of one session stream into DATA frames and PING tokens;
``AckPolicy`` says when an acknowledged session's delivery writes its cumulative ACK;
``alive_due`` and ``stall_due`` when a reader says it is alive unprompted (its bytes keep
arriving; its consumer is behind), and
``read_tick`` how long one of its blocking reads waits. No
sockets, threads or clocks here: the receiver (``receiver.py``) reads, writes and keeps the
time, and these are tested by feeding them bytes (``tests/unit/test_receiving.py``).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from dwcp.transport import wire
from dwcp.transport._reassembly import FrameTuple

__all__ = [
    "ACK_DELAY",
    "ACK_EVERY",
    "LARGE",
    "AckPolicy",
    "LargeFrame",
    "StreamParser",
    "alive_due",
    "read_tick",
    "stall_due",
]

# A payload at least this large is read straight into its own bytes, not via a buffer.
LARGE = 32 * 1024
# Acknowledged sessions: one cumulative ACK once this many messages are delivered and
# unacknowledged, or this long (seconds) after the first of them was delivered.
ACK_EVERY = 128
ACK_DELAY = 0.002

_HEADER = wire.DATA_HEADER.size
_HEADER_CRC_AT = _HEADER - 4
_PING_SIZE = wire.PING.size
# The DATA header read with its 8-byte prefix as one integer, so one comparison checks the
# magic, version, type and flags of a well-formed frame.
_DATA_FAST = struct.Struct("!QQIIIIII")
_PREFIX_CHECKED = int.from_bytes(
    wire.PREFIX.pack(wire.MAGIC, wire.VERSION, wire.FRAME_DATA, 0), "big"
)
_PREFIX_UNCHECKED = _PREFIX_CHECKED | wire.FLAG_UNCHECKED
_KNOWN_DATA_FLAGS = wire.FLAG_UNCHECKED | wire.FLAG_ACK_NOW
_IN_SESSION = (wire.FRAME_DATA, wire.FRAME_PING)


class LargeFrame(NamedTuple):
    """A verified DATA header whose large payload is not all in the buffer yet: the caller
    reads the rest of it itself (``head`` bytes of it are at the offset ``parse`` returned)."""

    frame: FrameTuple  # its payload field is empty
    checked: bool
    checksum: int


class StreamParser:
    """Parses the frames of one session stream (after its HELLO) out of a buffer.

    ``parse`` consumes whole frames; what it found is left in ``frames`` (the list it is
    given), ``pings`` (tokens to answer with a PONG), ``ack_now`` (the highest message id a
    frame flagged ACK_NOW) and ``large``. A violation raises ProtocolError with every frame
    parsed before the bad one already in ``frames``: those are whole and verified, and the
    receiver still delivers what they complete (docs/wire-format.md, Closing).
    """

    __slots__ = ("ack_now", "large", "limit", "pings")

    def __init__(self, max_message_size: int) -> None:
        self.limit = max_message_size
        self.ack_now = -1
        self.pings: list[int] = []
        self.large: LargeFrame | None = None

    def parse(self, buf: bytearray, start: int, end: int, frames: list[FrameTuple]) -> int:
        """Parse the frames in ``buf[start:end]``, appending each DATA frame to ``frames``.

        Returns the offset after the last byte consumed. It stops at a frame not all in
        (its prefix is checked as soon as its 8 bytes are), or after the header of a frame
        whose payload of ``LARGE`` bytes or more is not all in (``large`` is set; the
        payload's first bytes start at the returned offset).
        """
        self.large = None
        view = memoryview(buf)
        limit = self.limit
        unpack = _DATA_FAST.unpack_from
        crc = wire.checksum_of
        append = frames.append
        # Module constants as locals: this loop runs once per frame.
        data_type, header_size, crc_at, large = wire.FRAME_DATA, _HEADER, _HEADER_CRC_AT, LARGE
        p_checked, p_unchecked, known_flags = _PREFIX_CHECKED, _PREFIX_UNCHECKED, _KNOWN_DATA_FLAGS
        while end - start >= 8:
            if buf[start + 5] != data_type:
                wire.check_prefix(view[start : start + 8], _IN_SESSION)  # only PING is left
                if end - start < _PING_SIZE:
                    break
                self.pings.append(wire.parse_ping(view[start : start + _PING_SIZE]))
                start += _PING_SIZE
                continue
            if end - start < header_size:
                # Refused as soon as the prefix proves it bad, not once 40 bytes are in.
                wire.check_prefix(view[start : start + 8], _IN_SESSION)
                break
            prefix, mid, index, count, total, length, pcrc, hcrc = unpack(buf, start)
            if crc(view[start : start + crc_at]) != hcrc:
                wire.check_prefix(view[start : start + 8], _IN_SESSION)  # a clearer error
                raise wire.ProtocolError("DATA header checksum mismatch")
            checked = prefix == p_checked
            if not checked and prefix != p_unchecked:
                flags = prefix & 0xFFFF
                if prefix ^ flags != p_checked or flags & ~known_flags:
                    wire.check_prefix(view[start : start + 8], _IN_SESSION)
                checked = not flags & wire.FLAG_UNCHECKED
                if flags & wire.FLAG_ACK_NOW and mid > self.ack_now:
                    self.ack_now = mid
            if count != 1 or index or length != total or total > limit or (pcrc and not checked):
                wire.check_data_fields(prefix & 0xFFFF, index, count, total, length, pcrc, limit)
            body = start + header_size
            if body + length > end:
                if length >= large:
                    self.large = LargeFrame((mid, index, count, total, b"", length), checked, pcrc)
                    return body
                break  # the rest comes with the next read
            start = body + length
            payload = bytes(view[body:start])
            if checked and crc(payload) != pcrc:
                raise wire.ProtocolError(f"checksum mismatch in message {mid} chunk {index}")
            append((mid, index, count, total, payload, length))
        return start


class AckPolicy:
    """When an acknowledged session's delivery thread writes its cumulative ACK.

    One ACK for the last message delivered, once ``ACK_EVERY`` messages are delivered and
    unacknowledged (never more: ``room`` bounds what is delivered before the next decision),
    ``ACK_DELAY`` seconds after the first of them was delivered, as soon as a message a
    frame flagged ACK_NOW is delivered, and when the session ends. The caller gives the
    time; nothing here reads a clock.
    """

    __slots__ = ("since", "stream", "through", "unacked")

    def __init__(self) -> None:
        self.unacked = 0  # delivered since the last ACK
        self.since = 0.0  # when the first of them was delivered
        self.through = -1  # the last message delivered
        self.stream = -1  # the stream that carried its chunk 0

    def room(self) -> int:
        """How many messages may be delivered before the next ``delivered`` call."""
        return ACK_EVERY - self.unacked

    def wait(self, now: float) -> float | None:
        """How long delivery may wait for more messages before an ACK is due (None: no
        limit, nothing is unacknowledged)."""
        if not self.unacked:
            return None
        return max(self.since + ACK_DELAY - now, 0.0)

    def delivered(
        self,
        count: int,
        through: int,
        stream: int,
        ack_now: int,
        now: float,
        *,
        began: float | None = None,
    ) -> bool:
        """``count`` more messages, the last ``through`` (chunk 0 on ``stream``), were handed
        on from ``began`` (default ``now``) to ``now``; ``ack_now`` is the highest id flagged
        ACK_NOW. True: ACK now, which includes when the delay since the first of them was
        handed on has passed already (a slow ``on_message``)."""
        if not self.unacked:
            self.since = now if began is None else began
        self.unacked += count
        self.through, self.stream = through, stream
        return (
            self.unacked >= ACK_EVERY
            or through >= ack_now > through - self.unacked
            or now - self.since >= ACK_DELAY
        )

    def due(self, now: float) -> bool:
        """Whether an ACK is due at ``now`` for what is unacknowledged (the delay passed)."""
        return bool(self.unacked) and now - self.since >= ACK_DELAY

    def acked(self) -> None:
        """The ACK through ``through`` was written (or given up on)."""
        self.unacked = 0


def alive_due(now: float, said: float, heartbeat: float | None) -> bool:
    """Whether a reader that just got bytes on its stream writes an unprompted PONG at
    ``now``: the sender pings every ``heartbeat`` seconds (None: it keeps no keepalive) and
    the stream's last PONG went at ``said``.

    Twice per interval: a PING waits behind the stream's earlier bytes wherever they still
    are (the sender's kernel, a proxy's buffers, its share of a link shared with the other
    streams) and is read only after them; while they keep arriving, the stream is moving and
    these PONGs answer it (any PONG answers every PING sent before it on its stream)."""
    return heartbeat is not None and now - said >= heartbeat / 2


def stall_due(now: float, said: float, heartbeat: float | None) -> bool:
    """Whether a reader that starts waiting for budget room (its consumer is behind) writes
    an unprompted PONG at ``now`` (the stream's last PONG went at ``said``): so a sender
    that is closing learns at once that the receiver is alive and waits for it, instead of
    a keepalive interval later. At most eight a keepalive interval, however often the
    budget fills."""
    return heartbeat is not None and now - said >= heartbeat / 8


def read_tick(frame_timeout: float, idle_timeout: float | None, heartbeat: float | None) -> float:
    """How long one blocking read of a session stream waits at most: a quarter of the
    shortest bound it watches, the keepalive interval among them (so a large frame read in
    one call still lets ``alive_due`` be asked while its bytes trickle in)."""
    bounds = [frame_timeout, idle_timeout or frame_timeout]
    if heartbeat is not None:
        bounds.append(heartbeat)
    return min(bounds) / 4
