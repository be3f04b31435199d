"""The receiver's session decisions fed HELLOs and times (no sockets, no clock)."""

from __future__ import annotations

import os
from typing import cast

import pytest

from dwcp.transport import wire
from dwcp.transport._reader import Connection
from dwcp.transport._sessions import REPLACED_GRACE, SessionTable

ACCEPTED, BUSY, REFUSED = wire.STATUS_ACCEPTED, wire.STATUS_BUSY, wire.STATUS_REFUSED
JOIN = 10.0


def conn() -> Connection:
    return cast(Connection, object())  # the table only stores it


def hello(
    session: bytes,
    index: int = 0,
    count: int = 1,
    *,
    sender: bytes = wire.ANONYMOUS_SENDER,
    first_id: int = 0,
    acknowledged: bool = False,
) -> wire.Handshake:
    raw = wire.pack_handshake(
        session, index, count, acknowledged=acknowledged, sender_id=sender, first_id=first_id
    )
    return wire.parse_handshake(raw)


@pytest.fixture
def table() -> SessionTable:
    return SessionTable(max_sessions=1, max_buffered=1 << 20, join_timeout=JOIN)


def test_refusals_come_before_busy(table: SessionTable) -> None:
    sender = os.urandom(16)
    assert table.admit(hello(os.urandom(16), sender=sender, first_id=5), conn(), 0.0).status == 0
    # Full, and a stale attempt of the same sender: refused, not busy.
    stale = table.admit(hello(os.urandom(16), sender=sender, first_id=4), conn(), 0.0)
    assert (stale.status, stale.reason) == (REFUSED, "older than its sender's newest session")
    assert table.admit(hello(os.urandom(16)), conn(), 0.0).status == BUSY


@pytest.mark.parametrize(
    "other",
    [
        {"count": 3},
        {"acknowledged": True},
        {"sender": b"\x01" * 16},
        {"first_id": 7},
    ],
    ids=["count", "flags", "sender-id", "first-id"],
)
def test_a_stream_that_disagrees_with_its_session_is_refused(
    table: SessionTable, other: dict[str, object]
) -> None:
    session = os.urandom(16)
    assert table.admit(hello(session, 0, 2), conn(), 0.0).status == ACCEPTED
    fields: dict[str, object] = {"count": 2}
    fields.update(other)
    odd = table.admit(hello(session, 1, **fields), conn(), 0.0)  # type: ignore[arg-type]
    assert (odd.status, odd.reason) == (REFUSED, "handshake disagrees with its session")
    assert table.admit(hello(session, 1, 2), conn(), 0.0).status == ACCEPTED  # still open


def test_a_repeated_index_and_an_ended_session_are_refused(table: SessionTable) -> None:
    session = os.urandom(16)
    first = table.admit(hello(session, 0, 2), conn(), 0.0)
    assert table.admit(hello(session, 0, 2), conn(), 0.0).reason == "stream 0 already connected"
    assert first.session is not None and table.finish(first.session)
    assert not table.finish(first.session)  # once
    assert table.admit(hello(session, 1, 2), conn(), 0.0).reason == "session already ended"
    assert table.admit(hello(os.urandom(16)), conn(), 0.0).status == ACCEPTED  # slot free


def test_a_half_joined_session_is_abandoned_when_its_joined_streams_end(
    table: SessionTable,
) -> None:
    admission = table.admit(hello(os.urandom(16), 0, 3), conn(), 0.0)
    session = admission.session
    assert session is not None
    assert table.stream_ended(session)  # 1 of 3 joined, and it ended
    assert session.aborted
    full = SessionTable(max_sessions=1, max_buffered=1 << 20, join_timeout=JOIN)
    whole = full.admit(hello(os.urandom(16), 0, 1), conn(), 0.0).session
    assert whole is not None and not full.stream_ended(whole)  # a whole session just ends


def test_streams_that_do_not_join_in_time_expire(table: SessionTable) -> None:
    session = table.admit(hello(os.urandom(16), 0, 2), conn(), 0.0).session
    assert table.expired(JOIN) == []
    assert table.expired(JOIN + 0.01) == [session]
    assert table.expired(JOIN + 1) == []  # once (marked aborted)


def test_a_replaced_session_is_closed_at_once_only_when_acknowledged() -> None:
    for acknowledged in (True, False):
        table = SessionTable(max_sessions=2, max_buffered=1 << 20, join_timeout=JOIN)
        sender = os.urandom(16)
        old = table.admit(
            hello(os.urandom(16), sender=sender, acknowledged=acknowledged), conn(), 0.0
        )
        new = table.admit(
            hello(os.urandom(16), sender=sender, acknowledged=acknowledged, first_id=3),
            conn(),
            1.0,
        )
        assert new.session is not None and new.session.predecessor is old.session
        assert new.replaced is old.session
        assert new.close_replaced is acknowledged


def test_a_replaced_unacknowledged_session_expires_once_it_stops_making_progress() -> None:
    table = SessionTable(max_sessions=2, max_buffered=1 << 20, join_timeout=JOIN)
    sender = os.urandom(16)
    old = table.admit(hello(os.urandom(16), sender=sender), conn(), 0.0).session
    assert old is not None
    table.admit(hello(os.urandom(16), sender=sender, first_id=3), conn(), 1.0)
    old.reassembly.progress += 1  # a message completed meanwhile: the grace starts again
    assert table.expired(1.0 + REPLACED_GRACE + 0.5) == []
    assert table.expired(1.0 + 2 * REPLACED_GRACE + 0.6) == [old]
