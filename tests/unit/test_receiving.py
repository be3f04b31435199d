"""The receiver's protocol core fed bytes: the stream parser and the ACK policy (no sockets)."""

from __future__ import annotations

import pytest

from dwcp.transport import wire
from dwcp.transport._reassembly import FrameTuple, Reassembly
from dwcp.transport._receiving import (
    ACK_DELAY,
    ACK_EVERY,
    LARGE,
    AckPolicy,
    StreamParser,
    alive_due,
    read_tick,
    stall_due,
)
from dwcp.transport.wire import ProtocolError

LIMIT = wire.DEFAULT_MAX_MESSAGE_SIZE


def seal(packed: bytes) -> bytes:
    return packed[:-4] + wire.checksum_of(packed[:-4]).to_bytes(4, "big")


def data(mid: int, payload: bytes, *, ack_now: bool = False) -> bytes:
    return wire.pack_data_header(mid, 0, 1, len(payload), payload, ack_now=ack_now) + payload


def damaged(kind: str) -> bytes:
    good = data(2, b"two")
    if kind == "header-checksum":
        return good[:36] + bytes([good[36] ^ 0x01]) + good[37:]
    if kind == "payload-checksum":
        return good[:-1] + b"X"
    assert kind == "unknown-type"
    return seal(good[:5] + b"\x09" + good[6:40]) + good[40:]


def parse_all(raw: bytes, parser: StreamParser | None = None) -> tuple[list[FrameTuple], int]:
    parser = parser or StreamParser(LIMIT)
    frames: list[FrameTuple] = []
    return frames, parser.parse(bytearray(raw), 0, len(raw), frames)


# -- the stream parser -------------------------------------------------------------------------


def test_whole_frames_are_parsed_and_a_cut_one_waits() -> None:
    raw = data(0, b"zero") + data(1, b"one")
    frames, used = parse_all(raw + data(2, b"two")[:-1])
    assert used == len(raw)
    assert [(f[0], f[4]) for f in frames] == [(0, b"zero"), (1, b"one")]


@pytest.mark.parametrize("kind", ["header-checksum", "payload-checksum", "unknown-type"])
def test_frames_before_a_bad_one_are_kept_and_delivered(kind: str) -> None:
    """wire-format.md, Closing: messages already whole and in order are still delivered."""
    frames: list[FrameTuple] = []
    raw = data(0, b"zero") + data(1, b"one") + damaged(kind)
    with pytest.raises(ProtocolError):
        StreamParser(LIMIT).parse(bytearray(raw), 0, len(raw), frames)
    assert [f[4] for f in frames] == [b"zero", b"one"]
    # The session then closes draining: what those frames completed is delivered.
    reassembly = Reassembly(1, max_buffered=1 << 20)
    assert reassembly.push(0, frames) == 2
    reassembly.close(drain=True)
    batch = reassembly.take(0)
    assert batch is not None and [m[1] for m in batch] == [b"zero", b"one"]
    assert reassembly.take(0) is None


@pytest.mark.parametrize(
    ("prefix", "match"),
    [
        (b"DWCQ\x03\x03\x00\x00", "bad magic"),
        (b"DWCP\x02\x03\x00\x00", "unsupported version 2"),
        (b"DWCP\x03\x03\x00\x04", "unknown DATA flags 0x0004"),
        (b"DWCP\x03\x03\x80\x00", "unknown DATA flags 0x8000"),
        (b"DWCP\x03\x05\x00\x01", "unknown PING flags 0x0001"),
        (b"DWCP\x03\x04\x00\x00", "unexpected ACK frame"),
        (b"DWCP\x03\x01\x00\x00", "unexpected HELLO frame"),
        (b"DWCP\x03\x09\x00\x00", "unknown frame type 0x09"),
    ],
)
def test_a_bad_prefix_is_refused_at_8_bytes(prefix: bytes, match: str) -> None:
    """wire-format.md, Conventions: the prefix is checked as soon as its 8 bytes are in."""
    with pytest.raises(ProtocolError, match=match):
        parse_all(prefix)
    with pytest.raises(ProtocolError, match=match):
        parse_all(data(0, b"zero") + prefix)


