"""Wire format v2: round trips of every frame, every single-bit error caught, the field rules.

The pure parsers are checked bit by bit; a real ``MultiStreamReceiver`` on loopback is then
fed damaged DATA frames through raw sockets, to show its own fast path catches them too.
"""

from __future__ import annotations

import os
import random
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dwcp._errors import TransportError
from dwcp.transport import MultiStreamReceiver, MultiStreamTCPTransport, _handing, _receiving, wire
from dwcp.transport.wire import ProtocolError
from tests._frames import encode_message, verify_checksum
from tests.conftest import Inbox, ReceiverFactory, closed_by_peer, wait_until

LIMIT = wire.DEFAULT_MAX_MESSAGE_SIZE
MIN = wire.MIN_CHUNK_SIZE
HEADER = wire.DATA_HEADER.size
SESSION = bytes(range(16))
STATUSES = [wire.STATUS_ACCEPTED, wire.STATUS_BUSY, wire.STATUS_REFUSED]
U32, U64 = 2**32 - 1, 2**64 - 1


def seal(packed: bytes) -> bytes:
    """Fill in the header CRC (the last 4 bytes) of a hand-packed frame."""
    return packed[:-4] + wire.checksum_of(packed[:-4]).to_bytes(4, "big")


def flip(frame: bytes, bit: int) -> bytes:
    """``frame`` with bit ``bit`` (0 = the most significant bit of byte 0) inverted."""
    damaged = bytearray(frame)
    damaged[bit // 8] ^= 0x80 >> (bit % 8)
    return bytes(damaged)


def parse_data_frame(frame: bytes) -> tuple[wire.DataHeader, bytes]:
    """What a receiver does with one DATA frame: verify the header, then the payload."""
    header = wire.parse_data_header(frame[:HEADER], LIMIT)
    payload = frame[HEADER:]
    verify_checksum(header, payload)
    return header, payload


def data_header(
    mid: int = 0,
    index: int = 0,
    count: int = 1,
    total: int = 5,
    length: int = 5,
    crc: int | None = None,
    flags: int = 0,
    payload: bytes = b"hello",
) -> bytes:
    """A sealed DATA header with any fields (the payload CRC of ``payload`` unless given)."""
    if crc is None:
        crc = 0 if flags & wire.FLAG_UNCHECKED else wire.checksum_of(payload)
    return seal(
        wire.DATA_HEADER.pack(
            wire.MAGIC, wire.VERSION, wire.FRAME_DATA, flags, mid, index, count, total, length,
            crc, 0,
        )
    )  # fmt: skip


# -- round trips ------------------------------------------------------------------------------


def test_frame_sizes() -> None:
    sizes = {
        wire.FRAME_HELLO: 60,
        wire.FRAME_WELCOME: 16,
        wire.FRAME_DATA: 40,
        wire.FRAME_ACK: 20,
        wire.FRAME_PING: 20,
        wire.FRAME_PONG: 20,
    }
    for frame_type, size in sizes.items():
        assert wire.frame_size(frame_type) == size
    assert len(wire.pack_handshake(SESSION, 0, 1, acknowledged=False)) == 60
    assert len(wire.pack_welcome(0)) == 16
    assert len(wire.pack_data_header(0, 0, 1, 0, b"")) == 40
    assert len(wire.pack_ack(0)) == len(wire.pack_ping(0)) == len(wire.pack_pong(0)) == 20


@given(
    session=st.binary(min_size=16, max_size=16),
    shape=st.integers(1, wire.MAX_STREAMS).flatmap(
        lambda count: st.tuples(st.integers(0, count - 1), st.just(count))
    ),
    acknowledged=st.booleans(),
    keepalive_ms=st.one_of(st.just(0), st.integers(0, U32)),
)
def test_hello_round_trip(
    session: bytes, shape: tuple[int, int], acknowledged: bool, keepalive_ms: int
) -> None:
    index, count = shape
    raw = wire.pack_handshake(
        session, index, count, acknowledged=acknowledged, keepalive_ms=keepalive_ms
    )
    assert wire.parse_prefix(raw) == (wire.FRAME_HELLO, int(acknowledged))
    assert wire.parse_handshake(raw) == wire.Handshake(
        session, index, count, acknowledged, keepalive_ms
    )


def test_hello_keepalive_defaults_to_zero() -> None:
    raw = wire.pack_handshake(SESSION, 1, 2, acknowledged=False)
    assert wire.parse_handshake(raw).keepalive_ms == 0
    assert wire.parse_handshake(bytearray(raw)) == wire.parse_handshake(memoryview(raw))


@given(status=st.one_of(st.sampled_from(STATUSES), st.integers(0, U32)))
def test_welcome_round_trip(status: int) -> None:
    raw = wire.pack_welcome(status)
    assert wire.parse_prefix(raw) == (wire.FRAME_WELCOME, 0)
    assert wire.parse_welcome(raw) == status


@given(value=st.integers(0, U64))
def test_ack_ping_pong_round_trip(value: int) -> None:
    assert wire.parse_ack(wire.pack_ack(value)) == value
    assert wire.parse_ping(wire.pack_ping(value)) == value
    assert wire.parse_ping(wire.pack_pong(value), wire.FRAME_PONG) == value
    assert wire.parse_prefix(wire.pack_ping(value))[0] == wire.FRAME_PING
    assert wire.parse_prefix(wire.pack_pong(value))[0] == wire.FRAME_PONG


@given(
    mid=st.integers(0, U64),
    payload=st.binary(max_size=2000),
    checksum=st.booleans(),
)
def test_single_chunk_data_header_round_trip(mid: int, payload: bytes, checksum: bool) -> None:
    raw = wire.pack_data_header(mid, 0, 1, len(payload), payload, checksum=checksum)
    crc = wire.checksum_of(payload) if checksum else 0
    flags = 0 if checksum else wire.FLAG_UNCHECKED
    assert wire.parse_prefix(raw) == (wire.FRAME_DATA, flags)
    header = wire.parse_data_header(raw, LIMIT)
    assert header == wire.DataHeader(mid, 0, 1, len(payload), len(payload), crc, checksum)
    verify_checksum(header, payload)


@settings(max_examples=60)
@given(
    mid=st.integers(0, U64),
    size=st.integers(0, 6 * MIN),
    chunk_size=st.integers(MIN, 2 * MIN),
    checksum=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_encode_message_round_trip(
    mid: int, size: int, chunk_size: int, checksum: bool, seed: int
) -> None:
    data = random.Random(seed).randbytes(size)
    frames = encode_message(mid, data, chunk_size, checksum=checksum)
    count = wire.chunk_count(size, chunk_size)
    assert len(frames) == count
    parts = {}
    for frame in frames:
        header, payload = parse_data_frame(frame)
        assert (header.message_id, header.chunk_count, header.total_length) == (mid, count, size)
        assert header.checked is checksum
        assert header.checksum == (wire.checksum_of(payload) if checksum else 0)
        assert header.payload_length == len(payload)
        assert header.chunk_index not in parts
        parts[header.chunk_index] = payload
    assert b"".join(parts[i] for i in range(count)) == data


# -- every single bit is protected -------------------------------------------------------------


def _data(mid: int, size: int, index: int, *, checksum: bool = True) -> bytes:
    data = random.Random(size).randbytes(size)
    return encode_message(mid, data, MIN, checksum=checksum)[index]


Parser = Callable[[bytes], object]
Connect = Callable[[tuple[str, int]], socket.socket]
RawReceiver = tuple[MultiStreamReceiver, Inbox]
SAMPLES: dict[str, tuple[bytes, Parser]] = {
    "hello": (
        wire.pack_handshake(SESSION, 2, 5, acknowledged=True, keepalive_ms=5000),
        wire.parse_handshake,
    ),
    "hello-plain": (wire.pack_handshake(bytes(16), 0, 1, acknowledged=False), wire.parse_handshake),
    "welcome-accepted": (wire.pack_welcome(wire.STATUS_ACCEPTED), wire.parse_welcome),
    "welcome-busy": (wire.pack_welcome(wire.STATUS_BUSY), wire.parse_welcome),
    "welcome-refused": (wire.pack_welcome(wire.STATUS_REFUSED), wire.parse_welcome),
    "ack": (wire.pack_ack(123_456_789), wire.parse_ack),
    "ack-0": (wire.pack_ack(0), wire.parse_ack),
    "ping": (wire.pack_ping(42), wire.parse_ping),
    "pong": (wire.pack_pong(42), lambda raw: wire.parse_ping(raw, wire.FRAME_PONG)),
    "pong-unprompted": (wire.pack_pong(0), lambda raw: wire.parse_ping(raw, wire.FRAME_PONG)),
    "data-single": (_data(7, 300, 0), parse_data_frame),
    "data-empty": (_data(8, 0, 0), parse_data_frame),
    "data-first-chunk": (_data(9, 2500, 0), parse_data_frame),
    "data-middle-chunk": (_data(9, 2500, 1), parse_data_frame),
    "data-last-chunk": (_data(9, 2500, 2), parse_data_frame),
}


@pytest.mark.parametrize("name", list(SAMPLES))
def test_every_bit_of_a_frame_is_protected(name: str) -> None:
    frame, parse = SAMPLES[name]
    parse(frame)  # intact, it parses
    for bit in range(len(frame) * 8):
        with pytest.raises(ProtocolError):
            parse(flip(frame, bit))


@pytest.mark.parametrize("index", [0, 1, 2])
def test_unchecked_data_protects_every_header_bit_and_no_payload_bit(index: int) -> None:
    frame = _data(9, 2500, index, checksum=False)
    parse_data_frame(frame)
    for bit in range(HEADER * 8):
        with pytest.raises(ProtocolError):
            parse_data_frame(flip(frame, bit))
    # The sender opted out: a payload bit is not caught (TLS or the application checks it).
    for bit in range(HEADER * 8, len(frame) * 8, 7):
        header, payload = parse_data_frame(flip(frame, bit))
        assert header.checked is False and payload != frame[HEADER:]


@pytest.mark.parametrize("checksum", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize(
    ("field", "at", "value"),
    [("message id", 8, 0), ("chunk index", 16, 0), ("total", 24, 2048), ("length", 28, 1024)],
)
def test_a_relabelled_chunk_keeping_its_old_header_crc_is_rejected(
    checksum: bool, field: str, at: int, value: int
) -> None:
    # Message 1's last chunk passed off as part of message 0 (or another chunk, or another
    # message size): the payload and its CRC are genuine, only the header CRC can tell.
    last = encode_message(1, bytes(2500), MIN, checksum=checksum)[-1]
    size = 8 if field == "message id" else 4
    relabelled = last[:at] + value.to_bytes(size, "big") + last[at + size :]
    assert relabelled != last
    with pytest.raises(ProtocolError, match="header checksum"):
        parse_data_frame(relabelled)


# -- the DATA field rules -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"flags": wire.FLAG_UNCHECKED, "crc": 1}, "non-zero checksum"),
        ({"flags": 0x0004}, "unknown frame flags"),
        ({"flags": 0x8001, "crc": 0}, "unknown frame flags"),
        ({"index": 1, "count": 1}, "chunk index 1 >= chunk count 1"),
        ({"index": 3, "count": 3, "total": 3000, "length": 952}, "chunk index 3 >= chunk count 3"),
        ({"count": 0}, "chunk index 0 >= chunk count 0"),
        ({"length": 4}, "not the whole message"),
        ({"total": 6, "length": 5}, "not the whole message"),
        ({"index": 0, "count": 2, "total": 2000, "length": MIN - 1}, "fewer than 1024"),
        ({"index": 1, "count": 3, "total": 3000, "length": 1}, "fewer than 1024"),
        ({"index": 1, "count": 2, "total": 1500, "length": 2000}, "longer than its message"),
        ({"index": 3, "count": 4, "total": 2048, "length": 0}, "4 chunks for a 2048-byte"),
        ({"index": 1, "count": 2, "total": MIN - 1, "length": 0}, "2 chunks for a 1023-byte"),
        ({"total": LIMIT + 1, "length": LIMIT + 1}, "exceeds limit"),
        ({"index": 0, "count": 2, "total": LIMIT + 1, "length": MIN}, "exceeds limit"),
    ],
)
def test_data_fields_that_disagree_are_rejected(fields: dict[str, int], match: str) -> None:
    values = {"flags": 0, "index": 0, "count": 1, "total": 5, "length": 5, "crc": 7}
    values.update(fields)
    with pytest.raises(ProtocolError, match=match):
        wire.check_data_fields(max_message_size=LIMIT, **values)
    # parse_data_header applies the same rules to a well-sealed header.
    with pytest.raises(ProtocolError, match=match):
        wire.parse_data_header(
            data_header(
                index=values["index"], count=values["count"], total=values["total"],
                length=values["length"], crc=values["crc"], flags=values["flags"],
            ),
            LIMIT,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("index", "count", "total", "length"),
    [
        (0, 1, 0, 0),
        (0, 1, LIMIT, LIMIT),  # exactly the limit
        (0, 2, 2048, MIN),
        (1, 2, 1025, 1),  # the last chunk may be short
        (2, 3, 2048, 0),  # ...even empty, while the count fits the bytes
        (1, 2, MIN, 0),
        (0, 3, 3000, 2000),  # chunks need not be equal
    ],
)
def test_data_fields_that_agree_are_accepted(
    index: int, count: int, total: int, length: int
) -> None:
    wire.check_data_fields(0, index, count, total, length, 123, LIMIT)
    wire.check_data_fields(wire.FLAG_UNCHECKED, index, count, total, length, 0, LIMIT)
    header = wire.parse_data_header(
        data_header(index=index, count=count, total=total, length=length, crc=5), LIMIT
    )
    assert (header.chunk_index, header.chunk_count, header.total_length) == (index, count, total)


def test_the_limit_is_the_callers() -> None:
    raw = data_header(total=100, length=100)
    assert wire.parse_data_header(raw, 100).total_length == 100
    with pytest.raises(ProtocolError, match="exceeds limit 99"):
        wire.parse_data_header(raw, 99)


# -- prefixes, types, lengths -------------------------------------------------------------------


def prefix(magic: bytes = wire.MAGIC, version: int = wire.VERSION, kind: int = 1) -> bytes:
    return wire.PREFIX.pack(magic, version, kind, 0)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (prefix(magic=b"DWCQ"), "bad magic"),
        (prefix(magic=b"\0\0\0\0"), "bad magic"),
        (b"GET / HT", "bad magic"),
        (prefix(version=1), "unsupported version 1"),  # a v1 peer
        (prefix(version=0), "unsupported version 0"),
        (prefix(version=2), "unsupported version 2"),  # a v2 peer
        (prefix(version=4), "unsupported version 4"),
        (prefix(kind=0x00), "unknown frame type 0x00"),
        (prefix(kind=0x07), "unknown frame type 0x07"),
        (prefix(kind=0xFF), "unknown frame type 0xff"),
    ],
)
def test_parse_prefix_rejects(raw: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        wire.parse_prefix(raw)
    with pytest.raises(ProtocolError, match=match):
        wire.parse_prefix(raw + bytes(40))  # only the first 8 bytes are looked at


def test_parse_prefix_accepts_every_frame_type() -> None:
    for kind in (1, 2, 3, 4, 5, 6):
        assert wire.parse_prefix(prefix(kind=kind)) == (kind, 0)
    assert wire.parse_prefix(wire.PREFIX.pack(wire.MAGIC, 3, 3, 0xBEEF)) == (3, 0xBEEF)


def test_a_v1_peer_is_refused_by_every_parser() -> None:
    for name, (frame, parse) in SAMPLES.items():
        old = frame[:4] + b"\x01" + frame[5:]
        with pytest.raises(ProtocolError, match="unsupported version 1"):
            parse(old)  # the prefix is checked first, whatever the CRC says
        with pytest.raises(ProtocolError, match="unsupported version 1"):
            parse(seal(old[:HEADER]) + old[HEADER:] if name.startswith("data") else seal(old))


def test_a_frame_of_another_type_is_refused() -> None:
    # ACK, PING and PONG share one layout; only the (protected) type byte tells them apart.
    control = {
        "hello": wire.pack_handshake(SESSION, 0, 1, acknowledged=False),
        "welcome": wire.pack_welcome(0),
        "ack": wire.pack_ack(5),
        "ping": wire.pack_ping(5),
        "pong": wire.pack_pong(5),
        "data": data_header(),
    }
    parsers: dict[str, Parser] = {
        "hello": wire.parse_handshake,
        "welcome": wire.parse_welcome,
        "ack": wire.parse_ack,
        "ping": wire.parse_ping,
        "pong": lambda raw: wire.parse_ping(raw, wire.FRAME_PONG),
        "data": lambda raw: wire.parse_data_header(raw, LIMIT),
    }
    for kind, parse in parsers.items():
        for other, raw in control.items():
            if other != kind:
                with pytest.raises(ProtocolError, match="unexpected"):
                    parse(raw)


@pytest.mark.parametrize("name", ["hello", "welcome-busy", "ack", "ping", "data-single"])
def test_a_frame_of_the_wrong_length_is_refused(name: str) -> None:
    frame, parse = SAMPLES[name]
    header = frame[:HEADER] if name.startswith("data") else frame
    for raw in (header[:-1], header + b"\0"):
        with pytest.raises(ProtocolError):
            if name.startswith("data"):
                wire.parse_data_header(raw, LIMIT)
            else:
                parse(raw)


@pytest.mark.parametrize(
    ("flags", "index", "count", "match"),
    [
        (0x0002, 0, 1, "unknown handshake flags"),
        (0, 0, 0, "stream count 0"),
        (0, 0, wire.MAX_STREAMS + 1, "stream count 33"),
        (0, 4, 4, "stream index 4 >= stream count 4"),
    ],
)
def test_a_sealed_but_invalid_hello_is_refused(
    flags: int, index: int, count: int, match: str
) -> None:
    fields = (wire.MAGIC, wire.VERSION, wire.FRAME_HELLO, flags, SESSION, bytes(16), 0)
    raw = seal(wire.HANDSHAKE.pack(*fields, index, count, 0, 0))
    with pytest.raises(ProtocolError, match=match):
        wire.parse_handshake(raw)


@pytest.mark.parametrize(
    ("raw", "parse"),
    [
        (seal(wire.WELCOME.pack(wire.MAGIC, wire.VERSION, wire.FRAME_WELCOME, 1, 0, 0)), "welcome"),
        (seal(wire.ACK.pack(wire.MAGIC, wire.VERSION, wire.FRAME_ACK, 1, 0, 0)), "ack"),
        (seal(wire.PING.pack(wire.MAGIC, wire.VERSION, wire.FRAME_PING, 1, 0, 0)), "ping"),
    ],
)
def test_control_frames_with_flags_are_refused(raw: bytes, parse: str) -> None:
    parser = {"welcome": wire.parse_welcome, "ack": wire.parse_ack, "ping": wire.parse_ping}
    with pytest.raises(ProtocolError, match="flags"):
        parser[parse](raw)


# -- the receiver itself -------------------------------------------------------------------------


def join_session(receiver_address: tuple[str, int], connect: Connect) -> socket.socket:
    """A raw stream 0 of a fresh one-stream session, past HELLO and WELCOME."""
    sock = connect(receiver_address)
    sock.sendall(wire.pack_handshake(os.urandom(16), 0, 1, acknowledged=False))
    welcome = sock.recv(wire.WELCOME.size, socket.MSG_WAITALL)
    assert wire.parse_welcome(welcome) == wire.STATUS_ACCEPTED
    return sock


def send_split(sock: socket.socket, frame: bytes, at: int | None) -> None:
    """Send ``frame``; with ``at``, its first ``at`` bytes first, so they arrive alone."""
    if at is None:
        sock.sendall(frame)
        return
    sock.sendall(frame[:at])
    wait_until(lambda: _peer_has_read_all(sock), 2.0)
    sock.sendall(frame[at:])


def _peer_has_read_all(sock: socket.socket) -> bool:
    """Whether the receiving end of ``sock`` has read everything sent so far (its receive
    queue in /proc/net/tcp is empty); True where that cannot be seen."""
    ours = f"{sock.getsockname()[1]:04X}"
    theirs = f"{sock.getpeername()[1]:04X}"
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return True
    for line in lines:
        fields = line.split()
        if fields[1].endswith(":" + theirs) and fields[2].endswith(":" + ours):
            return int(fields[4].split(":")[1], 16) == 0
    return True


SMALL = b"".join(encode_message(0, random.Random(1).randbytes(200), MIN))
LARGE = b"".join(encode_message(0, random.Random(2).randbytes(64 * 1024), 1 << 20))
SMALL_BITS = [byte * 8 + byte % 8 for byte in range(HEADER)] + [
    bit for bit in range(HEADER * 8, len(SMALL) * 8, 131)
]
LARGE_BITS = [HEADER * 8, HEADER * 8 + 32 * 1024 * 8 + 3, len(LARGE) * 8 - 1]


@pytest.fixture
def raw_receiver(receiver_factory: ReceiverFactory) -> RawReceiver:
    # A long idle timeout: a damaged frame must close the connection at once, not by idling.
    return receiver_factory(max_sessions=128, idle_timeout=60.0)


@pytest.mark.parametrize(
    ("frame", "split"), [(SMALL, None), (LARGE, HEADER)], ids=["small", "large"]
)
def test_the_receiver_delivers_an_intact_frame(
    raw_receiver: RawReceiver, raw_connections: Connect, frame: bytes, split: int | None
) -> None:
    receiver, inbox = raw_receiver
    sock = join_session(receiver.address, raw_connections)
    send_split(sock, frame, split)
    assert receiver.wait_delivered(1, 5.0)
    assert inbox.messages == [frame[HEADER:]]


@pytest.mark.parametrize(
    ("frame", "split", "bits"),
    [(SMALL, None, SMALL_BITS), (LARGE, HEADER, LARGE_BITS)],
    ids=["small", "large-read-in-pieces"],
)
def test_the_receiver_closes_on_any_flipped_bit_and_delivers_nothing(
    raw_receiver: RawReceiver,
    raw_connections: Connect,
    frame: bytes,
    split: int | None,
    bits: list[int],
) -> None:
    receiver, inbox = raw_receiver
    kept_open = []
    for bit in bits:
        sock = join_session(receiver.address, raw_connections)
        send_split(sock, flip(frame, bit), split)
        if not closed_by_peer(sock, 3.0):
            kept_open.append(bit)
        sock.close()
    # Once every session is forgotten, its delivery is over: nothing can still arrive.
    wait_until(lambda: receiver.session_count == 0)
    assert kept_open == [], f"bits {kept_open} did not close the connection"
    assert inbox.messages == [] and receiver.delivered_count == 0


def test_the_receiver_answers_ping_and_closes_on_a_damaged_one(
    raw_receiver: RawReceiver, raw_connections: Connect
) -> None:
    receiver, _ = raw_receiver
    sock = join_session(receiver.address, raw_connections)
    sock.sendall(wire.pack_ping(77))
    assert wire.parse_ping(sock.recv(wire.PING.size, socket.MSG_WAITALL), wire.FRAME_PONG) == 77
    for bit in (0, 37, 40, 100, 159):
        sock = join_session(receiver.address, raw_connections)
        sock.sendall(flip(wire.pack_ping(77), bit))
        assert closed_by_peer(sock, 3.0), f"bit {bit}"


@pytest.mark.parametrize("shape", ["one-large-frame", "small-frames"])
def test_while_a_streams_bytes_keep_arriving_its_reader_says_it_is_alive_unprompted(
    raw_receiver: RawReceiver, raw_connections: Connect, shape: str
) -> None:
    """wire-format.md, Keepalive: while a stream's bytes keep arriving, its reader writes an
    unprompted PONG (token 0) on it twice per keepalive interval, so a PING waiting behind
    them on a slow link is answered before it is read."""
    receiver, inbox = raw_receiver
    interval = 0.4  # the sender's keepalive, from its HELLO: a PONG per 0.2 s of arrivals
    sock = raw_connections(receiver.address)
    sock.settimeout(10.0)
    sock.sendall(
        wire.pack_handshake(
            os.urandom(16), 0, 1, acknowledged=False, keepalive_ms=int(interval * 1000)
        )
    )
    assert wire.parse_welcome(sock.recv(wire.WELCOME.size, socket.MSG_WAITALL)) == 0
    pace = threading.Event()  # never set: its wait paces the trickle, a slow link
    if shape == "one-large-frame":  # read straight into its payload (the large path)
        payload = os.urandom(64 * 1024)
        sock.sendall(wire.pack_data_header(0, 0, 1, len(payload), payload))
        pieces = [payload[i : i + 1024] for i in range(0, len(payload), 1024)]
    else:
        pieces = [
            wire.pack_data_header(mid, 0, 1, 100, b"%0100d" % mid) + b"%0100d" % mid
            for mid in range(40)
        ]
    for piece in pieces:  # 2-3 s of trickle: about 5 intervals, and no PING at all
        sock.sendall(piece)
        pace.wait(0.05)
    assert receiver.wait_delivered(1 if shape == "one-large-frame" else 40, 10.0)
    pongs: list[int] = []
    while len(pongs) < 3:  # bounded: each recv returns or times out (10 s)
        answer = sock.recv(wire.PING.size, socket.MSG_WAITALL)
        assert len(answer) == wire.PING.size, f"connection closed after {len(pongs)} PONGs"
        pongs.append(wire.parse_ping(answer, wire.FRAME_PONG))
    assert pongs == [0, 0, 0]
    assert len(inbox.messages) == (1 if shape == "one-large-frame" else 40)


def test_the_receiver_refuses_a_single_chunk_frame_with_a_nonzero_index(
    raw_receiver: RawReceiver, raw_connections: Connect
) -> None:
    # Chunk 1 of 1: header and payload CRCs valid, but check_data_fields forbids it.
    receiver, inbox = raw_receiver
    sock = join_session(receiver.address, raw_connections)
    sock.sendall(data_header(index=1, count=1) + b"hello")
    assert closed_by_peer(sock, 3.0)
    wait_until(lambda: receiver.session_count == 0)  # its delivery is over
    assert inbox.messages == [] and receiver.delivered_count == 0


# -- the sender against a scripted receiver -----------------------------------------------------


class ScriptedReceiver:
    """A hand-written receiver: each accepted connection is welcomed, then ``script`` runs
    on it (one script per connection, in order) on this object's thread."""

    def __init__(self, scripts: list[Callable[[socket.socket], None]]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.connections: list[socket.socket] = []
        self.errors: list[BaseException] = []
        self._scripts = scripts
        self._thread = threading.Thread(target=self._run, name="scripted-receiver")
        self._thread.start()

    def _run(self) -> None:
        try:
            self.listener.settimeout(10.0)
            for script in self._scripts:
                conn, _ = self.listener.accept()
                conn.settimeout(10.0)
                self.connections.append(conn)
                wire.parse_handshake(conn.recv(wire.HANDSHAKE.size, socket.MSG_WAITALL))
                conn.sendall(wire.pack_welcome(wire.STATUS_ACCEPTED))
                script(conn)
        except BaseException as exc:  # noqa: BLE001 - reported by close()
            self.errors.append(exc)

    def close(self) -> None:
        self._thread.join(15.0)
        self.listener.close()
        for conn in self.connections:
            conn.close()
        assert not self.errors, self.errors


def read_data(conn: socket.socket) -> int:
    """Read one DATA frame; return its message id."""
    header = wire.parse_data_header(conn.recv(HEADER, socket.MSG_WAITALL), LIMIT)
    if header.payload_length:
        conn.recv(header.payload_length, socket.MSG_WAITALL)
    return header.message_id


def test_a_pong_with_a_token_never_sent_is_accepted() -> None:
    """wire-format.md, Keepalive: the sender does not compare a PONG's token with its PINGs'."""

    def script(conn: socket.socket) -> None:
        assert read_data(conn) == 0
        conn.sendall(
            wire.pack_pong(0xDEAD_BEEF) + wire.pack_ack(0)
        )  # this PONG's token: never sent

    peer = ScriptedReceiver([script])
    transport = MultiStreamTCPTransport(peer.address, streams=1, acknowledged=True)
    try:
        transport.start()
        transport.send(b"x", wait=True)  # its ACK came after the PONG, on the same stream
        transport.health_check()
    finally:
        transport.close()
        peer.close()


def test_after_a_reconnect_an_ack_below_the_first_id_ends_the_session() -> None:
    """wire-format.md, ACK: the range check comes before "at or below one already received
    is ignored": an ACK below the new session's first id is a protocol error."""
    second_ready = threading.Event()

    def first(conn: socket.socket) -> None:
        assert read_data(conn) == 0
        conn.sendall(wire.pack_ack(0))

    def second(conn: socket.socket) -> None:
        second_ready.wait(10.0)
        conn.sendall(wire.pack_ack(0))  # covered by the first session's ACK already

    peer = ScriptedReceiver([first, second])
    transport = MultiStreamTCPTransport(peer.address, streams=1, acknowledged=True)
    try:
        transport.start()
        transport.send(b"x", wait=True)
        transport.close()
        transport.start()  # first id 1
        second_ready.set()

        def broken() -> bool:
            try:
                transport.health_check()
            except TransportError as exc:
                return "outside the session" in str(exc)
            return False

        wait_until(broken, 10.0)
    finally:
        transport.close()
        peer.close()


def test_the_sender_flags_every_chunk_of_a_wait_true_message_ack_now() -> None:
    """wire-format.md, DATA: ACK_NOW is on every chunk of a message sent with wait=True."""
    flags: list[int] = []

    def script(conn: socket.socket) -> None:
        for _ in range(3):
            header = conn.recv(HEADER, socket.MSG_WAITALL)
            flags.append(wire.parse_prefix(header)[1])
            conn.recv(wire.parse_data_header(header, LIMIT).payload_length, socket.MSG_WAITALL)
        conn.sendall(wire.pack_ack(0))

    peer = ScriptedReceiver([script])
    transport = MultiStreamTCPTransport(peer.address, streams=1, acknowledged=True, chunk_size=1024)
    try:
        transport.start()
        transport.send(bytes(2500), wait=True)  # three chunks
    finally:
        transport.close()
        peer.close()
    assert flags == [wire.FLAG_ACK_NOW] * 3


@pytest.mark.parametrize(
    ("streams", "chunk_size", "size", "chunks"),
    [
        (1, None, 3 << 20, [(0, 3 << 20)]),  # one stream, the default: whole
        (1, 1 << 20, 3 << 20, [(0, 1 << 20)] * 3),  # one stream, a chunk_size given: cut
        (2, None, 600 << 10, [(0, 256 << 10), (1, 256 << 10), (0, 88 << 10)]),  # 256 KiB
    ],
)
def test_chunk_size_by_default_cuts_messages_over_several_streams_and_none_on_one(
    streams: int, chunk_size: int | None, size: int, chunks: list[tuple[int, int]]
) -> None:
    """README (``chunk_size``): the default is 256 KiB over several streams; with one stream
    the default sends each message whole, as one chunk. ``chunks``: (stream, payload length)
    of each chunk in index order."""
    peer = ScriptedReceiver([lambda conn: None] * streams)  # welcomed; read below
    transport = MultiStreamTCPTransport(peer.address, streams=streams, chunk_size=chunk_size)
    try:
        transport.start()
        transport.send(bytes(size))
        seen: list[tuple[int, int, int]] = []  # (index, stream, payload length)
        for stream, conn in enumerate(peer.connections):
            for _ in range(sum(1 for on, _ in chunks if on == stream)):
                header = wire.parse_data_header(conn.recv(HEADER, socket.MSG_WAITALL), LIMIT)
                assert (header.chunk_count, header.total_length) == (len(chunks), size)
                left = header.payload_length
                while left:  # a socket with a timeout returns what is there, WAITALL or not
                    got = len(conn.recv(min(left, 1 << 20)))
                    assert got, "connection closed inside a payload"
                    left -= got
                seen.append((header.chunk_index, stream, header.payload_length))
        assert [(on, length) for _, on, length in sorted(seen)] == chunks
    finally:
        transport.close()
        peer.close()


def test_the_receiver_acts_on_ack_now_in_any_chunk(
    raw_receiver: RawReceiver, raw_connections: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    """wire-format.md, DATA: the receiver acknowledges at once a message any chunk of which
    carried ACK_NOW (here only its last one)."""
    monkeypatch.setattr(_receiving, "ACK_DELAY", 3600.0)  # only ACK_NOW triggers an ACK
    receiver, inbox = raw_receiver
    sock = raw_connections(receiver.address)
    sock.sendall(wire.pack_handshake(os.urandom(16), 0, 1, acknowledged=True))
    assert wire.parse_welcome(sock.recv(wire.WELCOME.size, socket.MSG_WAITALL)) == 0
    data = bytes(2048)
    first = wire.pack_data_header(0, 0, 2, 2048, data[:1024]) + data[:1024]
    last = wire.pack_data_header(0, 1, 2, 2048, data[1024:], ack_now=True) + data[1024:]
    sock.sendall(first + last)
    sock.settimeout(10.0)
    assert wire.parse_ack(sock.recv(wire.ACK.size, socket.MSG_WAITALL)) == 0
    assert inbox.messages == [data]


def _answers(sock: socket.socket) -> dict[int, bytes]:
    """The next two 20-byte frames from the receiver, by type (bounded by the timeout)."""
    got = b""
    while len(got) < 2 * wire.ACK.size:
        part = sock.recv(2 * wire.ACK.size - len(got))
        assert part, f"connection closed after {got.hex()}"
        got += part
    return {wire.parse_prefix(got[i : i + 20])[0]: got[i : i + 20] for i in (0, 20)}


def test_a_ping_asks_for_the_ack_of_what_its_stream_carried_before_it(
    receiver_factory: ReceiverFactory, raw_connections: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    """wire-format.md, "A PING asks for an ACK": in an acknowledged session the receiver
    answers a PING with its PONG and acknowledges what the stream carried before it as soon
    as that is delivered (at once if it is already), not after its ACK delay."""
    monkeypatch.setattr(_receiving, "ACK_DELAY", 3600.0)  # only the PING triggers an ACK
    monkeypatch.setattr(_handing, "_SLOW", 3600.0)  # (not a slow consumer's ACK either)
    # Nor a reader's tick of silence (a quarter of the shortest of these), which wakes
    # delivery too.
    receiver, inbox = receiver_factory(idle_timeout=None, frame_timeout=3600.0)
    sock = raw_connections(receiver.address)
    sock.settimeout(10.0)
    sock.sendall(wire.pack_handshake(os.urandom(16), 0, 1, acknowledged=True))
    assert wire.parse_welcome(sock.recv(wire.WELCOME.size, socket.MSG_WAITALL)) == 0

    def data(mid: int) -> bytes:
        return wire.pack_data_header(mid, 0, 1, 2, b"m%d" % mid) + b"m%d" % mid

    # Not delivered yet when the PING is read (it comes in the same write).
    sock.sendall(data(0) + data(1) + wire.pack_ping(7))
    frames = _answers(sock)
    assert wire.parse_ping(frames[wire.FRAME_PONG], wire.FRAME_PONG) == 7
    assert wire.parse_ack(frames[wire.FRAME_ACK]) == 1
    # Delivered already, its ACK an hour away, when the PING comes.
    sock.sendall(data(2))
    assert receiver.wait_delivered(3, 10.0)
    sock.sendall(wire.pack_ping(8))
    frames = _answers(sock)
    assert wire.parse_ping(frames[wire.FRAME_PONG], wire.FRAME_PONG) == 8
    assert wire.parse_ack(frames[wire.FRAME_ACK]) == 2
    assert inbox.messages == [b"m0", b"m1", b"m2"]
