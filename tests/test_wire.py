"""Pure framing tests: round trips, rejection of malformed frames, and the documented format."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from dwcp.transport import wire

DOC = Path(__file__).resolve().parent.parent / "docs" / "wire-format.md"
SESSION = bytes(range(16))
LIMIT = 64 * 1024 * 1024


def data_header(**fields: int) -> bytes:
    """A DATA header for a valid 5-byte single-chunk message, with ``fields`` overridden."""
    values = {
        "magic": 0,
        "version": wire.VERSION,
        "type": wire.FRAME_DATA,
        "flags": 0,
        "message_id": 3,
        "index": 0,
        "count": 1,
        "size": 5,
        "total": 5,
        "length": 5,
        "crc": wire.checksum_of(b"hello"),
    }
    values.update(fields)
    magic = b"XXXX" if values.pop("magic") else wire.MAGIC
    return wire.DATA_HEADER.pack(magic, *values.values())


def test_handshake_round_trip() -> None:
    raw = wire.pack_handshake(SESSION, 2, 4, acknowledged=True)
    assert len(raw) == wire.HANDSHAKE.size == 28
    assert wire.parse_handshake(raw) == wire.Handshake(SESSION, 2, 4, True)
    plain = wire.parse_handshake(wire.pack_handshake(SESSION, 0, 1, acknowledged=False))
    assert plain.acknowledged is False


def test_welcome_and_ack_round_trip() -> None:
    assert wire.parse_welcome(wire.pack_welcome(wire.STATUS_BUSY)) == wire.STATUS_BUSY
    assert wire.parse_ack(wire.pack_ack(2**64 - 1)) == 2**64 - 1


@pytest.mark.parametrize(
    ("total", "chunk_size", "count"),
    [(0, 1024, 1), (1, 1024, 1), (1024, 1024, 1), (1025, 1024, 2), (4096, 1024, 4)],
)
def test_chunk_count(total: int, chunk_size: int, count: int) -> None:
    assert wire.chunk_count(total, chunk_size) == count


@pytest.mark.parametrize("size", [0, 1, 1024, 1025, 5000])
def test_encode_message_reassembles(size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    frames = wire.encode_message(11, data, 1024)
    assert len(frames) == wire.chunk_count(size, 1024)
    message = bytearray(size)
    for frame in frames:
        header = wire.parse_data_header(frame[: wire.DATA_HEADER.size], LIMIT)
        payload = frame[wire.DATA_HEADER.size :]
        assert header.message_id == 11
        assert len(payload) == header.payload_length
        wire.verify_checksum(header, payload)
        message[header.offset : header.offset + header.payload_length] = payload
    assert bytes(message) == data


def test_unchecked_frames_skip_the_checksum() -> None:
    frame = wire.encode_message(1, b"hello", 1024, checksum=False)[0]
    header = wire.parse_data_header(frame[: wire.DATA_HEADER.size], LIMIT)
    assert header.checksum == 0
    assert header.checked is False
    wire.verify_checksum(header, b"other")  # nothing to verify


def test_wrong_checksum_is_rejected() -> None:
    header = wire.parse_data_header(data_header(), LIMIT)
    wire.verify_checksum(header, b"hello")
    with pytest.raises(wire.ProtocolError, match="checksum"):
        wire.verify_checksum(header, b"hellO")


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"magic": 1}, "magic"),
        ({"version": 2}, "version"),
        ({"type": wire.FRAME_ACK}, "frame type"),
        ({"flags": 0x8000}, "flags"),
        ({"flags": wire.FLAG_UNCHECKED}, "non-zero checksum"),
        ({"index": 1}, "chunk index"),
        ({"count": 0}, "chunk index"),
        ({"total": 2**32 - 1, "size": 2**32 - 1, "length": 2**32 - 1}, "exceeds limit"),
        ({"length": 4}, "inconsistent"),
        ({"size": 6}, "inconsistent"),
        ({"count": 2, "size": 2048, "total": 2048, "length": 2048}, "chunk size"),
        ({"count": 2, "size": 1024, "total": 5000, "length": 1024}, "chunk count"),
        ({"count": 5, "index": 4, "size": 1024, "total": 5000, "length": 1024}, "payload"),
        ({"count": 5, "size": 1023, "total": 5000, "length": 1023}, "chunk size"),
    ],
)
def test_malformed_data_headers_are_rejected(fields: dict[str, int], match: str) -> None:
    with pytest.raises(wire.ProtocolError, match=match):
        wire.parse_data_header(data_header(**fields), LIMIT)


def test_data_header_must_be_complete() -> None:
    with pytest.raises(wire.ProtocolError, match="40"):
        wire.parse_data_header(data_header()[:39], LIMIT)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\0", "magic"),
        (wire.HANDSHAKE.pack(wire.MAGIC, 9, wire.FRAME_HELLO, 0, SESSION, 0, 1), "version"),
        (wire.HANDSHAKE.pack(wire.MAGIC, 1, wire.FRAME_DATA, 0, SESSION, 0, 1), "type"),
        (wire.HANDSHAKE.pack(wire.MAGIC, 1, wire.FRAME_HELLO, 2, SESSION, 0, 1), "flags"),
        (wire.HANDSHAKE.pack(wire.MAGIC, 1, wire.FRAME_HELLO, 0, SESSION, 0, 0), "count"),
        (wire.HANDSHAKE.pack(wire.MAGIC, 1, wire.FRAME_HELLO, 0, SESSION, 0, 33), "count"),
        (wire.HANDSHAKE.pack(wire.MAGIC, 1, wire.FRAME_HELLO, 0, SESSION, 4, 4), "index"),
        (b"DWCP", "bytes"),
    ],
)
def test_malformed_handshakes_are_rejected(raw: bytes, match: str) -> None:
    with pytest.raises(wire.ProtocolError, match=match):
        wire.parse_handshake(raw)


def test_malformed_answers_are_rejected() -> None:
    with pytest.raises(wire.ProtocolError, match="magic"):
        wire.parse_welcome(b"XXXX\x01\x02\x00\x00")
    with pytest.raises(wire.ProtocolError, match="frame type"):
        wire.parse_ack(wire.DATA_HEADER.pack(wire.MAGIC, 1, 3, 0, 0, 0, 1, 0, 0, 0, 0)[:16])
    with pytest.raises(wire.ProtocolError, match="flags"):
        wire.parse_ack(wire.ACK.pack(wire.MAGIC, 1, wire.FRAME_ACK, 1, 0))


# -- the document ---------------------------------------------------------------------------


def doc_examples() -> list[bytes]:
    """Every ```hex block of docs/wire-format.md, in order, plus inline examples."""
    text = DOC.read_text()
    blocks = re.findall(r"```hex\n(.*?)```", text, flags=re.DOTALL)
    inline = re.findall(r"Example[^`\n]*: `([0-9a-f ]+)`", text)
    return [bytes.fromhex(block) for block in blocks + inline]