def test_pings_are_collected_with_their_tokens() -> None:
    parser = StreamParser(LIMIT)
    frames, _ = parse_all(wire.pack_ping(7) + data(0, b"a") + wire.pack_ping(8), parser)
    assert parser.pings == [7, 8] and [f[4] for f in frames] == [b"a"]


def test_ack_now_is_the_highest_flagged_id() -> None:
    parser = StreamParser(LIMIT)
    parse_all(data(0, b"a") + data(1, b"b", ack_now=True) + data(2, b"c"), parser)
    assert parser.ack_now == 1


def test_a_large_payload_not_all_in_is_left_to_the_caller() -> None:
    payload = bytes(LARGE)
    raw = data(0, b"a") + data(1, payload)
    parser = StreamParser(LIMIT)
    frames, used = parse_all(raw[:-1], parser)
    assert [f[0] for f in frames] == [0]
    assert parser.large is not None and parser.large.frame[0] == 1
    assert used == len(data(0, b"a")) + wire.DATA_HEADER.size  # after its header


# -- the ACK policy ----------------------------------------------------------------------------


def test_one_ack_never_covers_more_than_128_messages() -> None:
    """wire-format.md, ACK: under load one ACK covers up to 128 messages."""
    policy = AckPolicy()
    covered: list[int] = []
    mid = -1
    # Batches of every size the delivery thread may take, unacknowledged ones left over
    # between them (the delay never passes: time stands still).
    for size in [63, 64, 64, 1, 200, 127, 5, 300]:
        left = size
        while left:
            count = min(64, policy.room(), left)
            mid += count
            left -= count
            if policy.delivered(count, mid, 0, -1, 0.0):
                covered.append(policy.unacked)
                policy.acked()
    assert covered and max(covered) == ACK_EVERY == 128
    assert not policy.due(ACK_DELAY / 2) and policy.due(ACK_DELAY)


def test_ack_now_is_acknowledged_when_its_message_is_delivered() -> None:
    policy = AckPolicy()
    assert not policy.delivered(3, 2, 0, ack_now=5, now=0.0)
    assert policy.delivered(3, 5, 1, ack_now=5, now=0.0)
    assert (policy.through, policy.stream) == (5, 1)
    policy.acked()
    assert policy.wait(0.0) is None  # nothing unacknowledged: no deadline
    assert not policy.delivered(1, 6, 0, ack_now=5, now=1.0)
    assert policy.wait(1.0) == pytest.approx(ACK_DELAY)


def test_a_reader_whose_bytes_keep_arriving_says_alive_twice_per_keepalive_interval() -> None:
    assert not alive_due(now=10.0, said=9.0, heartbeat=None)  # the sender keeps no keepalive
    assert not alive_due(now=10.0, said=9.0, heartbeat=5.0)
    assert alive_due(now=11.5, said=9.0, heartbeat=5.0)  # half an interval since the last PONG
    assert alive_due(now=10.0, said=9.0, heartbeat=2.0)


def test_a_blocking_read_waits_a_quarter_of_the_shortest_bound_the_interval_among_them() -> None:
    assert read_tick(30.0, 60.0, None) == 7.5
    assert read_tick(30.0, None, None) == 7.5  # no idle timeout
    assert read_tick(30.0, 60.0, 1.0) == 0.25  # bytes trickling in: a PONG may be due
    assert read_tick(0.4, 60.0, 1.0) == 0.1


def test_a_reader_whose_consumer_falls_behind_says_it_is_alive_at_once() -> None:
    """A reader that starts waiting for budget room PONGs at once (a sender closing meanwhile
    waits for the consumer), but not more than eight times a keepalive interval however often
    the budget fills; never without a sender keepalive."""
    assert stall_due(10.0, float("-inf"), 5.0)  # no PONG yet on the stream: at once
    assert not stall_due(10.0, 9.5, 5.0)  # one went 0.5 s ago: under 5 / 8
    assert stall_due(10.0, 10.0 - 5.0 / 8, 5.0)
    assert not stall_due(10.0, float("-inf"), None)
