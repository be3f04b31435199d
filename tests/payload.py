"""Self-describing test payloads: who wrote a message, its sequence number, and a checksum.

Layout of a payload of ``size >= HEADER.size`` (16) bytes, all integers big-endian::

    writer_id u16 | seq u32 | size u32 | crc u32 | b"DP" | body (size - 16 bytes)

``crc`` is the CRC-32 (zlib) of the other header fields (writer_id, seq, size, b"DP") followed
by the body, so a flipped bit anywhere, a truncation, or bytes of another message are
detected, and the header cannot be mistaken for another writer's or sequence number's. The
body is a slice of a fixed pseudo-random pool chosen by (writer_id, seq): deterministic in
every process, cheap to build, and different from message to message.

Degenerate sizes (below 16 bytes, down to 0): the payload is the first ``size`` bytes of the
16-byte header that a full encoding with that ``size`` and an empty body would have. With at
least ``ID_SIZE`` (6) bytes the verifier reads writer_id and seq and rebuilds the expected
bytes exactly. Below 6 bytes a payload cannot say who wrote it: the verifier accepts it by
length alone and returns ``(ANONYMOUS, ANONYMOUS)``; the stream's own checksum and the
ordered delivery log (see ``receiver_child``) are what catch mistakes there. Between 6 and 10
bytes the crc is not (wholly) present, so a flipped writer_id or seq bit there would only
change whom the payload is attributed to.
"""

from __future__ import annotations

import random
import struct
import zlib

__all__ = [
    "ANONYMOUS",
    "HEADER",
    "ID_SIZE",
    "PayloadError",
    "expected_identity",
    "make_payload",
    "verify_payload",
]

MAGIC = b"DP"
HEADER = struct.Struct("!HIII2s")  # writer_id, seq, size, crc, magic
_FIELDS = struct.Struct("!HII")  # the fields before crc
ID_SIZE = 6  # writer_id + seq: the shortest payload that names its writer
ANONYMOUS = -1

_POOL_SPAN = 4 << 20  # longest single slice of the pool
_POOL_SLACK = 1 << 16  # slice start offsets: 0 .. _POOL_SLACK - 1
_pool: bytes | None = None


class PayloadError(ValueError):
    """A payload that is not what ``make_payload`` built: corrupted, truncated, or foreign."""


def _get_pool() -> bytes:
    global _pool
    if _pool is None:
        _pool = random.Random(0x5EED).randbytes(_POOL_SPAN + _POOL_SLACK)
    return _pool


def _body_parts(writer_id: int, seq: int, size: int) -> list[bytes]:
    pool = _get_pool()
    start = ((writer_id * 0x9E3779B1) ^ (seq * 0x85EBCA6B)) % _POOL_SLACK
    parts = []
    left = size
    while left:
        take = min(left, _POOL_SPAN)
        parts.append(pool[start : start + take])
        left -= take
        start = (start + 7919) % _POOL_SLACK
    return parts


def _header(writer_id: int, seq: int, size: int, crc_seed: int, parts: list[bytes]) -> bytes:
    crc = crc_seed
    for part in parts:
        crc = zlib.crc32(part, crc)
    return HEADER.pack(writer_id, seq, size, crc, MAGIC)


def _crc_seed(writer_id: int, seq: int, size: int) -> int:
    return zlib.crc32(_FIELDS.pack(writer_id, seq, size) + MAGIC)


def make_payload(writer_id: int, seq: int, size: int) -> bytes:
    """Return the ``size``-byte payload of message ``seq`` of writer ``writer_id``."""
    if not 0 <= writer_id <= 0xFFFF:
        raise ValueError(f"writer_id must be in 0..65535, got {writer_id}")
    if not 0 <= seq <= 0xFFFF_FFFF:
        raise ValueError(f"seq must be in 0..2**32-1, got {seq}")
    if not 0 <= size <= 0xFFFF_FFFF:
        raise ValueError(f"size must be in 0..2**32-1, got {size}")
    seed = _crc_seed(writer_id, seq, size)
    if size < HEADER.size:
        return _header(writer_id, seq, size, seed, [])[:size]
    parts = _body_parts(writer_id, seq, size - HEADER.size)
    return b"".join([_header(writer_id, seq, size, seed, parts), *parts])


def expected_identity(writer_id: int, seq: int, size: int) -> tuple[int, int]:
    """What ``verify_payload(make_payload(writer_id, seq, size))`` returns."""
    return (writer_id, seq) if size >= ID_SIZE else (ANONYMOUS, ANONYMOUS)


def verify_payload(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """Check a payload built by ``make_payload``; return ``(writer_id, seq)``.

    Raises PayloadError when it is corrupted. Payloads shorter than ``ID_SIZE`` cannot be
    checked and return ``(ANONYMOUS, ANONYMOUS)`` (see the module doc).
    """
    size = len(data)
    if size < ID_SIZE:
        return ANONYMOUS, ANONYMOUS
    view = memoryview(data).cast("B")
    writer_id, seq = struct.unpack_from("!HI", view)
    if size < HEADER.size:
        if bytes(view) != make_payload(writer_id, seq, size):
            raise PayloadError(f"short payload of {size} bytes does not match its encoding")
        return writer_id, seq
    _, _, declared, crc, magic = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise PayloadError(f"bad magic {magic!r} (writer {writer_id}, seq {seq})")
    if declared != size:
        raise PayloadError(f"payload is {size} bytes but says {declared} (writer {writer_id})")
    actual = zlib.crc32(view[HEADER.size :], _crc_seed(writer_id, seq, size))
    if actual != crc:
        raise PayloadError(f"checksum mismatch in writer {writer_id} seq {seq} ({size} bytes)")
    return writer_id, seq
