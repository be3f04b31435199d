"""Pure framing tests: round trips, rejection of malformed frames, and the documented format."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from dwcp.transport import wire
from dwcp.transport._reassembly import FrameTuple
from dwcp.transport._receiving import StreamParser
from tests._frames import encode_message, verify_checksum

DOC = Path(__file__).resolve().parents[2] / "docs" / "wire-format.md"
SESSION = bytes(range(16))
LIMIT = 64 * 1024 * 1024


def seal(packed: bytes) -> bytes:
    """Fill in the header CRC (the last 4 bytes) of a hand-packed frame header."""
    return packed[:-4] + wire.checksum_of(packed[:-4]).to_bytes(4, "big")


def data_header(**fields: int) -> bytes:
    """A sealed DATA header for a valid 5-byte single-chunk message, ``fields`` overridden."""
    values = {
        "magic": 0,
        "version": wire.VERSION,
        "type": wire.FRAME_DATA,
        "flags": 0,
        "message_id": 3,
        "index": 0,
        "count": 1,
        "total": 5,
        "length": 5,
        "crc": wire.checksum_of(b"hello"),
        "header_crc": 0,
    }
    values.update(fields)
    magic = b"XXXX" if values.pop("magic") else wire.MAGIC
    return seal(wire.DATA_HEADER.pack(magic, *values.values()))


def hello(version: int = wire.VERSION, kind: int = wire.FRAME_HELLO, flags: int = 0,
          index: int = 0, count: int = 1) -> bytes:  # fmt: skip
    return seal(
        wire.HANDSHAKE.pack(
            wire.MAGIC, version, kind, flags, SESSION, bytes(16), 0, index, count, 0, 0
        )
    )


def test_handshake_round_trip() -> None:
    raw = wire.pack_handshake(SESSION, 2, 4, acknowledged=True, keepalive_ms=5000)
    assert len(raw) == wire.HANDSHAKE.size == 60
    assert wire.parse_handshake(raw) == wire.Handshake(SESSION, 2, 4, True, 5000)
    plain = wire.parse_handshake(wire.pack_handshake(SESSION, 0, 1, acknowledged=False))
    assert plain.acknowledged is False
    assert plain.keepalive_ms == 0


def test_welcome_ack_ping_pong_round_trip() -> None:
    assert wire.parse_welcome(wire.pack_welcome(wire.STATUS_BUSY)) == wire.STATUS_BUSY
    assert wire.parse_welcome(wire.pack_welcome(wire.STATUS_REFUSED)) == wire.STATUS_REFUSED
    assert wire.parse_ack(wire.pack_ack(2**64 - 1)) == 2**64 - 1
    assert wire.parse_ping(wire.pack_ping(42)) == 42
    assert wire.parse_ping(wire.pack_pong(0), wire.FRAME_PONG) == 0
    with pytest.raises(wire.ProtocolError, match="unexpected PONG"):
        wire.parse_ping(wire.pack_pong(1))


@pytest.mark.parametrize(
    ("total", "chunk_size", "count"),
    [(0, 1024, 1), (1, 1024, 1), (1024, 1024, 1), (1025, 1024, 2), (4096, 1024, 4)],
)
def test_chunk_count(total: int, chunk_size: int, count: int) -> None:
    assert wire.chunk_count(total, chunk_size) == count


@pytest.mark.parametrize("size", [0, 1, 1024, 1025, 5000])
def test_encode_message_reassembles(size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    frames = encode_message(11, data, 1024)
    assert len(frames) == wire.chunk_count(size, 1024)
    parts = {}
    for frame in frames:
        header = wire.parse_data_header(frame[: wire.DATA_HEADER.size], LIMIT)
        payload = frame[wire.DATA_HEADER.size :]
        assert header.message_id == 11
        verify_checksum(header, payload)
        parts[header.chunk_index] = payload
    assert b"".join(parts[i] for i in range(len(frames))) == data


def test_unchecked_frames_skip_the_payload_checksum_but_not_the_header() -> None:
    frame = encode_message(1, b"hello", 1024, checksum=False)[0]
    header = wire.parse_data_header(frame[: wire.DATA_HEADER.size], LIMIT)
    assert header.checksum == 0
    assert header.checked is False
    verify_checksum(header, b"other")  # nothing to verify in the payload
    damaged = bytearray(frame[: wire.DATA_HEADER.size])
    damaged[15] ^= 1  # the message id
    with pytest.raises(wire.ProtocolError, match="header checksum"):
        wire.parse_data_header(bytes(damaged), LIMIT)


def test_wrong_checksum_is_rejected() -> None:
    # The receiver's parser checks each payload against its header's CRC-32C.
    frames: list[FrameTuple] = []
    intact = bytearray(data_header() + b"hello")
    assert StreamParser(LIMIT).parse(intact, 0, len(intact), frames) == len(intact)
    assert [frame[4] for frame in frames] == [b"hello"]
    damaged = bytearray(data_header() + b"hellO")
    with pytest.raises(wire.ProtocolError, match="checksum mismatch in message 3 chunk 0"):
        StreamParser(LIMIT).parse(damaged, 0, len(damaged), frames)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"magic": 1}, "magic"),
        ({"version": 1}, "version"),
        ({"type": wire.FRAME_ACK}, "unexpected ACK"),
        ({"type": 0x7F}, "unknown frame type"),
        ({"flags": 0x8000}, "flags"),
        ({"flags": wire.FLAG_UNCHECKED}, "non-zero checksum"),
        ({"index": 1}, "chunk index"),
        ({"count": 0}, "chunk index"),
        ({"total": 2**32 - 1, "length": 2**32 - 1}, "exceeds limit"),
        ({"length": 4}, "not the whole message"),
        ({"count": 2, "total": 2048, "length": 4096}, "longer than its message"),
        ({"count": 2, "total": 2048, "length": 1023}, "fewer than 1024"),
        ({"count": 6, "index": 5, "total": 5000, "length": 904}, "6 chunks"),
    ],
)
def test_malformed_data_headers_are_rejected(fields: dict[str, int], match: str) -> None:
    with pytest.raises(wire.ProtocolError, match=match):
        wire.parse_data_header(data_header(**fields), LIMIT)


def test_last_chunk_may_be_short_and_counts_are_bounded_by_bytes() -> None:
    wire.parse_data_header(data_header(count=5, index=4, total=5000, length=904), LIMIT)
    wire.parse_data_header(data_header(count=5, index=0, total=5000, length=1024), LIMIT)


def test_data_header_must_be_complete_and_sealed() -> None:
    with pytest.raises(wire.ProtocolError, match="40"):
        wire.parse_data_header(data_header()[:39], LIMIT)
    with pytest.raises(wire.ProtocolError, match="header checksum"):
        wire.parse_data_header(data_header()[:-1] + b"\0", LIMIT)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\0\0\0\0\0\0\0\0\0", "magic"),
        (hello(version=9), "version"),
        (hello(kind=wire.FRAME_DATA), "unexpected DATA"),
        (hello(flags=2), "flags"),
        (hello(count=0), "count"),
        (hello(count=33), "count"),
        (hello(index=4, count=4), "index"),
        (hello()[:-4] + b"\0\0\0\0", "header checksum"),
        (b"DWCP\x03\x01\x00\x00", "bytes"),
    ],
)
def test_malformed_handshakes_are_rejected(raw: bytes, match: str) -> None:
    with pytest.raises(wire.ProtocolError, match=match):
        wire.parse_handshake(raw)


def test_malformed_answers_are_rejected() -> None:
    with pytest.raises(wire.ProtocolError, match="magic"):
        wire.parse_welcome(b"XXXX\x02\x02\x00\x00" + bytes(8))
    with pytest.raises(wire.ProtocolError, match="unexpected DATA"):
        wire.parse_ack(data_header()[:20])
    with pytest.raises(wire.ProtocolError, match="flags"):
        wire.parse_ack(seal(wire.ACK.pack(wire.MAGIC, wire.VERSION, wire.FRAME_ACK, 1, 0, 0)))


# -- the document ---------------------------------------------------------------------------


def doc_examples() -> list[bytes]:
    """Every ```hex block of docs/wire-format.md, in order, plus inline examples."""
    text = DOC.read_text()
    blocks = re.findall(r"```hex\n(.*?)```", text, flags=re.DOTALL)
    inline = re.findall(r"Example[^`\n]*: `([0-9a-f ]+)`", text)
    return [bytes.fromhex(block) for block in blocks + inline]


