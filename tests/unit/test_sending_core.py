"""The sender's protocol core fed frames and times: what an ACK or PONG means, the striping
of a message over the streams, the DATA headers, and the keepalive's decisions (no sockets,
no threads, no clock)."""

from __future__ import annotations

import random

import pytest

from dwcp.transport import wire
from dwcp.transport._sending import (
    ACK_TIMEOUT_REASON,
    ANSWER_SIZE,
    HEADER_SIZE,
    Keepalive,
    Lazy,
    ack_overdue,
    built,
    bytes_moved,
    keepalive_tick,
    next_tick,
    read_answer,
    stalled,
    stripes,
    stripes_by_load,
)
from dwcp.transport._window import Window
from dwcp.transport.wire import ProtocolError

LIMIT = wire.DEFAULT_MAX_MESSAGE_SIZE


def answer(
    frame: bytes, *, acknowledged: bool = True, first: int = 0, next_id: int = 10
) -> int | None:
    return read_answer(frame, acknowledged=acknowledged, first_id=first, next_id=next_id)


# -- what the receiver says: ACK and PONG ---------------------------------------------------


def test_a_pong_says_the_receiver_is_alive_and_confirms_nothing() -> None:
    assert answer(wire.pack_pong(1234)) is None
    assert answer(wire.pack_pong(1234), acknowledged=False) is None


def test_an_ack_confirms_through_the_id_it_names() -> None:
    assert answer(wire.pack_ack(0)) == 0
    assert answer(wire.pack_ack(9)) == 9
    assert answer(wire.pack_ack(12), first=12, next_id=13) == 12


@pytest.mark.parametrize("through", [10, 11, 1 << 40])
def test_an_ack_of_ids_never_sent_is_a_protocol_error(through: int) -> None:
    with pytest.raises(ProtocolError, match=f"ACK through message {through}, outside"):
        answer(wire.pack_ack(through), next_id=10)


def test_after_a_reconnect_an_ack_below_the_sessions_first_id_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="outside the session's 5..7"):
        answer(wire.pack_ack(4), first=5, next_id=8)


def test_an_ack_before_anything_was_sent_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="outside"):
        answer(wire.pack_ack(0), first=0, next_id=0)


def test_an_ack_in_an_unacknowledged_session_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="ACK in an unacknowledged session"):
        answer(wire.pack_ack(0), acknowledged=False)


def test_a_frame_the_receiver_never_sends_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="unexpected frame type 0x05"):
        answer(wire.pack_ping(1))


def test_a_damaged_answer_is_a_protocol_error() -> None:
    frame = bytearray(wire.pack_ack(3))
    frame[12] ^= 0x01  # inside the id: the header CRC no longer matches
    assert len(frame) == ANSWER_SIZE
    with pytest.raises(ProtocolError):
        answer(bytes(frame))


def test_an_ack_frees_the_window_through_the_id_it_names() -> None:
    window = Window(max_messages=3, max_bytes=1 << 20)
    for message_id in range(3):
        assert window.fits(100)
        window.add(message_id, bytes(100))
    assert not window.fits(100) and window.pending == 3
    through = answer(wire.pack_ack(1), next_id=3)
    assert through == 1
    assert window.ack(through) == 2
    assert window.pending == 1 and window.fits(100)
    # Cumulative: an older ACK, or the same one again, frees nothing more.
    assert window.ack(0) == 0 and window.ack(1) == 0 and window.pending == 1


# -- frames and striping ------------------------------------------------------------------


def test_a_message_of_six_chunks_over_four_streams_starts_on_its_ids_stream() -> None:
    plan = stripes(message_id=5, chunks=6, count=4)
    assert [(lane, list(chunks)) for lane, chunks in plan] == [
        (1, [0, 4]),
        (2, [1, 5]),
        (3, [2]),
        (0, [3]),
    ]


def test_a_message_of_fewer_chunks_than_streams_takes_one_lane_per_chunk() -> None:
    plan = stripes(message_id=3, chunks=2, count=4)
    assert [(lane, list(chunks)) for lane, chunks in plan] == [(3, [0]), (0, [1])]


@pytest.mark.parametrize(("chunks", "count"), [(1, 1), (1, 4), (7, 3), (32, 32), (100, 5)])
def test_every_chunk_is_on_exactly_one_lane_and_each_lane_in_order(chunks: int, count: int) -> None:
    plan = stripes(message_id=11, chunks=chunks, count=count)
    carried = sorted(i for _, indexes in plan for i in indexes)
    assert carried == list(range(chunks))
    assert len({lane for lane, _ in plan}) == len(plan) == min(chunks, count)
    for _, indexes in plan:
        assert list(indexes) == sorted(indexes)


