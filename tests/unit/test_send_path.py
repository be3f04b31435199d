"""The sender's queueing decisions over socket pairs: without writer threads, streams whose
outboxes the test fills and drains by hand, so each interleaving is played exactly; and
acknowledged sessions whose ACKs the test writes by hand on the peer ends, so the window's
room changes exactly when the test says.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dwcp import TransportError
from dwcp.transport import _admission, _writer, sender, wire
from dwcp.transport._window import Window
from dwcp.transport.sender import _Session, _Stream
from tests.conftest import wait_until

_QUEUED: Any = vars(_Stream)["queued"]  # the slot itself, under the property below


class _DrainedAfterOneLook(_Stream):
    """A stream whose writer empties its outbox right after a sender saw it full: its first
    read of ``queued`` says full, every later one tells the truth."""

    __slots__ = ()
    looks_full = 1

    @property
    def queued(self) -> int:
        if _DrainedAfterOneLook.looks_full:
            _DrainedAfterOneLook.looks_full -= 1
            return sender._OUTBOX_LIMIT
        return int(_QUEUED.__get__(self))

    @queued.setter
    def queued(self, value: int) -> None:
        _QUEUED.__set__(self, value)


@pytest.fixture
def session() -> Iterator[_Session]:
    pairs = [socket.socketpair() for _ in range(2)]
    made = _threadless_session([ours for ours, _ in pairs])
    try:
        yield made
    finally:
        for pair in pairs:
            for sock in pair:
                sock.close()


def test_a_striped_send_waits_for_the_lane_it_saw_full_even_once_it_drained(
    session: _Session,
) -> None:
    # The lane was full when the send looked under the order lock, and drained before the
    # send went looking for it again: it used to find no full lane (StopIteration out of
    # send()); now it waits for the lane it saw, finds room, and queues the message. Both
    # lanes look full to the plan (two looks; one lane full would be gone around) and the
    # first once more to the check for a full lane.
    _DrainedAfterOneLook.looks_full = 3
    for stream in session.streams:
        stream.__class__ = _DrainedAfterOneLook
    data = bytes(4 * 1024)
    assert session.send_large(data, len(data), 1024, track=False) == 0
    assert _DrainedAfterOneLook.looks_full == 0
    assert [len(s.outbox) for s in session.streams] == [2, 2]
    assert session.next_id == 1 and session.broken is None


# -- acknowledged: the window's room, taken under the order lock -------------------------------

FAR = 30.0  # a send_timeout no passing test reaches


class _Acked:
    """An acknowledged session over socket pairs, its writer and reader threads running; the
    test plays the receiver's ACKs by hand on the peer ends."""

    def __init__(self, max_messages: int, max_bytes: int, send_timeout: float) -> None:
        self.pairs = [socket.socketpair() for _ in range(2)]
        self.window = Window(max_messages, max_bytes)
        self.session = _Session(
            ("127.0.0.1", 9),
            [(ours, None) for ours, _ in self.pairs],
            session_id=bytes(16),
            send_timeout=send_timeout,
            acknowledged=True,
            checksum=True,
            keepalive_interval=None,
            keepalive_timeout=5.0,
            window=self.window,
        )
        self.session.run_threads()

    def ack(self, through: int) -> None:
        self.pairs[0][1].sendall(wire.pack_ack(through))
        wait_until(lambda: self.window.acked >= through)

    def close(self) -> None:
        self.session.break_("test over")  # nothing to wait for: no ACK is coming
        self.session.shutdown()
        for pair in self.pairs:
            for sock in pair:
                sock.close()


def _in_thread(run: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    outcome: list[object] = []

    def target() -> None:
        try:
            outcome.append(run())
        except TransportError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, name="test-send", daemon=True)
    thread.start()
    return thread, outcome


