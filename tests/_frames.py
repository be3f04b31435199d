"""DATA frames built and checked by the tests, from docs/wire-format.md's layout.

The library writes DATA frames without building them one by one (the sender's fast path)
and checks them inline (the receiver's ``StreamParser``), so the reference encoding lives
here: packed field by field with ``wire.DATA_HEADER`` and the public constants, not with
the library's own ``pack_data_header``, so that it is a second reading of the document.
"""

from __future__ import annotations

from typing import NamedTuple

from dwcp.transport import wire
from dwcp.transport._reassembly import Payload

__all__ = ["Frame", "encode_message", "verify_checksum"]

# DATA header (wire-format.md): the header CRC covers every byte before it, the payload
# CRC included.
_HEADER_CRC_AT = wire.DATA_HEADER.size - 4


class Frame(NamedTuple):
    """One DATA frame as the readers hand it to ``Reassembly`` (a ``FrameTuple``), named."""

    message_id: int
    chunk_index: int
    chunk_count: int
    total_length: int
    payload: Payload
    length: int


def encode_message(
    message_id: int,
    data: bytes | bytearray | memoryview,
    chunk_size: int,
    *,
    checksum: bool = True,
) -> list[bytes]:
    """The complete DATA frames (header + payload) of one message, in chunk order.

    Chunk ``i`` carries bytes ``i * chunk_size`` .. ``(i + 1) * chunk_size`` of ``data``; an
    empty message is one empty chunk. ``checksum=False`` writes UNCHECKED frames.
    """
    view = memoryview(data).cast("B")
    total = len(view)
    count = max(1, -(-total // chunk_size))
    flags = 0 if checksum else wire.FLAG_UNCHECKED
    frames = []
    for index in range(count):
        payload = bytes(view[index * chunk_size : (index + 1) * chunk_size])
        payload_crc = wire.checksum_of(payload) if checksum else 0
        header = wire.DATA_HEADER.pack(
            wire.MAGIC,
            wire.VERSION,
            wire.FRAME_DATA,
            flags,
            message_id,
            index,
            count,
            total,
            len(payload),
            payload_crc,
            0,
        )[:_HEADER_CRC_AT]
        header += wire.checksum_of(header).to_bytes(4, "big")
        frames.append(header + payload)
    return frames


def verify_checksum(header: wire.DataHeader, payload: bytes | bytearray | memoryview) -> None:
    """Raise ``wire.ProtocolError`` unless ``payload`` is the one ``header`` describes: its
    length, and its CRC-32C when the frame is checked (what the receiver checks inline)."""
    if len(payload) != header.payload_length:
        raise wire.ProtocolError("payload length differs from its header")
    if header.checked and wire.checksum_of(payload) != header.checksum:
        raise wire.ProtocolError(
            f"checksum mismatch in message {header.message_id} chunk {header.chunk_index}"
        )