@pytest.mark.parametrize(("chunks", "count"), [(1, 1), (1, 4), (2, 4), (6, 4), (7, 3), (100, 5)])
def test_with_equal_loads_the_plan_by_load_is_the_fixed_striping(chunks: int, count: int) -> None:
    sizes = [256] * (chunks - 1) + [100]  # the last chunk is the short one
    plan = stripes_by_load(11, sizes, [4096] * count)
    fixed = stripes(message_id=11, chunks=chunks, count=count)
    assert plan == [(lane, list(indexes)) for lane, indexes in fixed]


def test_chunks_go_around_a_stream_with_bytes_still_waiting() -> None:
    # Issue 24: on a lossy path each cubic stream has its own rate, and a message is whole
    # only with its last chunk: fixed striping moved four streams at the slowest one's
    # pace (1 % loss, 1 MiB messages: four streams 3.3x one, iperf3's four 5.1x its one).
    plan = stripes_by_load(0, [256] * 4, [1024, 0, 0, 0])
    assert plan == [(1, [0, 3]), (2, [1]), (3, [2])]
    # A stream far behind gets nothing; one a little behind gets its turn later.
    plan = stripes_by_load(2, [256] * 6, [0, 10_000, 0, 300])
    assert plan == [(2, [0, 2, 5]), (0, [1, 3]), (3, [4])]


@pytest.mark.parametrize("seed", range(20))
def test_every_chunk_is_on_one_stream_and_each_streams_chunks_in_order(seed: int) -> None:
    rng = random.Random(seed)
    count = rng.randint(1, 32)
    sizes = [rng.randint(1, 1000) for _ in range(rng.randint(1, 100))]
    plan = stripes_by_load(rng.randrange(1 << 63), sizes, [rng.randint(0, 5000)] * count)
    carried = sorted(i for _, indexes in plan for i in indexes)
    assert carried == list(range(len(sizes)))
    assert len({lane for lane, _ in plan}) == len(plan) and all(
        0 <= lane < count for lane, _ in plan
    )
    for _, indexes in plan:
        assert indexes == sorted(indexes)


@pytest.mark.parametrize("checksum", [True, False])
def test_a_lazy_frame_is_the_header_the_receiver_parses(checksum: bool) -> None:
    payload = b"x" * 1500
    flags = (0 if checksum else wire.FLAG_UNCHECKED) | wire.FLAG_ACK_NOW
    frame = Lazy(flags, 7, 1, 3, 4000, payload, checksum)
    head, body = built([b"before", frame])[1:]
    assert body is payload and len(head) == HEADER_SIZE
    header = wire.parse_data_header(head, LIMIT)
    assert (header.message_id, header.chunk_index, header.chunk_count) == (7, 1, 3)
    assert (header.total_length, header.payload_length) == (4000, 1500)
    assert header.checked is checksum
    assert header.checksum == (wire.checksum_of(payload) if checksum else 0)
    assert wire.parse_prefix(head) == (wire.FRAME_DATA, flags)


# -- stalls and overdue acknowledgements --------------------------------------------------


def test_a_write_stalls_after_send_timeout_without_progress_and_without_keepalive() -> None:
    assert not stalled(now=12.9, progress=10.0, heard=0.0, send_timeout=3.0, life=None)
    assert stalled(now=13.0, progress=10.0, heard=0.0, send_timeout=3.0, life=None)


def test_a_receiver_that_says_it_is_alive_keeps_a_slow_write_from_stalling() -> None:
    # keepalive_interval 1 + keepalive_timeout 2: life 3 s from the last PONG or ACK.
    assert not stalled(now=20.0, progress=10.0, heard=18.0, send_timeout=3.0, life=3.0)
    assert stalled(now=21.0, progress=10.0, heard=18.0, send_timeout=3.0, life=3.0)


def test_acknowledgements_are_overdue_only_once_awaited_for_more_than_send_timeout() -> None:
    assert not ack_overdue(now=100.0, since=None, heard=0.0, send_timeout=3.0, life=None)
    assert not ack_overdue(now=13.0, since=10.0, heard=0.0, send_timeout=3.0, life=None)
    assert ack_overdue(now=13.01, since=10.0, heard=0.0, send_timeout=3.0, life=None)


def test_a_receiver_that_answers_but_does_not_confirm_is_not_overdue_while_it_answers() -> None:
    assert not ack_overdue(now=15.0, since=10.0, heard=13.0, send_timeout=3.0, life=3.0)
    assert ack_overdue(now=16.0, since=10.0, heard=13.0, send_timeout=3.0, life=3.0)


def test_the_ack_timeout_reason_names_send_timeout() -> None:
    assert ACK_TIMEOUT_REASON.format(2.5) == "no acknowledgement within send_timeout (2.5 s)"


