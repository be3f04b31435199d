"""DWCP multi-stream wire format, version 3: constants and pure framing/parsing (no I/O).

``docs/wire-format.md`` describes the same format byte by byte; a test keeps the two in step.
Every integer is unsigned big-endian ("network order"). Every frame carries a CRC-32C over
its own header, so no field is trusted before it is verified; DATA frames also carry one
over the payload unless the sender opted out (UNCHECKED).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

import crc32c

__all__ = [
    "ACK",
    "ANONYMOUS_SENDER",
    "DATA_HEADER",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "FLAG_ACKNOWLEDGED",
    "FLAG_ACK_NOW",
    "FLAG_UNCHECKED",
    "FRAME_ACK",
    "FRAME_DATA",
    "FRAME_HELLO",
    "FRAME_PING",
    "FRAME_PONG",
    "FRAME_WELCOME",
    "HANDSHAKE",
    "ID_WINDOW",
    "MAGIC",
    "MAX_FIRST_ID",
    "MAX_STREAMS",
    "MAX_TOTAL_LENGTH",
    "MIN_CHUNK_SIZE",
    "PING",
    "PREFIX",
    "SENDER_ID_SIZE",
    "SESSION_ID_SIZE",
    "STATUS_ACCEPTED",
    "STATUS_BUSY",
    "STATUS_REFUSED",
    "VERSION",
    "WELCOME",
    "DataHeader",
    "Handshake",
    "ProtocolError",
    "check_prefix",
    "checksum_of",
    "chunk_count",
    "frame_size",
    "pack_ack",
    "pack_data_header",
    "pack_handshake",
    "pack_ping",
    "pack_pong",
    "pack_welcome",
    "parse_ack",
    "parse_data_header",
    "parse_handshake",
    "parse_ping",
    "parse_prefix",
    "parse_welcome",
]

# CRC-32C (Castagnoli): hardware-accelerated, so integrity costs a few percent of a copy.
checksum_of: Callable[..., int] = crc32c.crc32c

MAGIC = b"DWCP"
VERSION = 3

# Frame types: the byte after the version in every frame.
FRAME_HELLO = 0x01  # sender -> receiver, first frame of every connection
FRAME_WELCOME = 0x02  # receiver -> sender, answer to HELLO
FRAME_DATA = 0x03  # sender -> receiver, one chunk of one message
FRAME_ACK = 0x04  # receiver -> sender, "delivered up to here" (acknowledged sessions only)
FRAME_PING = 0x05  # sender -> receiver, keepalive probe
FRAME_PONG = 0x06  # receiver -> sender, answer to PING, or "alive but busy" unprompted

FLAG_ACKNOWLEDGED = 0x0001  # HELLO flag: the receiver acknowledges delivery (cumulative ACKs)
FLAG_UNCHECKED = 0x0001  # DATA flag: the payload checksum field is 0 and checks nothing
FLAG_ACK_NOW = 0x0002  # DATA flag: acknowledge this message as soon as it is delivered
_KNOWN_DATA_FLAGS = FLAG_UNCHECKED | FLAG_ACK_NOW

STATUS_ACCEPTED = 0  # WELCOME status: the stream joined the session
STATUS_BUSY = 1  # WELCOME status: the receiver has no room for another session
STATUS_REFUSED = 2  # WELCOME status: the stream cannot join (duplicate, ended, mismatch)

SESSION_ID_SIZE = 16
# The sender's identity, the same for every session of one transport object: with the message
# ids, which go on from session to session, it names a message across reconnects. All zero:
# anonymous (the receiver does not deduplicate across sessions).
SENDER_ID_SIZE = 16
ANONYMOUS_SENDER = bytes(SENDER_ID_SIZE)
MAX_STREAMS = 32
# The chunks of a multi-chunk message, all but the last, carry at least this many bytes,
# so the receiver's per-chunk bookkeeping is bounded by the bytes that really arrived.
MIN_CHUNK_SIZE = 1024
MAX_TOTAL_LENGTH = 0xFFFF_FFFF
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
# A frame's message id may exceed the next id to deliver by at most ID_WINDOW - 1.
ID_WINDOW = 1 << 24
# A session's first message id leaves room for 2^62 more messages before the u64 wraps.
MAX_FIRST_ID = (1 << 63) - 1

# magic, version, type, flags: the first 8 bytes of every frame.
PREFIX = struct.Struct("!4sBBH")
# prefix, session id, sender id, first message id, stream index, stream count, keepalive
# interval (ms), header CRC
HANDSHAKE = struct.Struct("!4sBBH16s16sQHHII")
# prefix, status, header CRC
WELCOME = struct.Struct("!4sBBHII")
# prefix, message id, chunk index, chunk count, total length, payload length,
# payload CRC, header CRC (over bytes 0..35, the payload CRC included)
DATA_HEADER = struct.Struct("!4sBBHQIIIIII")
# prefix, message id (cumulative: every id up to it), header CRC
ACK = struct.Struct("!4sBBHQI")
# prefix, token, header CRC (PONG has the same layout)
PING = struct.Struct("!4sBBHQI")

_SIZES = {
    FRAME_HELLO: HANDSHAKE.size,
    FRAME_WELCOME: WELCOME.size,
    FRAME_DATA: DATA_HEADER.size,
    FRAME_ACK: ACK.size,
    FRAME_PING: PING.size,
    FRAME_PONG: PING.size,
}
_NAMES = {
    FRAME_HELLO: "HELLO",
    FRAME_WELCOME: "WELCOME",
    FRAME_DATA: "DATA",
    FRAME_ACK: "ACK",
    FRAME_PING: "PING",
    FRAME_PONG: "PONG",
}
_KNOWN_HELLO_FLAGS = FLAG_ACKNOWLEDGED
# The flags each frame type defines; every other bit must be 0.
_KNOWN_FLAGS = {FRAME_HELLO: _KNOWN_HELLO_FLAGS, FRAME_DATA: _KNOWN_DATA_FLAGS}


class ProtocolError(ValueError):
    """Bytes that do not follow the wire format; the connection that sent them is closed."""


class Handshake(NamedTuple):
    """A parsed HELLO frame."""

    session_id: bytes
    stream_index: int
    stream_count: int
    acknowledged: bool
    keepalive_ms: int
    sender_id: bytes = ANONYMOUS_SENDER
    first_id: int = 0


class DataHeader(NamedTuple):
    """A parsed, verified and self-consistent DATA header (the payload follows it)."""

    message_id: int
    chunk_index: int
    chunk_count: int
    total_length: int
    payload_length: int
    checksum: int
    checked: bool


def _seal(packed: bytes) -> bytes:
    """Return ``packed`` (a frame header whose last 4 bytes are 0) with its CRC filled in."""
    return packed[:-4] + (checksum_of(packed[:-4])).to_bytes(4, "big")


def _verify_header(data: bytes | bytearray | memoryview, name: str) -> None:
    if checksum_of(data[:-4]) != int.from_bytes(data[-4:], "big"):
        raise ProtocolError(f"{name} header checksum mismatch")


def parse_prefix(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """Check the 8-byte prefix of any frame; return ``(frame type, flags)``.

    Raises ProtocolError for a wrong magic, another version or an unknown frame type, so
    a stray frame is refused after 8 bytes instead of waiting for a longer header.
    """
    magic, version, frame_type, flags = PREFIX.unpack(bytes(data[: PREFIX.size]))
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}")
    if version != VERSION:
        raise ProtocolError(f"unsupported version {version} (this end speaks {VERSION})")
    if frame_type not in _SIZES:
        raise ProtocolError(f"unknown frame type {frame_type:#04x}")
    return frame_type, flags


def check_prefix(data: bytes | bytearray | memoryview, allowed: tuple[int, ...]) -> tuple[int, int]:
    """Check the 8-byte prefix of a frame where only the types in ``allowed`` belong.

    Everything a prefix says is checked here, before the rest of the header is waited for:
    the magic, the version, the type (known, and in ``allowed``) and the flags (none that the
    type does not define). Returns ``(frame type, flags)``; raises ProtocolError.
    """
    frame_type, flags = parse_prefix(data)
    if frame_type not in allowed:
        expected = " or ".join(_NAMES[kind] for kind in allowed)
        raise ProtocolError(f"unexpected {_NAMES[frame_type]} frame where {expected} belongs")
    unknown = flags & ~_KNOWN_FLAGS.get(frame_type, 0)
    if unknown:
        raise ProtocolError(f"unknown {_NAMES[frame_type]} flags {unknown:#06x}")
    return frame_type, flags


def frame_size(frame_type: int) -> int:
    """Return the header size of a frame type (DATA: without its payload)."""
    return _SIZES[frame_type]


def _expect(data: bytes | bytearray | memoryview, expected: int) -> int:
    frame_type, flags = parse_prefix(data)
    if frame_type != expected:
        raise ProtocolError(
            f"unexpected {_NAMES[frame_type]} frame where {_NAMES[expected]} belongs"
        )
    size = _SIZES[expected]
    if len(data) != size:
        raise ProtocolError(f"{_NAMES[expected]} is {len(data)} bytes, expected {size}")
    _verify_header(data, _NAMES[expected])
    return flags


def chunk_count(total_length: int, chunk_size: int) -> int:
    """Return how many chunks a message of ``total_length`` bytes is cut into (1 when it fits)."""
    if total_length <= chunk_size:
        return 1
    return -(-total_length // chunk_size)


def pack_handshake(
    session_id: bytes,
    stream_index: int,
    stream_count: int,
    *,
    acknowledged: bool,
    keepalive_ms: int = 0,
    sender_id: bytes = ANONYMOUS_SENDER,
    first_id: int = 0,
) -> bytes:
    """Return the HELLO frame a sender writes first on stream ``stream_index``.

    ``first_id`` is the message id of the session's first message; ``sender_id`` names the
    sender across its sessions (see ``SENDER_ID_SIZE``).
    """
    flags = FLAG_ACKNOWLEDGED if acknowledged else 0
    return _seal(
        HANDSHAKE.pack(
            MAGIC,
            VERSION,
            FRAME_HELLO,
            flags,
            session_id,
            sender_id,
            first_id,
            stream_index,
            stream_count,
            keepalive_ms,
            0,
        )
    )


def parse_handshake(data: bytes | bytearray | memoryview) -> Handshake:
    """Parse and validate a HELLO frame; raise ProtocolError when it is malformed."""
    flags = _expect(data, FRAME_HELLO)
    if flags & ~_KNOWN_HELLO_FLAGS:
        raise ProtocolError(f"unknown handshake flags {flags:#06x}")
    (_, _, _, _, session_id, sender_id, first_id, index, count, keepalive_ms, _) = HANDSHAKE.unpack(
        bytes(data)
    )
    if not 1 <= count <= MAX_STREAMS:
        raise ProtocolError(f"stream count {count} outside 1..{MAX_STREAMS}")
    if index >= count:
        raise ProtocolError(f"stream index {index} >= stream count {count}")
    if first_id > MAX_FIRST_ID:
        raise ProtocolError(f"first message id {first_id} above {MAX_FIRST_ID}")
    return Handshake(
        session_id,
        index,
        count,
        bool(flags & FLAG_ACKNOWLEDGED),
        keepalive_ms,
        sender_id,
        first_id,
    )


def pack_welcome(status: int) -> bytes:
    """Return the WELCOME frame a receiver answers a HELLO with."""
    return _seal(WELCOME.pack(MAGIC, VERSION, FRAME_WELCOME, 0, status, 0))


def parse_welcome(data: bytes | bytearray | memoryview) -> int:
    """Parse a WELCOME frame and return its status; raise ProtocolError when malformed."""
    if _expect(data, FRAME_WELCOME):
        raise ProtocolError("unknown welcome flags")
    return int(WELCOME.unpack(bytes(data))[4])


def pack_data_header(
    message_id: int,
    chunk_index: int,
    chunks: int,
    total_length: int,
    payload: bytes | bytearray | memoryview,
    *,
    checksum: bool = True,
    ack_now: bool = False,
) -> bytes:
    """Return the DATA header for ``payload``, chunk ``chunk_index`` of ``chunks``."""
    return _seal(
        DATA_HEADER.pack(
            MAGIC,
            VERSION,
            FRAME_DATA,
            (0 if checksum else FLAG_UNCHECKED) | (FLAG_ACK_NOW if ack_now else 0),
            message_id,
            chunk_index,
            chunks,
            total_length,
            len(payload),
            checksum_of(payload) if checksum else 0,
            0,
        )
    )


def check_data_fields(
    flags: int, index: int, count: int, total: int, length: int, crc: int, max_message_size: int
) -> None:
    """Raise ProtocolError unless a (header-verified) DATA frame's fields agree.

    The receiver's fast path inlines the common case; this is the one statement of the rules.
    """
    if flags & ~_KNOWN_DATA_FLAGS:
        raise ProtocolError(f"unknown frame flags {flags:#06x}")
    if flags & FLAG_UNCHECKED and crc:
        raise ProtocolError("unchecked frame with a non-zero checksum field")
    if total > max_message_size:
        raise ProtocolError(f"message of {total} bytes exceeds limit {max_message_size}")
    if index >= count:
        raise ProtocolError(f"chunk index {index} >= chunk count {count}")
    if count == 1:
        if length != total:
            raise ProtocolError("single-chunk frame whose payload is not the whole message")
        return
    if length > total:
        raise ProtocolError(f"chunk {index} longer than its message")
    if index + 1 < count and length < MIN_CHUNK_SIZE:
        raise ProtocolError(f"chunk {index} of {count} carries fewer than {MIN_CHUNK_SIZE} bytes")
    if count > total // MIN_CHUNK_SIZE + 1:
        raise ProtocolError(f"{count} chunks for a {total}-byte message")


def parse_data_header(data: bytes | bytearray | memoryview, max_message_size: int) -> DataHeader:
    """Parse a DATA header: verify its CRC, then check it against itself and the limit.

    Nothing is taken from a header whose CRC fails, so a flipped bit in an id or a length
    is caught before it can place a payload or size an allocation.
    """
    flags = _expect(data, FRAME_DATA)
    (_, _, _, _, mid, index, count, total, length, crc, _) = DATA_HEADER.unpack(bytes(data))
    check_data_fields(flags, index, count, total, length, crc, max_message_size)
    return DataHeader(mid, index, count, total, length, crc, not flags & FLAG_UNCHECKED)


def pack_ack(message_id: int) -> bytes:
    """Return the ACK frame confirming delivery of every message up to ``message_id``."""
    return _seal(ACK.pack(MAGIC, VERSION, FRAME_ACK, 0, message_id, 0))


def parse_ack(data: bytes | bytearray | memoryview) -> int:
    """Parse an ACK frame and return its (cumulative) message id; ProtocolError when malformed."""
    if _expect(data, FRAME_ACK):
        raise ProtocolError("unknown ack flags")
    return int(ACK.unpack(bytes(data))[4])


def pack_ping(token: int) -> bytes:
    """Return a PING frame; the receiver answers with a PONG carrying the same token."""
    return _seal(PING.pack(MAGIC, VERSION, FRAME_PING, 0, token, 0))


def pack_pong(token: int) -> bytes:
    """Return a PONG frame (token 0: unprompted, "alive but not reading")."""
    return _seal(PING.pack(MAGIC, VERSION, FRAME_PONG, 0, token, 0))


def parse_ping(data: bytes | bytearray | memoryview, expected: int = FRAME_PING) -> int:
    """Parse a PING (or, with ``expected=FRAME_PONG``, a PONG) and return its token."""
    if _expect(data, expected):
        raise ProtocolError(f"unknown {_NAMES[expected]} flags")
    return int(PING.unpack(bytes(data))[4])
