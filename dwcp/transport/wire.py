"""DWCP multi-stream wire format: constants and pure framing/parsing functions (no I/O).

``docs/wire-format.md`` describes the same format byte by byte; a test keeps the two in step.
Every integer is unsigned big-endian ("network order").
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

import crc32c

__all__ = [
    "ACK",
    "DATA_HEADER",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "FLAG_ACKNOWLEDGED",
    "FLAG_UNCHECKED",
    "FRAME_ACK",
    "FRAME_DATA",
    "FRAME_HELLO",
    "FRAME_WELCOME",
    "HANDSHAKE",
    "MAGIC",
    "MAX_STREAMS",
    "MAX_TOTAL_LENGTH",
    "MIN_CHUNK_SIZE",
    "SESSION_ID_SIZE",
    "STATUS_ACCEPTED",
    "STATUS_BUSY",
    "VERSION",
    "WELCOME",
    "DataHeader",
    "Handshake",
    "ProtocolError",
    "checksum_of",
    "chunk_count",
    "encode_message",
    "pack_ack",
    "pack_data_header",
    "pack_handshake",
    "pack_welcome",
    "parse_ack",
    "parse_data_header",
    "parse_handshake",
    "parse_welcome",
    "verify_checksum",
]

# CRC-32C (Castagnoli): hardware-accelerated, so integrity costs a few percent of a copy.
checksum_of: Callable[[bytes | bytearray | memoryview], int] = crc32c.crc32c

MAGIC = b"DWCP"
VERSION = 1

# Frame types: the byte after the version in every frame.
FRAME_HELLO = 0x01  # sender -> receiver, first bytes of every connection
FRAME_WELCOME = 0x02  # receiver -> sender, answer to HELLO
FRAME_DATA = 0x03  # sender -> receiver, one chunk of one message
FRAME_ACK = 0x04  # receiver -> sender, "message delivered" (acknowledged sessions only)

FLAG_ACKNOWLEDGED = 0x0001  # HELLO flag: the receiver must ACK every delivered message
FLAG_UNCHECKED = 0x0001  # DATA flag: the checksum field is 0 and carries no checksum

STATUS_ACCEPTED = 0  # WELCOME status: the stream joined the session
STATUS_BUSY = 1  # WELCOME status: the receiver has no room for another session

SESSION_ID_SIZE = 16
MAX_STREAMS = 32
# A multi-chunk message's chunks are at least this large, so a chunk count (and the
# receiver's per-chunk bookkeeping) is bounded by total_length / MIN_CHUNK_SIZE.
MIN_CHUNK_SIZE = 1024
MAX_TOTAL_LENGTH = 0xFFFF_FFFF
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024

# magic, version, type, flags, session id, stream index, stream count
HANDSHAKE = struct.Struct("!4sBBH16sHH")
# magic, version, type, status
WELCOME = struct.Struct("!4sBBH")
# magic, version, type, flags, message id, chunk index, chunk count, chunk size,
# total length, payload length, CRC-32C of the payload
DATA_HEADER = struct.Struct("!4sBBHQIIIIII")
# magic, version, type, flags, message id
ACK = struct.Struct("!4sBBHQ")

_KNOWN_HELLO_FLAGS = FLAG_ACKNOWLEDGED


class ProtocolError(ValueError):
    """Bytes that do not follow the wire format; the connection that sent them is closed."""


class Handshake(NamedTuple):
    """A parsed HELLO frame."""

    session_id: bytes
    stream_index: int
    stream_count: int
    acknowledged: bool


class DataHeader(NamedTuple):
    """A parsed and self-consistent DATA frame header (the payload follows it on the wire)."""

    message_id: int
    chunk_index: int
    chunk_count: int
    chunk_size: int
    total_length: int
    payload_length: int
    checksum: int
    checked: bool

    @property
    def offset(self) -> int:
        """Where this chunk's payload starts inside the whole message."""
        return self.chunk_index * self.chunk_size


def _check_prefix(magic: bytes, version: int, frame_type: int, expected: int) -> None:
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}")
    if version != VERSION:
        raise ProtocolError(f"unsupported version {version}")
    if frame_type != expected:
        raise ProtocolError(f"unexpected frame type {frame_type:#04x}")


