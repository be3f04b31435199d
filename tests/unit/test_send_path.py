"""The sender's queueing decisions without writer threads: a session over socket pairs whose
streams' outboxes the test fills and drains by hand, so each interleaving is played exactly.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from dwcp.transport import sender
from dwcp.transport.sender import _Session, _Stream

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
    made = _Session(
        ("127.0.0.1", 9),
        [(ours, None) for ours, _ in pairs],
        session_id=bytes(16),
        send_timeout=5.0,
        acknowledged=False,
        checksum=True,
        keepalive_interval=None,
        keepalive_timeout=5.0,
    )
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
    # send()); now it waits for the lane it saw, finds room, and queues the message.
    _DrainedAfterOneLook.looks_full = 1
    session.streams[0].__class__ = _DrainedAfterOneLook
    data = bytes(4 * 1024)
    assert session.send_large(data, len(data), 1024, track=False) == 0
    assert _DrainedAfterOneLook.looks_full == 0
    assert [len(s.outbox) for s in session.streams] == [2, 2]
    assert session.next_id == 1 and session.broken is None