# -- the keepalive's clock ----------------------------------------------------------------


def test_the_keepalive_looks_four_times_per_shortest_bound() -> None:
    assert keepalive_tick(5.0, 10.0, 8.0, acknowledged=False) == 1.25
    assert keepalive_tick(5.0, 10.0, 2.0, acknowledged=True) == 0.5
    assert keepalive_tick(None, 10.0, 2.0, acknowledged=True) == 0.5


def test_the_keepalive_wakes_just_after_acknowledgements_become_overdue() -> None:
    assert next_tick(1.0, now=50.0, since=None, send_timeout=3.0, slack=0.01) == 1.0
    assert next_tick(1.0, now=12.5, since=10.0, send_timeout=3.0, slack=0.01) == pytest.approx(0.51)
    assert next_tick(1.0, now=20.0, since=10.0, send_timeout=3.0, slack=0.01) == 0.01


def test_a_ping_is_due_once_a_stream_wrote_nothing_for_an_interval() -> None:
    pings = Keepalive(count=2, interval=5.0, timeout=10.0, now=0.0)
    assert not pings.ping_due(0, now=1.0, writes=0, active=False)  # first look: idle from now
    assert not pings.ping_due(0, now=5.9, writes=0, active=False)
    assert pings.ping_due(0, now=6.0, writes=0, active=False)
    assert not pings.ping_due(1, now=6.0, writes=3, active=False)  # it wrote: idle from now


def test_a_stream_with_something_queued_or_being_written_is_not_due_a_ping() -> None:
    pings = Keepalive(count=1, interval=5.0, timeout=10.0, now=0.0)
    pings.ping_due(0, now=0.0, writes=0, active=False)
    assert not pings.ping_due(0, now=9.0, writes=0, active=True)
    assert not pings.ping_due(0, now=13.9, writes=0, active=False)
    assert pings.ping_due(0, now=14.0, writes=0, active=False)


def test_an_unanswered_ping_is_overdue_after_keepalive_timeout() -> None:
    pings = Keepalive(count=1, interval=5.0, timeout=10.0, now=0.0)
    pings.pinged(0, now=6.0, progress=None)  # the kernel cannot tell: nothing to follow
    assert not pings.wants_progress(0)
    assert not pings.answer_overdue(0, now=16.0, sent=6.0, progress=None)
    assert pings.answer_overdue(0, now=16.01, sent=6.0, progress=None)


def test_a_ping_behind_bytes_still_moving_is_not_overdue_while_they_move() -> None:
    pings = Keepalive(count=1, interval=5.0, timeout=10.0, now=0.0)
    # 1000 bytes acknowledged by the peer's kernel, 5000 still ahead of the PING.
    pings.pinged(0, now=6.0, progress=(1000, 5000))
    assert pings.wants_progress(0)
    assert not pings.answer_overdue(0, now=15.0, sent=6.0, progress=(3000, 3000))
    # Moved at 15: the timeout runs from there, not from the PING.
    assert not pings.answer_overdue(0, now=25.0, sent=6.0, progress=(3000, 3000))
    assert pings.answer_overdue(0, now=25.01, sent=6.0, progress=(3000, 3000))


def test_once_the_bytes_before_a_ping_are_through_its_timeout_runs_from_then() -> None:
    pings = Keepalive(count=1, interval=5.0, timeout=10.0, now=0.0)
    pings.pinged(0, now=6.0, progress=(1000, 5000))
    assert not pings.answer_overdue(0, now=12.0, sent=6.0, progress=(6000, 0))
    assert not pings.wants_progress(0)  # nothing ahead of the PING: nothing more to follow
    assert not pings.answer_overdue(0, now=22.0, sent=6.0, progress=None)
    assert pings.answer_overdue(0, now=22.01, sent=6.0, progress=None)


def test_bytes_moved_needs_two_readings_and_more_of_our_data_acknowledged() -> None:
    seen: list[tuple[int, int] | None] = [None, None]
    assert not bytes_moved(seen, 0, (5000, 100_000))  # a first reading proves nothing yet
    assert not bytes_moved(seen, 0, (5000, 100_000))  # nothing more acknowledged
    assert bytes_moved(seen, 0, (6000, 99_000))
    assert not bytes_moved(seen, 1, None)  # the kernel cannot tell
    # Only PINGs outstanding (a receiver whose host takes them but never answers): their
    # acknowledgement is no sign of life.
    assert bytes_moved(seen, 0, (105_000, wire.PING.size))  # the last data went out
    assert not bytes_moved(seen, 0, (105_000 + wire.PING.size, 0))
    assert not bytes_moved(seen, 0, (105_000 + 2 * wire.PING.size, 0))
    assert seen == [(105_000 + 2 * wire.PING.size, 0), None]