def test_document_examples_parse() -> None:
    hello_frame, single, chunk0, chunk1, welcome, ack, ping = doc_examples()
    assert wire.parse_handshake(hello_frame) == wire.Handshake(
        SESSION, 1, 4, True, 5000, bytes(range(16, 32)), 100
    )
    header = wire.parse_data_header(single[: wire.DATA_HEADER.size], LIMIT)
    assert (header.message_id, header.total_length) == (7, 5)
    verify_checksum(header, single[wire.DATA_HEADER.size :])
    assert single == encode_message(7, b"hello", 262144)[0]
    frames = encode_message(9, b"a" * 1500, 1024)
    assert [chunk0, chunk1] == [frame[: wire.DATA_HEADER.size] for frame in frames]
    assert wire.parse_welcome(welcome) == wire.STATUS_ACCEPTED
    assert wire.parse_ack(ack) == 7
    assert wire.parse_ping(ping) == 42


def test_document_sizes_match_the_structs() -> None:
    text = DOC.read_text()
    documented = {
        name: int(size)
        for name, size in re.findall(
            r"^## (\w+)(?: and \w+)? \(.*?\), (\d+)[- ]byte", text, flags=re.MULTILINE
        )
    }
    assert documented == {
        "HELLO": wire.HANDSHAKE.size,
        "WELCOME": wire.WELCOME.size,
        "DATA": wire.DATA_HEADER.size,
        "ACK": wire.ACK.size,
        "PING": wire.PING.size,
    }
    assert struct.calcsize("!4sBBH") == wire.PREFIX.size == 8  # the common prefix
    assert "version 3" in text and wire.VERSION == 3
    assert f"1 <= N <= {wire.MAX_STREAMS}" in text
    assert f"{wire.MIN_CHUNK_SIZE} <= chunk_size" in text
    assert "9a 71 bb 4c" in text and wire.checksum_of(b"hello") == 0x9A71BB4C
    assert wire.checksum_of(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert wire.ID_WINDOW == 2**24 and "2^24 ahead\n   is refused" in text
