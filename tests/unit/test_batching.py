"""``queue_tracked``: a run of small acknowledged messages queued in one lock section (what
``Manager.deliver()``'s thread sends), frame for frame as one send per message queues them,
and ending where a message needs a send of its own."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from dwcp import TransportError
from dwcp.transport import sender
from dwcp.transport._window import Window
from dwcp.transport.sender import _Session
from tests.unit.test_send_path import _threadless_session

_LIMIT = 16384


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made = [socket.socketpair() for _ in range(3)]
    yield made
    for pair in made:
        for sock in pair:
            sock.close()


def _session(pairs: list[tuple[socket.socket, socket.socket]], window: Window) -> _Session:
    # Three streams with no writer thread: what is queued stays in the outboxes.
    return _threadless_session([ours for ours, _ in pairs], window)


def _outboxes(session: _Session) -> list[list[bytes]]:
    # Small tracked messages are queued as whole frames (bytes), never as lazy parts.
    return [[bytes(part) for part in stream.outbox] for stream in session.streams]  # type: ignore[arg-type]


def test_a_run_queues_the_same_frames_on_the_same_streams_as_one_send_per_message(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    messages = [b"m%d" % n * (n + 1) for n in range(10)]
    one_by_one = _session(pairs, Window(100, 1 << 20))
    others = [socket.socketpair() for _ in range(3)]
    run = _session(others, Window(100, 1 << 20))
    try:
        for session in (one_by_one, run):  # the first goes alone (into an empty window)
            session.send_small(b"first", 5, True)
        for message in messages:
            one_by_one.send_small(message, len(message), True)
        assert run.queue_tracked(messages, _LIMIT) == 10
        assert _outboxes(run) == _outboxes(one_by_one)
        assert run.next_id == one_by_one.next_id == 11
        assert run.window is not None and one_by_one.window is not None
        assert list(run.window.entries) == list(one_by_one.window.entries)
        assert (run.window.last, run.window.added) == (10, 5 + sum(map(len, messages)))
        assert [s.queued for s in run.streams] == [s.queued for s in one_by_one.streams]
    finally:
        for pair in others:
            for sock in pair:
                sock.close()


def test_into_an_empty_window_nothing_is_queued_the_first_message_needs_its_own_send(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    # Into an empty window a message asks for its ACK at once (ACK_NOW_EMPTY): send_small's.
    session = _session(pairs, Window(100, 1 << 20))
    assert session.queue_tracked([b"a", b"b"], _LIMIT) == 0
    assert session.next_id == 0 and not any(s.outbox for s in session.streams)


@pytest.mark.parametrize(
    ("why", "prepare", "expected"),
    [
        ("a message over the limit", lambda s: None, 2),
        ("the window's message limit", lambda s: None, 3),
        ("a stream's outbox full", lambda s: setattr(s.streams[2], "queued", 1 << 30), 1),
        ("senders waiting for room", lambda s: setattr(s, "waiters", 1), 0),
    ],
)
def test_a_run_ends_at_the_first_message_that_needs_its_own_send(
    pairs: list[tuple[socket.socket, socket.socket]],
    why: str,
    prepare: object,
    expected: int,
) -> None:
    window = Window(4 if why == "the window's message limit" else 100, 1 << 20)
    session = _session(pairs, window)
    session.send_small(b"first", 5, True)  # id 0, on stream 0
    messages = [b"a", b"b", b"x" * (_LIMIT + 1) if why.startswith("a message") else b"c", b"d"]
    prepare(session)  # type: ignore[operator]
    assert session.queue_tracked(messages, _LIMIT) == expected, why
    assert session.next_id == 1 + expected
    assert window.last == expected  # ids 1.. in the window, nothing of the rest


def test_a_run_into_a_broken_or_closing_session_raises_as_a_send_does_and_queues_nothing(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    session = _session(pairs, Window(100, 1 << 20))
    session.send_small(b"first", 5, True)
    session.sealed = True  # close() began
    with pytest.raises(TransportError) as closing:
        session.queue_tracked([b"a"], _LIMIT)
    assert closing.value.code == "NOT_STARTED"
    session.sealed = False
    session.break_("stream 1: send failed", cause=BrokenPipeError(32, "Broken pipe"))
    with pytest.raises(TransportError) as broken:
        session.queue_tracked([b"a"], _LIMIT)
    assert broken.value.code == "TRANSPORT_ERROR"
    assert isinstance(broken.value.__cause__, BrokenPipeError)
    assert session.next_id == 1


def test_the_transport_queues_runs_only_of_messages_a_send_would_take_whole(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    """The limit is the smallest of 16 KiB, ``chunk_size`` and ``max_message_size``."""
    transport = sender.MultiStreamTCPTransport(
        ("127.0.0.1", 9), acknowledged=True, max_message_size=100, chunk_size=4096
    )
    with pytest.raises(TransportError) as not_started:
        transport._queue_for_delivery([b"a"])
    assert not_started.value.code == "NOT_STARTED"
    session = _session(pairs, Window(100, 1 << 20))
    transport._session = session
    session.send_small(b"first", 5, True)
    assert transport._queue_for_delivery([b"a", b"b" * 100, b"c" * 101, b"d"]) == 2