def test_document_examples_parse() -> None:
    hello, single, chunk0, chunk1, welcome, ack = doc_examples()
    assert wire.parse_handshake(hello) == wire.Handshake(SESSION, 1, 4, True)
    header = wire.parse_data_header(single[: wire.DATA_HEADER.size], LIMIT)
    assert (header.message_id, header.total_length) == (7, 5)
    wire.verify_checksum(header, single[wire.DATA_HEADER.size :])
    assert single == wire.encode_message(7, b"hello", 262144)[0]
    frames = wire.encode_message(9, b"a" * 1500, 1024)
    assert [chunk0, chunk1] == [frame[: wire.DATA_HEADER.size] for frame in frames]
    assert wire.parse_welcome(welcome) == wire.STATUS_ACCEPTED
    assert wire.parse_ack(ack) == 7


def test_document_sizes_match_the_structs() -> None:
    text = DOC.read_text()
    documented = {
        name: int(size)
        for name, size in re.findall(r"^## (\w+) \(.*?\), (\d+)[- ]byte", text, flags=re.MULTILINE)
    }
    assert documented == {
        "HELLO": wire.HANDSHAKE.size,
        "WELCOME": wire.WELCOME.size,
        "DATA": wire.DATA_HEADER.size,
        "ACK": wire.ACK.size,
    }
    assert struct.calcsize("!4sBBH") == 8  # the common prefix
    assert f"1 <= N <= {wire.MAX_STREAMS}" in text
    assert f"{wire.MIN_CHUNK_SIZE} <= size" in text
    assert "9a 71 bb 4c" in text and wire.checksum_of(b"hello") == 0x9A71BB4C
    assert wire.checksum_of(b"123456789") == 0xE3069283  # the CRC-32C check value