def chunk_count(total_length: int, chunk_size: int) -> int:
    """Return how many chunks a message of ``total_length`` bytes is cut into (1 when it fits)."""
    if total_length <= chunk_size:
        return 1
    return -(-total_length // chunk_size)


def pack_handshake(
    session_id: bytes, stream_index: int, stream_count: int, *, acknowledged: bool
) -> bytes:
    """Return the HELLO frame a sender writes first on stream ``stream_index``."""
    flags = FLAG_ACKNOWLEDGED if acknowledged else 0
    return HANDSHAKE.pack(
        MAGIC, VERSION, FRAME_HELLO, flags, session_id, stream_index, stream_count
    )


def parse_handshake(data: bytes) -> Handshake:
    """Parse and validate a HELLO frame; raise ProtocolError when it is malformed."""
    if len(data) != HANDSHAKE.size:
        raise ProtocolError(f"handshake is {len(data)} bytes, expected {HANDSHAKE.size}")
    magic, version, frame_type, flags, session_id, index, count = HANDSHAKE.unpack(data)
    _check_prefix(magic, version, frame_type, FRAME_HELLO)
    if flags & ~_KNOWN_HELLO_FLAGS:
        raise ProtocolError(f"unknown handshake flags {flags:#06x}")
    if not 1 <= count <= MAX_STREAMS:
        raise ProtocolError(f"stream count {count} outside 1..{MAX_STREAMS}")
    if index >= count:
        raise ProtocolError(f"stream index {index} >= stream count {count}")
    return Handshake(session_id, index, count, bool(flags & FLAG_ACKNOWLEDGED))


def pack_welcome(status: int) -> bytes:
    """Return the WELCOME frame a receiver answers a HELLO with."""
    return WELCOME.pack(MAGIC, VERSION, FRAME_WELCOME, status)


def parse_welcome(data: bytes) -> int:
    """Parse a WELCOME frame and return its status; raise ProtocolError when malformed."""
    if len(data) != WELCOME.size:
        raise ProtocolError(f"welcome is {len(data)} bytes, expected {WELCOME.size}")
    magic, version, frame_type, status = WELCOME.unpack(data)
    _check_prefix(magic, version, frame_type, FRAME_WELCOME)
    return int(status)


def pack_data_header(
    message_id: int,
    chunk_index: int,
    chunks: int,
    chunk_size: int,
    total_length: int,
    payload: bytes | bytearray | memoryview,
    *,
    checksum: bool = True,
) -> bytes:
    """Return the DATA header for ``payload``, chunk ``chunk_index`` of ``chunks``."""
    return DATA_HEADER.pack(
        MAGIC,
        VERSION,
        FRAME_DATA,
        0 if checksum else FLAG_UNCHECKED,
        message_id,
        chunk_index,
        chunks,
        chunk_size,
        total_length,
        len(payload),
        checksum_of(payload) if checksum else 0,
    )


def parse_data_header(data: bytes, max_message_size: int) -> DataHeader:
    """Parse a DATA header and check it against itself and ``max_message_size``.

    Every length is validated here, before the caller allocates anything from it; the
    chunk layout is fully determined (chunk ``i`` covers ``[i * chunk_size, ...)``), so
    distinct chunk indexes can never overlap or leave a hole.
    """
    if len(data) != DATA_HEADER.size:
        raise ProtocolError(f"frame header is {len(data)} bytes, expected {DATA_HEADER.size}")
    (magic, version, frame_type, flags, mid, index, count, size, total, length, crc) = (
        DATA_HEADER.unpack(data)
    )
    _check_prefix(magic, version, frame_type, FRAME_DATA)
    if flags & ~FLAG_UNCHECKED:
        raise ProtocolError(f"unknown frame flags {flags:#06x}")
    checked = not flags
    if not checked and crc:
        raise ProtocolError("unchecked frame with a non-zero checksum field")
    if total > max_message_size:
        raise ProtocolError(f"message of {total} bytes exceeds limit {max_message_size}")
    if index >= count:
        raise ProtocolError(f"chunk index {index} >= chunk count {count}")
    if count == 1:
        if size != total or length != total:
            raise ProtocolError("single-chunk frame with inconsistent lengths")
    else:
        if not MIN_CHUNK_SIZE <= size < total:
            raise ProtocolError(f"chunk size {size} invalid for a {total}-byte message")
        if count != -(-total // size):
            raise ProtocolError(f"chunk count {count} does not match {total}/{size}")
        if length != min(size, total - index * size):
            raise ProtocolError(f"chunk {index} has wrong payload length {length}")
    return DataHeader(mid, index, count, size, total, length, crc, checked)


def verify_checksum(header: DataHeader, payload: bytes | bytearray | memoryview) -> None:
    """Raise ProtocolError unless ``payload`` matches the header's CRC-32C (if it has one)."""
    if header.checked and checksum_of(payload) != header.checksum:
        raise ProtocolError(
            f"checksum mismatch in message {header.message_id} chunk {header.chunk_index}"
        )


def pack_ack(message_id: int) -> bytes:
    """Return the ACK frame confirming delivery of ``message_id``."""
    return ACK.pack(MAGIC, VERSION, FRAME_ACK, 0, message_id)


def parse_ack(data: bytes) -> int:
    """Parse an ACK frame and return its message id; raise ProtocolError when malformed."""
    if len(data) != ACK.size:
        raise ProtocolError(f"ack is {len(data)} bytes, expected {ACK.size}")
    magic, version, frame_type, flags, message_id = ACK.unpack(data)
    _check_prefix(magic, version, frame_type, FRAME_ACK)
    if flags:
        raise ProtocolError(f"unknown ack flags {flags:#06x}")
    return int(message_id)


def encode_message(
    message_id: int,
    data: bytes | bytearray | memoryview,
    chunk_size: int,
    *,
    checksum: bool = True,
) -> list[bytes]:
    """Return the complete DATA frames (header + payload) of one message, in chunk order.

    The transport writes the same bytes without building this list; it serves tests,
    tools and other implementations as the reference encoding.
    """
    view = memoryview(data).cast("B")
    total = len(view)
    count = chunk_count(total, chunk_size)
    size = chunk_size if count > 1 else total
    frames = []
    for index in range(count):
        payload = view[index * size : (index + 1) * size]
        header = pack_data_header(message_id, index, count, size, total, payload, checksum=checksum)
        frames.append(header + payload)
    return frames