def test_many_threads_never_hold_more_than_the_window_and_each_id_once() -> None:
    # 8 threads, 10 sends each, a 16-message window and no ACK: exactly 16 go, the other
    # threads wait; each ACK lets exactly as many more in as it freed.
    acked = _Acked(16, 1 << 20, FAR)
    window, session = acked.window, acked.session
    ids: list[int] = []
    lock = threading.Lock()

    def sender(number: int) -> None:
        for seq in range(10):
            data = b"%d:%d" % (number, seq) + bytes(seq * 300)  # 1-3 chunks of 1 KiB
            if len(data) <= 1024:
                got = session.send_small(data, len(data), True)
            else:
                got = session.send_large(data, len(data), 1024, track=True)
            with lock:
                ids.append(got)

    try:
        threads = [threading.Thread(target=sender, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        through = -1
        for _ in range(80):  # bounded: one ACK per round at least
            if through == 79:
                break
            wait_until(
                lambda: (
                    len(ids) == 80
                    or (
                        window.pending == 16
                        # every live thread queued for room, its head waiting in the window
                        and session.waiters == sum(t.is_alive() for t in threads)
                        and window._room_waiting == 1
                    )
                )
            )
            assert window.pending <= 16 and window.last - window.acked == window.pending
            through = min(window.last, through + 5)
            acked.ack(through)
        for thread in threads:
            thread.join(FAR)
        assert sorted(ids) == list(range(80)) and window.pending == 0
        assert window.added == window.freed  # no unacknowledged bytes
    finally:
        acked.close()


def test_a_send_that_finds_no_room_while_acks_still_come_raises_window_full() -> None:
    # 1,000 bytes of window: 100 + 800 in flight, 900 wanted. The ACK of the 100 comes while
    # the send waits: room for 200 only. The head of the window has waited less than
    # send_timeout since that ACK (though the 800 have waited longer since they were sent):
    # the link is alive, so WINDOW_FULL, nothing sent, and the session is not broken.
    acked = _Acked(100, 1000, 5.0)
    window, session = acked.window, acked.session
    try:
        assert session.send_small(bytes(100), 100, True) == 0
        assert session.send_small(bytes(800), 800, True) == 1
        window.since -= 60.0  # as if both had been sent a minute ago
        deadline = time.monotonic() + 1.0  # this send waits for room less than send_timeout
        thread, outcome = _in_thread(
            lambda: session.send_small(bytes(900), 900, True, False, deadline)
        )
        wait_until(lambda: window._room_waiting == 1)
        acked.ack(0)
        thread.join(FAR)
        [error] = outcome
        assert isinstance(error, TransportError) and error.code == "WINDOW_FULL", error
        assert session.broken is None and window.pending == 1 and session.next_id == 2
        assert session.send_small(bytes(200), 200, True) == 2  # what fits still goes
    finally:
        acked.close()


def test_a_send_that_finds_no_room_and_no_ack_for_send_timeout_raises_ack_timeout() -> None:
    acked = _Acked(2, 1 << 20, 0.3)
    window, session = acked.window, acked.session
    try:
        session.send_small(b"a", 1, True)
        session.send_small(b"b", 1, True)
        with pytest.raises(TransportError) as raised:
            session.send_small(b"c", 1, True)
        assert raised.value.code == "ACK_TIMEOUT"
        assert session.broken is not None and window.pending == 2 and session.next_id == 2
    finally:
        acked.close()


# -- the order lock under contention ----------------------------------------------------------


def test_a_sender_finding_the_order_lock_taken_yields_then_takes_it_when_freed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The holder frees the lock during the third yield: the waiter takes it there, without
    # blocking, and holds it when _take_contended returns.
    order = threading.Lock()
    order.acquire()
    yields: list[float] = []

    def fake_sleep(seconds: float) -> None:
        yields.append(seconds)
        if len(yields) == 3:
            order.release()

    monkeypatch.setattr(_admission, "_sleep", fake_sleep)
    sender._take_contended(order)
    assert yields == [0, 0, 0] and order.locked()
    order.release()


def test_a_sender_still_blocked_after_its_yields_waits_for_the_release(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    order = threading.Lock()
    order.acquire()
    yields: list[float] = []
    monkeypatch.setattr(_admission, "_sleep", yields.append)
    took = threading.Event()

    def waiter() -> None:
        sender._take_contended(order)
        took.set()

    thread = threading.Thread(target=waiter, name="test-order-waiter", daemon=True)
    thread.start()
    wait_until(lambda: len(yields) == sender._YIELDS)  # every yield spent: it blocks now
    assert not took.is_set()
    order.release()
    assert took.wait(FAR)
    thread.join(FAR)
    assert order.locked()  # taken by the waiter, which returned holding it


# -- backpressure: room in the outboxes, first come first served (issue 22) --------------------


def _fill(stream: _Stream) -> None:
    """Make ``stream``'s outbox look full (no writer drains it in these tests)."""
    with stream.lock:
        stream.queued = sender._OUTBOX_LIMIT


def _drain(stream: _Stream) -> None:
    """What the stream's writer does when it takes the outbox: room, and waiters woken."""
    with stream.lock:
        stream.queued = 0
        stream.drained.notify_all()


def test_a_send_that_gets_no_room_by_its_deadline_fails_alone_and_the_session_lives(
    session: _Session,
) -> None:
    _fill(session.streams[0])  # message id 0 goes to stream 0
    with pytest.raises(TransportError) as raised:
        session.send_small(b"late", 4, False, False, time.monotonic() + 0.05)
    assert raised.value.code == "BACKPRESSURE", raised.value
    assert "nothing was sent" in str(raised.value)
    # Nothing of it was queued or numbered, and the session goes on.
    assert session.broken is None and session.next_id == 0 and session.waiters == 0
    assert [len(s.outbox) for s in session.streams] == [0, 0]
    _drain(session.streams[0])
    assert session.send_small(b"next", 4) == 0


def test_a_striped_message_that_gets_no_room_queues_no_chunk_at_all(session: _Session) -> None:
    for stream in session.streams:
        _fill(stream)
    _drain(session.streams[0])
    session.streams[0].put([b"x"], sender._OUTBOX_LIMIT - 1, None)  # one byte short of full
    data = bytes(4 * 1024)
    with pytest.raises(TransportError) as raised:
        session.send_large(data, len(data), 1024, track=False, deadline=time.monotonic() + 0.05)
    assert raised.value.code == "BACKPRESSURE"
    assert [len(s.outbox) for s in session.streams] == [1, 0]  # not even where one chunk fit
    assert session.broken is None and session.next_id == 0


def test_a_striped_message_goes_around_a_stream_with_bytes_still_waiting(
    session: _Session,
) -> None:
    # Issue 24: each chunk goes on the stream with the fewest bytes waiting, so a stream
    # slowed by loss carries less; the chunks were striped on every stream in turn, and
    # all of them moved at the slowest one's pace.
    _fill(session.streams[1])  # one of the two lanes a 4-chunk message was striped over
    data = bytes(4 * 1024)
    assert session.send_large(data, len(data), 1024, track=False) == 0
    assert [len(s.outbox) for s in session.streams] == [4, 0]  # every chunk on stream 0
    assert session.broken is None and session.next_id == 1


def test_room_is_granted_in_arrival_order(session: _Session) -> None:
    # A and B wait, in that order, for stream 0; C comes once the room is there. A gets id
    # 0, B 1 and C 2: C does not take the room A and B waited for.
    stream = session.streams[0]
    _fill(stream)
    a, a_out = _in_thread(lambda: session.send_small(b"A", 1))
    wait_until(lambda: session.waiters == 1 and stream.waiting == 1)  # A heads the queue
    b, b_out = _in_thread(lambda: session.send_small(b"B", 1))
    wait_until(lambda: session.waiters == 2)
    _drain(stream)
    c_id = session.send_small(b"C", 1)
    a.join(FAR)
    b.join(FAR)
    assert (a_out, b_out, c_id) == ([0], [1], 2)
    assert session.broken is None and session.waiters == 0


def test_a_waiter_behind_the_head_gives_up_at_its_deadline_without_disturbing_the_queue(
    session: _Session,
) -> None:
    stream = session.streams[0]
    _fill(stream)
    a, a_out = _in_thread(lambda: session.send_small(b"A", 1))
    wait_until(lambda: session.waiters == 1 and stream.waiting == 1)
    with pytest.raises(TransportError) as raised:
        session.send_small(b"B", 1, False, False, time.monotonic() + 0.05)
    assert raised.value.code == "BACKPRESSURE"
    assert session.waiters == 1 and a.is_alive()  # A still heads the queue
    _drain(stream)
    a.join(FAR)
    assert a_out == [0] and session.next_id == 1 and session.broken is None


def _pings(stream: _Stream) -> list[int]:
    """Where PING frames sit in ``stream``'s outbox (DATA frames are longer)."""
    return [
        at
        for at, frame in enumerate(stream.outbox)
        if isinstance(frame, bytes) and wire.parse_prefix(frame[:8])[0] == wire.FRAME_PING
    ]


def test_flush_asks_for_an_ack_with_a_ping_behind_the_last_message_unless_it_asked() -> None:
    pairs = [socket.socketpair() for _ in range(2)]
    window = Window(16, 1 << 20)
    session = _threadless_session([ours for ours, _ in pairs], window)
    first, second = session.streams
    try:
        # Into an empty window: it asks itself, and someone may wait for that ACK, so the
        # sender writes it at once instead of handing it to the stream's writer.
        assert session.send_small(b"a", 1, True) == 0
        assert not first.outbox
        written = pairs[0][1].recv(64)
        assert wire.parse_prefix(written[:8])[1] & wire.FLAG_ACK_NOW
        session.ask_for_ack()
        assert _pings(first) == _pings(second) == []
        assert session.send_small(b"b", 1, True) == 1  # behind "a": it does not ask
        assert not wire.parse_prefix(second.outbox[0][:8])[1] & wire.FLAG_ACK_NOW  # type: ignore[index]
        session.ask_for_ack()
        assert _pings(first) == [] and _pings(second) == [1]  # behind "b", on its stream
        window.ack(1)
        session.ask_for_ack()  # nothing unacknowledged: nothing to ask for
        assert _pings(first) == [] and _pings(second) == [1]
    finally:
        for pair in pairs:
            for sock in pair:
                sock.close()


def test_a_small_message_someone_waits_for_is_written_by_the_sending_thread_when_idle() -> None:
    """README: a message whose confirmation someone waits for (``send(wait=True)``) is
    written by the sending thread itself when its stream is idle; otherwise it is queued for
    the stream's writer (no writer thread runs here, so the outbox shows which happened)."""
    ours, theirs = socket.socketpair()
    session = _threadless_session([ours], Window(16, 1 << 20))
    (stream,) = session.streams
    try:
        assert session.send_small(b"a", 1, True) == 0  # into an empty window: written at once
        assert not stream.outbox
        theirs.recv(64)
        assert session.send_small(b"b", 1, True) == 1  # behind "a", nobody waits: queued
        assert len(stream.outbox) == 1
        # With wait=True, but its stream is not idle ("b" waits for the writer): queued too.
        assert session.send_small(b"c", 1, True, True, time.monotonic() + 5.0) == 2
        assert len(stream.outbox) == 2
        stream.outbox.clear()
        stream.queued = 0
        # With wait=True on an idle stream, the window not empty: the sending thread writes it.
        assert session.send_small(b"d", 1, True, True, time.monotonic() + 5.0) == 3
        assert not stream.outbox
        written = theirs.recv(64)
        assert wire.parse_prefix(written[:8])[1] & wire.FLAG_ACK_NOW
    finally:
        ours.close()
        theirs.close()


def _threadless_session(socks: list[socket.socket], window: Window | None = None) -> _Session:
    """A session over ``socks`` with no threads running (acknowledged with a ``window``):
    what it writes itself arrives at their peers, what it queues stays in the outboxes."""
    return _Session(
        ("127.0.0.1", 9),
        [(sock, None) for sock in socks],
        session_id=bytes(16),
        send_timeout=5.0,
        acknowledged=window is not None,
        checksum=True,
        keepalive_interval=None,
        keepalive_timeout=5.0,
        window=window,
    )


def test_a_send_that_comes_while_close_writes_the_queue_is_refused_not_lost() -> None:
    """README: ``close()`` writes what is queued, and sends after ``close()`` raise
    ``NOT_STARTED``. A send that came while close() was writing the queue (after its last
    write, before the streams closed) was queued and never written: its send returned, and
    the message was lost (an outside test: 1-15 messages per run, 11 of 11 runs)."""
    ours, theirs = socket.socketpair()
    session = _threadless_session([ours])
    late: list[str] = []
    linger = session.linger

    def linger_then_send() -> bool:
        written = linger()
        try:
            session.send_small(b"late", 4)
        except TransportError as exc:
            late.append(exc.code)
        else:
            late.append("queued, never written")
        return written

    session.linger = linger_then_send  # type: ignore[method-assign]
    try:
        session.send_small(b"early", 5)
        session.streams[0].outbox.clear()  # no writer thread here: as if it wrote "early"
        session.streams[0].queued = 0
        session.shutdown()
        assert late == ["NOT_STARTED"]
        with pytest.raises(TransportError) as after:
            session.send_small(b"after", 5)
        assert after.value.code == "NOT_STARTED"
    finally:
        theirs.close()


def test_every_send_that_finds_the_session_broken_by_a_socket_error_has_it_as_cause() -> None:
    """README's error table: ``TRANSPORT_ERROR``, "the socket error is ``__cause__``", for
    the sends that find the session broken as for the one whose write failed (an outside
    test got a broken pipe reported with no ``__cause__``)."""
    ours, theirs = socket.socketpair()
    session = _threadless_session([ours])
    pipe = BrokenPipeError(32, "Broken pipe")
    try:
        with pytest.raises(TransportError) as first:
            session.fail(session.streams[0], "send failed", pipe)
        with pytest.raises(TransportError) as later:
            session.send_small(b"later", 5)
        assert first.value.__cause__ is pipe and later.value.__cause__ is pipe
        assert later.value.code == "TRANSPORT_ERROR" and "Broken pipe" in str(later.value)
    finally:
        theirs.close()
        ours.close()


def test_a_large_send_being_written_when_the_socket_fails_has_the_socket_error_as_cause() -> None:
    """README's error table: the socket error is ``__cause__`` of ``TRANSPORT_ERROR``, also
    for a large send that was being written by the writers then (it was the cause of a
    ``TransportError`` that was the cause), whether the session broke or not."""
    ours, theirs = socket.socketpair()
    session = _threadless_session([ours])
    pipe = BrokenPipeError(32, "Broken pipe")
    try:
        written = _writer.Batch(1)
        with pytest.raises(TransportError) as unbroken:
            raise TransportError("stream 0: send failed") from pipe
        written.finish(unbroken.value)  # as the writer does with what write() raised
        with pytest.raises(TransportError) as alone:
            session.await_written(written)
        assert alone.value.__cause__ is pipe
        with pytest.raises(TransportError):
            session.fail(session.streams[0], "send failed", pipe)
        with pytest.raises(TransportError) as broken:
            session.await_written(written)
        assert broken.value.__cause__ is pipe and broken.value.code == "TRANSPORT_ERROR"
    finally:
        theirs.close()
        ours.close()


def test_close_waits_close_timeout_for_acks_once_what_was_queued_at_its_start_is_written() -> None:
    """The transport's ``close_timeout``: a live receiver is waited for while bytes of ours
    still wait; "with everything written, only acknowledgements are waited for,
    ``close_timeout`` after the last one". A ``close()`` that began while messages were still
    queued waited out the whole keepalive bound after they were written (a paused consumer,
    close_timeout 0.3 s: close() took 30 s, the bound, in 1 of 3 runs)."""
    ours, theirs = socket.socketpair()
    session = _threadless_session([ours], Window(100, 1 << 20))
    session.close_timeout = 0.2
    session.life = 120.0  # the keepalive bound: two minutes
    stream = session.streams[0]
    try:
        session.send_small(b"first", 5, True)  # into an empty window: written directly
        session.send_small(b"queued", 6, True)  # no writer thread here: it stays queued
        assert stream.outbox
        stream.heard = time.monotonic()  # the receiver said it is alive (a PONG)

        def written(timeout: float | None = None) -> bool:  # as if the writer wrote it now
            stream.outbox.clear()
            stream.queued = 0
            return True

        session.flush = written  # type: ignore[method-assign]
        began = time.monotonic()
        assert session.linger() is False  # never confirmed: it gave up
        assert time.monotonic() - began < 60.0  # not the bound; only catches the old wait
    finally:
        theirs.close()
        ours.close()


def test_sends_waiting_for_room_when_close_begins_give_up_with_not_started(
    session: _Session,
) -> None:
    """README: ``close()`` refuses new sends from its first moment (``NOT_STARTED``, nothing
    of them sent), also for sends still waiting for room."""
    stream = session.streams[0]
    _fill(stream)
    a, a_out = _in_thread(lambda: session.send_small(b"A", 1))  # waits for room
    wait_until(lambda: session.waiters == 1 and stream.waiting == 1)
    b, b_out = _in_thread(lambda: session.send_small(b"B", 1))  # waits for its turn behind A
    wait_until(lambda: session.waiters == 2)
    session.shutdown()
    a.join(FAR)
    b.join(FAR)
    assert [type(out[0]) for out in (a_out, b_out)] == [TransportError] * 2
    assert [out[0].code for out in (a_out, b_out)] == ["NOT_STARTED"] * 2  # type: ignore[attr-defined]
    assert session.next_id == 0 and not stream.outbox  # nothing of them was queued
