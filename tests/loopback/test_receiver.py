"""MultiStreamReceiver against hand-written (often hostile) peers on loopback sockets."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dwcp._errors import DWCPError, TransportError
from dwcp.transport import MultiStreamReceiver, MultiStreamTCPTransport, _handing, _receiving, wire
from tests._frames import encode_message
from tests.conftest import Inbox, ReceiverFactory, closed_by_peer, wait_until

TIMEOUT = 5.0
IDLE = 1.0


@pytest.fixture
def hostile_receiver_factory(
    receiver_factory: ReceiverFactory,
) -> Callable[..., tuple[MultiStreamReceiver, Inbox]]:
    """Receivers with a short idle timeout, so stalled peers are cut off within the test."""

    def make(**kwargs: Any) -> tuple[MultiStreamReceiver, Inbox]:
        kwargs.setdefault("idle_timeout", IDLE)
        return receiver_factory(**kwargs)

    return make


@pytest.fixture
def bystander(
    hostile_receiver_factory: Callable[..., tuple[MultiStreamReceiver, Inbox]],
) -> Iterator[tuple[MultiStreamReceiver, Inbox, MultiStreamTCPTransport]]:
    """A receiver with one healthy session that must survive whatever the test sends."""
    receiver, inbox = hostile_receiver_factory()
    transport = MultiStreamTCPTransport(receiver.address, chunk_size=1024, acknowledged=True)
    transport.start()
    transport.send(b"before" * 500, wait=True)
    yield receiver, inbox, transport
    transport.close()


def still_healthy(
    receiver: MultiStreamReceiver, inbox: Inbox, transport: MultiStreamTCPTransport
) -> None:
    transport.send(b"after", wait=True)
    transport.health_check()
    assert inbox.messages[0] == b"before" * 500
    assert inbox.messages[-1] == b"after"


def handshake(
    sock: socket.socket, session: bytes, index: int = 0, count: int = 1, ack: bool = False
) -> int:
    sock.sendall(wire.pack_handshake(session, index, count, acknowledged=ack))
    return wire.parse_welcome(sock.recv(wire.WELCOME.size, socket.MSG_WAITALL))


def frame(message_id: int, data: bytes, chunk_size: int = 1024) -> bytes:
    return b"".join(encode_message(message_id, data, chunk_size))


def _seal(packed: bytes) -> bytes:
    """Fill in the header CRC (the last 4 bytes) of a hand-packed frame header."""
    return packed[:-4] + wire.checksum_of(packed[:-4]).to_bytes(4, "big")


def _hello(magic: bytes, version: int, count: int, *, seal: bool = True) -> bytes:
    packed = wire.HANDSHAKE.pack(
        magic, version, wire.FRAME_HELLO, 0, os.urandom(16), bytes(16), 0, 0, count, 0, 0
    )
    return _seal(packed) if seal else packed


# -- hostile input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        os.urandom(64),
        b"GET / HTTP/1.1\r\nHost: example\r\n\r\n",
        _hello(b"DWCQ", wire.VERSION, 1),
        _hello(wire.MAGIC, 7, 1),
        _hello(wire.MAGIC, 1, 1),  # a version 1 peer
        _hello(wire.MAGIC, wire.VERSION, 200),
        _hello(wire.MAGIC, wire.VERSION, 1, seal=False),
        wire.pack_ping(1),  # a session must start with HELLO
    ],
    ids=[
        "random",
        "http",
        "bad-magic",
        "bad-version",
        "version-1",
        "absurd-stream-count",
        "bad-header-checksum",
        "not-hello",
    ],
)
def test_bad_handshake_closes_the_connection(
    bystander: tuple[MultiStreamReceiver, Inbox, MultiStreamTCPTransport],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
    garbage: bytes,
) -> None:
    receiver, inbox, transport = bystander
    sock = raw_connections(receiver.address)
    sock.sendall(garbage)
    assert closed_by_peer(sock)
    still_healthy(receiver, inbox, transport)


def _header(magic: bytes = wire.MAGIC, **fields: int) -> bytes:
    """A DATA header of the valid one-chunk message 0 ``hello``, with ``fields`` overridden;
    its header CRC is right unless ``header_crc`` is given."""
    values = {"version": wire.VERSION, "type": wire.FRAME_DATA, "flags": 0, "message_id": 0}
    values.update({"index": 0, "count": 1, "total": 5, "length": 5})
    values["crc"] = wire.checksum_of(b"hello")
    values["header_crc"] = 0
    values.update(fields)
    packed = wire.DATA_HEADER.pack(magic, *values.values())
    return packed if "header_crc" in fields else _seal(packed)


@pytest.mark.parametrize(
    "bad_frame",
    [
        os.urandom(wire.DATA_HEADER.size + 100),
        _header(b"XXXX") + b"hello",
        _header(version=1) + b"hello",
        _header(total=2**32 - 1, length=2**32 - 1),
        _header(count=4_000_000_000, total=5, length=5),
        _header(crc=12345) + b"hello",
        _header(header_crc=12345) + b"hello",
        _header(message_id=1 << 40) + b"hello",
        _header(type=wire.FRAME_ACK) + b"hello",
        _header(type=wire.FRAME_HELLO) + b"hello",
        _header() + b"hello" + _header() + b"hello",  # the same message id twice
    ],
    ids=[
        "random",
        "bad-magic",
        "bad-version",
        "absurd-length",
        "absurd-count",
        "wrong-checksum",
        "wrong-header-checksum",
        "id-too-far-ahead",
        "wrong-type",
        "hello-mid-session",
        "duplicate-id",
    ],
)
def test_bad_frames_close_the_session_and_nothing_else(
    bystander: tuple[MultiStreamReceiver, Inbox, MultiStreamTCPTransport],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
    bad_frame: bytes,
) -> None:
    receiver, inbox, transport = bystander
    session = os.urandom(16)
    good, bad = raw_connections(receiver.address), raw_connections(receiver.address)
    assert handshake(good, session, 0, 2) == wire.STATUS_ACCEPTED
    assert handshake(bad, session, 1, 2) == wire.STATUS_ACCEPTED
    delivered = receiver.delivered_count
    with contextlib.suppress(OSError):  # the receiver may close before we finish writing
        bad.sendall(bad_frame)
    assert closed_by_peer(bad)
    assert closed_by_peer(good)  # the whole session goes
    assert wait_for(lambda: receiver.session_count == 1)  # only the bystander's is left
    # Only a valid message before the bad frame (the duplicate case) may get through.
    expected = [b"hello"] if bad_frame.startswith(_header() + b"hello") else []
    assert receiver.delivered_count == delivered + len(expected)
    assert inbox.messages[1:] == expected
    still_healthy(receiver, inbox, transport)


def test_conflicting_chunks_close_the_session(
    bystander: tuple[MultiStreamReceiver, Inbox, MultiStreamTCPTransport],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
) -> None:
    receiver, inbox, transport = bystander
    sock = raw_connections(receiver.address)
    handshake(sock, os.urandom(16))
    first, _ = encode_message(0, b"a" * 1500, 1024)
    other = encode_message(0, b"b" * 3000, 1024)[1]  # same id, different layout
    sock.sendall(first + other)
    assert closed_by_peer(sock)
    assert b"a" * 1500 not in inbox.messages
    still_healthy(receiver, inbox, transport)


def test_duplicate_chunk_closes_the_session(
    bystander: tuple[MultiStreamReceiver, Inbox, MultiStreamTCPTransport],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
) -> None:
    receiver, inbox, transport = bystander
    sock = raw_connections(receiver.address)
    handshake(sock, os.urandom(16))
    first, _ = encode_message(0, b"a" * 1500, 1024)
    sock.sendall(first + first)
    assert closed_by_peer(sock)
    still_healthy(receiver, inbox, transport)


@pytest.mark.parametrize(
    "sent",
    [b"", b"DWCP\x01", wire.pack_handshake(os.urandom(16), 0, 1, acknowledged=False)],
    ids=["nothing", "partial-handshake", "handshake-only"],
)
def test_silent_connections_are_closed_after_idle_timeout(
    hostile_receiver_factory: Callable[..., tuple[MultiStreamReceiver, Inbox]],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
    sent: bytes,
) -> None:
    receiver, _ = hostile_receiver_factory(idle_timeout=0.3)
    sock = raw_connections(receiver.address)
    sock.sendall(sent)
    began = time.monotonic()
    # closed_by_peer gives up after 10 s: a connection idle_timeout left open fails it.
    assert closed_by_peer(sock)
    assert 0.2 < time.monotonic() - began  # not before idle_timeout (0.3 s)


def test_half_sent_frame_is_closed_while_a_busy_session_lives(
    hostile_receiver_factory: Callable[..., tuple[MultiStreamReceiver, Inbox]],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
) -> None:
    receiver, inbox = hostile_receiver_factory(idle_timeout=0.3)
    transport = MultiStreamTCPTransport(receiver.address, acknowledged=True)
    transport.start()
    try:
        sock = raw_connections(receiver.address)
        handshake(sock, os.urandom(16))
        sock.sendall(frame(0, b"x" * 100)[:60])  # header and part of the payload
        sock.settimeout(0.05)
        sent, closed = 0, False
        deadline = time.monotonic() + TIMEOUT
        while not closed and time.monotonic() < deadline:
            transport.send(b"%d" % sent)  # keeps the healthy session busy meanwhile
            sent += 1
            with contextlib.suppress(TimeoutError):
                closed = sock.recv(100) == b""
        assert closed
        transport.send(b"last", wait=True)
        transport.health_check()
        assert inbox.messages == [b"%d" % n for n in range(sent)] + [b"last"]
    finally:
        transport.close()


# -- ordering and reassembly ------------------------------------------------------------------


def test_out_of_order_messages_and_chunks_are_delivered_in_order(
    hostile_receiver_factory: Callable[..., tuple[MultiStreamReceiver, Inbox]],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
) -> None:
    receiver, inbox = hostile_receiver_factory()
    session = os.urandom(16)
    streams = [raw_connections(receiver.address) for _ in range(3)]
    for index, sock in enumerate(streams):
        handshake(sock, session, index, 3)
    big = os.urandom(3000)
    chunks = encode_message(1, big, 1024)
    # Each stream in id order (the wire format's rule); across streams, any order.
    streams[1].sendall(chunks[1] + frame(2, b"two"))
    streams[0].sendall(chunks[2] + chunks[0])
    streams[2].sendall(frame(0, b"zero"))
    assert receiver.wait_delivered(3, TIMEOUT)
    assert inbox.messages == [b"zero", big, b"two"]


def test_an_id_going_backwards_on_a_stream_closes_the_session(
    hostile_receiver_factory: Callable[..., tuple[MultiStreamReceiver, Inbox]],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
) -> None:
    receiver, inbox = hostile_receiver_factory()
    session = os.urandom(16)
    streams = [raw_connections(receiver.address) for _ in range(2)]
    for index, sock in enumerate(streams):
        handshake(sock, session, index, 2)
    streams[0].sendall(frame(2, b"two") + frame(1, b"one"))
    assert closed_by_peer(streams[0])
    assert closed_by_peer(streams[1])
    assert inbox.messages == []


def test_incomplete_messages_are_dropped_at_session_end(
    hostile_receiver_factory: Callable[..., tuple[MultiStreamReceiver, Inbox]],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
) -> None:
    receiver, inbox = hostile_receiver_factory()
    sock = raw_connections(receiver.address)
    handshake(sock, os.urandom(16))
    first_chunk = encode_message(1, b"z" * 2000, 1024)[0]
    sock.sendall(frame(0, b"whole") + first_chunk + frame(2, b"behind a gap"))
    assert receiver.wait_delivered(1, TIMEOUT)
    sock.shutdown(socket.SHUT_WR)  # a clean end, between frames
    assert closed_by_peer(sock)
    assert wait_for(lambda: receiver.session_count == 0)
    assert inbox.messages == [b"whole"]


def test_reorder_buffer_limit_closes_a_stuck_session(
    hostile_receiver_factory: Callable[..., tuple[MultiStreamReceiver, Inbox]],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
) -> None:
    receiver, inbox = hostile_receiver_factory(max_buffered_bytes=64 * 1024, idle_timeout=0.3)
    sock = raw_connections(receiver.address)
    handshake(sock, os.urandom(16))
    # Message 0 never comes; later ones pile up until the budget is spent.
    with contextlib.suppress(OSError):
        for message_id in range(1, 200):
            sock.sendall(frame(message_id, b"q" * 1000))
    assert closed_by_peer(sock)
    assert inbox.messages == []


def test_many_empty_messages_ahead_are_bounded_too(
    hostile_receiver_factory: Callable[..., tuple[MultiStreamReceiver, Inbox]],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
) -> None:
    receiver, _ = hostile_receiver_factory(max_buffered_bytes=64 * 1024, idle_timeout=0.3)
    sock = raw_connections(receiver.address)
    handshake(sock, os.urandom(16))
    with contextlib.suppress(OSError):
        sock.sendall(b"".join(frame(message_id, b"") for message_id in range(1, 2000)))
    assert closed_by_peer(sock)


# -- sessions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("acknowledged", [False, True], ids=["unacked", "acked"])
def test_a_late_hello_of_an_abandoned_attempt_does_not_replace_the_newer_session(
    receiver_factory: ReceiverFactory, acknowledged: bool
) -> None:
    """A stalled link delivers the HELLO of a start() its sender gave up on after the HELLO
    of the session it then opened: that older one is refused, the live one goes on."""
    receiver, inbox = receiver_factory()
    transport = MultiStreamTCPTransport(
        receiver.address, chunk_size=1024, acknowledged=acknowledged
    )
    try:
        transport.start()
        for seq in range(5):
            transport.send(b"first %d" % seq)
        transport.close()
        transport.start()  # the live session: its first id is 5
        transport.send(b"second 0")
        transport.flush()
        assert receiver.wait_delivered(6, TIMEOUT)
        # The HELLO of an attempt before it (first id 4), arriving only now.
        with socket.create_connection(receiver.address, timeout=TIMEOUT) as stale:
            stale.sendall(
                wire.pack_handshake(
                    os.urandom(16),
                    0,
                    1,
                    acknowledged=acknowledged,
                    sender_id=transport._sender_id,
                    first_id=4,
                )
            )
            status = wire.parse_welcome(stale.recv(wire.WELCOME.size, socket.MSG_WAITALL))
            assert status == wire.STATUS_REFUSED
            assert stale.recv(1) == b""  # closed after refusing
        for seq in range(1, 50):
            transport.send(b"second %d" % seq)
        transport.flush()
        assert receiver.wait_delivered(55, TIMEOUT)
        transport.health_check()
    finally:
        transport.close()
    assert inbox.messages == [b"first %d" % s for s in range(5)] + [
        b"second %d" % s for s in range(50)
    ]


def test_session_limit_and_duplicate_streams_are_refused(
    hostile_receiver_factory: Callable[..., tuple[MultiStreamReceiver, Inbox]],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
) -> None:
    receiver, _ = hostile_receiver_factory(max_sessions=1)
    session = os.urandom(16)
    first = raw_connections(receiver.address)
    assert handshake(first, session, 0, 2) == wire.STATUS_ACCEPTED
    duplicate = raw_connections(receiver.address)
    duplicate.sendall(wire.pack_handshake(session, 0, 2, acknowledged=False))
    assert closed_by_peer(duplicate)
    disagreeing = raw_connections(receiver.address)
    disagreeing.sendall(wire.pack_handshake(session, 1, 3, acknowledged=False))
    assert closed_by_peer(disagreeing)
    other = raw_connections(receiver.address)
    assert handshake(other, os.urandom(16)) == wire.STATUS_BUSY
    assert closed_by_peer(other)
    assert receiver.session_count == 1  # the refusals did not touch the first session


def test_stop_closes_every_connection_promptly_and_restarts_on_the_same_port(
    hostile_receiver_factory: Callable[..., tuple[MultiStreamReceiver, Inbox]],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
) -> None:
    receiver, inbox = hostile_receiver_factory(idle_timeout=None)
    address = receiver.address
    silent = raw_connections(address)
    joined = raw_connections(address)
    handshake(joined, os.urandom(16))
    joined.sendall(frame(0, b"x" * 100)[:50])
    began = time.monotonic()
    receiver.stop()
    # Below the 5 s that stop() gives threads it did not wake before it leaves them: with
    # idle_timeout=None, a reader whose connection stop() did not close waits for ever.
    assert time.monotonic() - began < 4.0
    assert closed_by_peer(silent) and closed_by_peer(joined)
    assert not [t for t in threading.enumerate() if t.name.startswith("dwcp-receiver")]
    receiver.stop()  # idempotent
    receiver.start()
    assert receiver.address == address
    sock = raw_connections(address)
    handshake(sock, os.urandom(16))
    sock.sendall(frame(0, b"again"))
    assert receiver.wait_delivered(1, TIMEOUT)
    assert inbox.messages == [b"again"]


@pytest.mark.parametrize("acknowledged", [False, True])
def test_stop_drops_the_messages_not_yet_handed_on_also_those_its_thread_took(
    acknowledged: bool,
) -> None:
    """stop() drops what was not yet handed to on_message, and its threads are joined once
    the on_message in progress returns. Outside attack on #22: the delivery thread kept
    handing on the messages it had taken before stop() (2,093 of 3,000 during a stop() that
    took 5 s, and calls after it returned), and outlived it."""
    first, go_on = threading.Event(), threading.Event()
    began, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def on_message(data: bytes) -> None:
        calls.append(len(data))
        if len(calls) == 1:
            first.set()
            assert go_on.wait(TIMEOUT)  # the rest arrive meanwhile
        elif not began.is_set():
            began.set()  # the thread holds the other 198 it took, not yet handed on
            assert release.wait(TIMEOUT)

    receiver = MultiStreamReceiver(on_message=on_message)
    receiver.start()
    transport = MultiStreamTCPTransport(
        receiver.address, streams=2, acknowledged=acknowledged, close_timeout=0.1
    )
    stopper = threading.Thread(target=receiver.stop, name="test-stop")
    try:
        transport.start()
        transport.send(b"m" * 100)
        assert first.wait(TIMEOUT)
        for _ in range(199):
            transport.send(b"m" * 100)
        (session,) = receiver._table.sessions.values()
        wait_until(lambda: session.reassembly.pending == 199, timeout=TIMEOUT)
        go_on.set()  # the thread's next take() holds all 199
        assert began.wait(TIMEOUT)
        assert session.reassembly.pending == 0
        handed_on = len(calls)
        stopper.start()
        wait_until(lambda: session.reassembly.dropped)
        release.set()
        stopper.join(TIMEOUT)
        assert not stopper.is_alive()
        assert len(calls) == handed_on  # none after the one in progress when stop() began
        assert not [t for t in threading.enumerate() if t.name.startswith("dwcp-receiver")]
    finally:
        release.set()
        transport.close()
        receiver.stop()


def test_stop_returns_at_its_deadline_while_an_on_message_still_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """stop()'s docstring: every thread is joined within one deadline; an on_message still
    running then holds its thread past it, and stop() returns anyway."""
    from dwcp.transport import receiver as receiver_module

    monkeypatch.setattr(receiver_module, "_STOP_JOIN_TIMEOUT", 0.2)
    inside, release = threading.Event(), threading.Event()

    def on_message(data: bytes) -> None:
        inside.set()
        assert release.wait(TIMEOUT)

    receiver = MultiStreamReceiver(on_message=on_message)
    receiver.start()
    transport = MultiStreamTCPTransport(receiver.address, streams=1, close_timeout=0.1)
    try:
        transport.start()
        transport.send(b"slow")
        assert inside.wait(TIMEOUT)
        receiver.stop()  # returns with on_message still inside
        assert not release.is_set()
        held = [t for t in threading.enumerate() if t.name.startswith("dwcp-receiver-deliver")]
        assert len(held) == 1
        release.set()
        held[0].join(TIMEOUT)
        assert not held[0].is_alive()
    finally:
        release.set()
        transport.close()
        receiver.stop()


def test_stop_from_on_message_stops_the_receiver_and_its_thread_ends_on_return() -> None:
    """stop() may be called from on_message: it joins every other thread, and the calling
    delivery thread ends when on_message returns (it used to raise RuntimeError, "cannot
    join current thread")."""
    errors: list[BaseException] = []
    stopped = threading.Event()
    delivered: list[bytes] = []

    def on_message(data: bytes) -> None:
        delivered.append(data)
        if stopped.is_set():
            return
        try:
            receiver.stop()
        except BaseException as exc:  # noqa: BLE001 - reported by the asserts below
            errors.append(exc)
        stopped.set()

    receiver = MultiStreamReceiver(on_message=on_message)
    receiver.start()
    transport = MultiStreamTCPTransport(receiver.address, streams=1, close_timeout=0.1)
    try:
        transport.start()
        transport.send(b"stop")
        assert stopped.wait(TIMEOUT)
        assert errors == []
        assert "running" not in repr(receiver).split()
        wait_until(
            lambda: not [t for t in threading.enumerate() if t.name.startswith("dwcp-receiver")]
        )
    finally:
        transport.close()
    receiver.start()  # and it starts again, on the same port
    try:
        again = MultiStreamTCPTransport(receiver.address, streams=1, close_timeout=0.1)
        again.start()
        again.send(b"again")
        assert receiver.wait_delivered(2, TIMEOUT)
        again.close()
    finally:
        receiver.stop()
    assert delivered == [b"stop", b"again"]


def test_acknowledgements_come_back_on_the_first_chunks_stream(
    hostile_receiver_factory: Callable[..., tuple[MultiStreamReceiver, Inbox]],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
) -> None:
    receiver, _ = hostile_receiver_factory()
    session = os.urandom(16)
    streams = [raw_connections(receiver.address) for _ in range(2)]
    for index, sock in enumerate(streams):
        handshake(sock, session, index, 2, ack=True)
    chunk0, chunk1 = encode_message(0, b"k" * 2000, 1024)
    streams[0].sendall(chunk1)
    streams[1].sendall(chunk0)
    assert wire.parse_ack(streams[1].recv(wire.ACK.size, socket.MSG_WAITALL)) == 0


def test_constructor_validation() -> None:
    with pytest.raises(TypeError, match="on_message"):
        MultiStreamReceiver(on_message=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="idle_timeout"):
        MultiStreamReceiver(on_message=print, idle_timeout=0)
    with pytest.raises(ValueError, match="max_sessions"):
        MultiStreamReceiver(on_message=print, max_sessions=0)
    with pytest.raises(ValueError, match="max_message_size"):
        MultiStreamReceiver(on_message=print, max_message_size=-1)
    with pytest.raises(DWCPError, match="not started"):
        _ = MultiStreamReceiver(on_message=print).address


def wait_for(condition: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            return False
        pause.wait(0.005)
    return True


def test_a_half_closed_sender_still_gets_its_acknowledgement(
    hostile_receiver_factory: Callable[..., tuple[MultiStreamReceiver, Inbox]],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
) -> None:
    gate = threading.Event()
    receiver, _ = hostile_receiver_factory(on_message=lambda data: gate.wait(TIMEOUT))
    sock = raw_connections(receiver.address)
    handshake(sock, os.urandom(16), ack=True)
    sock.sendall(frame(0, b"last words"))
    sock.shutdown(socket.SHUT_WR)  # done sending; still reading (docs/wire-format.md, ACK)
    # The stream's reader has seen the end and left before the message is delivered.
    assert wait_for(
        lambda: not [t for t in threading.enumerate() if t.name.startswith("dwcp-receiver-conn")]
    )
    gate.set()
    assert wire.parse_ack(sock.recv(wire.ACK.size, socket.MSG_WAITALL)) == 0
    assert closed_by_peer(sock)


# -- what is whole and in order is delivered, whatever ends the session -------------------------


def _damaged(kind: str) -> bytes:
    """Message 2 (``two``) as one DATA frame, damaged in the way ``kind`` names."""
    good = frame(2, b"two")
    if kind == "header-checksum":
        return good[:36] + bytes([good[36] ^ 0x01]) + good[37:]
    if kind == "payload-checksum":
        return good[:-1] + b"X"
    assert kind == "unknown-type"
    return _seal(good[:5] + b"\x09" + good[6:40]) + good[40:]


@pytest.mark.parametrize("acknowledged", [False, True], ids=["unacked", "acked"])
@pytest.mark.parametrize("kind", ["header-checksum", "payload-checksum", "unknown-type"])
def test_messages_whole_before_a_bad_frame_in_the_same_read_are_delivered(
    hostile_receiver_factory: Callable[..., tuple[MultiStreamReceiver, Inbox]],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
    kind: str,
    acknowledged: bool,
) -> None:
    """wire-format.md, Closing: a protocol error closes the session; messages already whole
    and in order are still delivered, nothing else is."""
    receiver, inbox = hostile_receiver_factory()
    sock = raw_connections(receiver.address)
    handshake(sock, os.urandom(16), ack=acknowledged)
    sock.sendall(frame(0, b"zero") + frame(1, b"one") + _damaged(kind))  # one write, one read
    assert closed_by_peer(sock)
    assert wait_for(lambda: receiver.session_count == 0)  # its delivery is over
    assert inbox.messages == [b"zero", b"one"]


def test_messages_whole_when_streams_fail_to_join_are_delivered(
    hostile_receiver_factory: Callable[..., tuple[MultiStreamReceiver, Inbox]],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
) -> None:
    """A session whose announced streams do not all join within join_timeout is closed;
    what its joined streams brought whole and in order is still delivered."""
    gate, inbox = threading.Event(), Inbox()

    def slow(data: bytes) -> None:
        inbox(data)
        gate.wait(TIMEOUT)  # "zero" is in on_message while the session is closed

    receiver, _ = hostile_receiver_factory(join_timeout=2.0, idle_timeout=60.0, on_message=slow)
    sock = raw_connections(receiver.address)
    handshake(sock, os.urandom(16), 0, 2)  # stream 1 of 2 never comes
    partial = encode_message(2, b"z" * 2000, 1024)[0]
    sock.sendall(frame(0, b"zero"))
    assert wait_for(lambda: inbox.messages == [b"zero"])
    sock.sendall(frame(1, b"one") + partial)  # "one" waits for on_message to return
    assert closed_by_peer(sock)  # join_timeout passed: the session is closed
    gate.set()
    assert wait_for(lambda: receiver.session_count == 0)
    assert inbox.messages == [b"zero", b"one"]


def test_one_ack_covers_at_most_128_messages(
    hostile_receiver_factory: Callable[..., tuple[MultiStreamReceiver, Inbox]],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """wire-format.md, ACK: once 128 messages are delivered and unacknowledged, one ACK
    covers them, even when they came in batches that do not add up to 128."""
    # Only the count triggers an ACK: not the delay, nor a consumer that looks slow because
    # the machine is busy (over 0.1 ms a message: each is then acknowledged on its own).
    monkeypatch.setattr(_receiving, "ACK_DELAY", 3600.0)
    monkeypatch.setattr(_handing, "_SLOW", 3600.0)
    receiver, _ = hostile_receiver_factory()
    sock = raw_connections(receiver.address)
    handshake(sock, os.urandom(16), ack=True)
    sock.sendall(b"".join(frame(mid, b"%d" % mid) for mid in range(63)))
    assert receiver.wait_delivered(63, TIMEOUT)  # 63 unacknowledged
    sock.sendall(b"".join(frame(mid, b"%d" % mid) for mid in range(63, 300)))
    assert receiver.wait_delivered(300, TIMEOUT)
    acks = [wire.parse_ack(sock.recv(wire.ACK.size, socket.MSG_WAITALL)) for _ in range(2)]
    assert acks == [127, 255]


@pytest.mark.parametrize(
    "prefix",
    [b"DWCQ\x03\x03\x00\x00", b"DWCP\x02\x03\x00\x00", b"DWCP\x03\x03\x00\x04"],
    ids=["bad-magic", "bad-version", "unknown-flag"],
)
def test_a_bad_data_prefix_closes_the_session_at_8_bytes(
    hostile_receiver_factory: Callable[..., tuple[MultiStreamReceiver, Inbox]],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
    prefix: bytes,
) -> None:
    """wire-format.md, Conventions: a prefix is checked as soon as its 8 bytes are in, even
    where the type byte says DATA (whose header is 40 bytes)."""
    receiver, _ = hostile_receiver_factory(idle_timeout=60.0)
    sock = raw_connections(receiver.address)
    handshake(sock, os.urandom(16))
    sock.sendall(prefix)  # nothing more
    assert closed_by_peer(sock, TIMEOUT)


@pytest.mark.parametrize(
    "prefix",
    [b"DWCP\x03\x01\x00\x02", b"DWCP\x03\x01\x80\x00"],
    ids=["flag-0x0002", "flag-0x8000"],
)
def test_a_hello_prefix_with_an_unknown_flag_is_refused_at_8_bytes(
    hostile_receiver_factory: Callable[..., tuple[MultiStreamReceiver, Inbox]],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
    prefix: bytes,
) -> None:
    """wire-format.md, Conventions: flags are part of the prefix and checked with it."""
    receiver, _ = hostile_receiver_factory(idle_timeout=60.0)
    sock = raw_connections(receiver.address)
    sock.sendall(prefix)
    sock.settimeout(TIMEOUT)
    assert sock.recv(100) == b""  # closed, no WELCOME


def test_a_half_joined_session_frees_its_slot_when_its_streams_close(
    hostile_receiver_factory: Callable[..., tuple[MultiStreamReceiver, Inbox]],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
) -> None:
    """wire-format.md, HELLO: a session whose joined streams all ended before the others
    joined is over at once, not after join_timeout; it no longer counts toward max_sessions."""
    receiver, _ = hostile_receiver_factory(max_sessions=1, join_timeout=60.0, idle_timeout=60.0)
    session = os.urandom(16)
    first = raw_connections(receiver.address)
    assert handshake(first, session, 0, 3) == wire.STATUS_ACCEPTED
    other = raw_connections(receiver.address)
    assert handshake(other, os.urandom(16)) == wire.STATUS_BUSY  # the slot is taken
    first.close()  # the sender gave up: stream 1 and 2 never come
    assert wait_for(lambda: receiver.session_count == 0)
    late = raw_connections(receiver.address)
    assert handshake(late, session, 1, 3) == wire.STATUS_REFUSED  # that session is over
    again = raw_connections(receiver.address)
    assert handshake(again, os.urandom(16)) == wire.STATUS_ACCEPTED


# -- the handshake, settled ---------------------------------------------------------------------


def _sealed_hello(
    *, flags: int = 0, index: int = 0, count: int = 1, first_id: int = 0, crc: bool = True
) -> bytes:
    packed = wire.HANDSHAKE.pack(
        wire.MAGIC, wire.VERSION, wire.FRAME_HELLO, flags, os.urandom(16), os.urandom(16),
        first_id, index, count, 0, 0,
    )  # fmt: skip
    return _seal(packed) if crc else packed


@pytest.mark.parametrize(
    "hello",
    [
        _sealed_hello(crc=False),
        _sealed_hello(count=0),
        _sealed_hello(count=33),
        _sealed_hello(index=4, count=4),
        _sealed_hello(flags=0x0004),
        _sealed_hello(first_id=1 << 63),
    ],
    ids=["bad-crc", "count-0", "count-33", "index-not-below-count", "unknown-flag", "first-id"],
)
def test_a_malformed_hello_is_closed_without_a_welcome(
    hostile_receiver_factory: Callable[..., tuple[MultiStreamReceiver, Inbox]],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
    hello: bytes,
) -> None:
    """wire-format.md, HELLO: a malformed HELLO gets no WELCOME; the connection is closed."""
    receiver, _ = hostile_receiver_factory()
    sock = raw_connections(receiver.address)
    sock.sendall(hello)
    sock.settimeout(TIMEOUT)
    assert sock.recv(100) == b""
    assert receiver.session_count == 0


@pytest.mark.parametrize("field", ["sender_id", "first_id"])
def test_a_stream_disagreeing_on_sender_or_first_id_is_refused(
    hostile_receiver_factory: Callable[..., tuple[MultiStreamReceiver, Inbox]],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
    field: str,
) -> None:
    """wire-format.md, HELLO: count, flags, sender id and first id are the same on every
    stream; a stream that disagrees gets status 2 and the session goes on."""
    receiver, inbox = hostile_receiver_factory()
    session, sender = os.urandom(16), os.urandom(16)
    first = raw_connections(receiver.address)
    first.sendall(wire.pack_handshake(session, 0, 2, acknowledged=False, sender_id=sender))
    assert wire.parse_welcome(first.recv(wire.WELCOME.size, socket.MSG_WAITALL)) == 0
    other: dict[str, Any] = {"sender_id": sender, "first_id": 0}
    other[field] = os.urandom(16) if field == "sender_id" else 7
    odd = raw_connections(receiver.address)
    odd.sendall(wire.pack_handshake(session, 1, 2, acknowledged=False, **other))
    assert wire.parse_welcome(odd.recv(wire.WELCOME.size, socket.MSG_WAITALL)) == 2
    assert odd.recv(1) == b""
    second = raw_connections(receiver.address)
    second.sendall(wire.pack_handshake(session, 1, 2, acknowledged=False, sender_id=sender))
    assert wire.parse_welcome(second.recv(wire.WELCOME.size, socket.MSG_WAITALL)) == 0
    second.sendall(frame(0, b"zero"))
    assert receiver.wait_delivered(1, TIMEOUT)
    assert inbox.messages == [b"zero"]


def test_refused_comes_before_busy(
    hostile_receiver_factory: Callable[..., tuple[MultiStreamReceiver, Inbox]],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
) -> None:
    """wire-format.md, WELCOME: a HELLO that is refused for what it says gets status 2 even
    while the receiver is full (busy is for a HELLO that could be accepted later)."""
    receiver, _ = hostile_receiver_factory(max_sessions=1)
    sender = os.urandom(16)
    live = raw_connections(receiver.address)
    live.sendall(
        wire.pack_handshake(os.urandom(16), 0, 1, acknowledged=True, sender_id=sender, first_id=5)
    )
    assert wire.parse_welcome(live.recv(wire.WELCOME.size, socket.MSG_WAITALL)) == 0
    stale = raw_connections(receiver.address)  # an abandoned attempt of the same sender
    stale.sendall(
        wire.pack_handshake(os.urandom(16), 0, 1, acknowledged=True, sender_id=sender, first_id=4)
    )
    assert wire.parse_welcome(stale.recv(wire.WELCOME.size, socket.MSG_WAITALL)) == 2
    stranger = raw_connections(receiver.address)
    assert handshake(stranger, os.urandom(16)) == wire.STATUS_BUSY


def test_a_closed_session_counts_toward_max_sessions_until_its_delivery_is_over(
    hostile_receiver_factory: Callable[..., tuple[MultiStreamReceiver, Inbox]],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
) -> None:
    """wire-format.md, Limits: a session counts from its accepted HELLO until everything
    it holds whole and in order was handed to on_message."""
    gate = threading.Event()
    receiver, _ = hostile_receiver_factory(max_sessions=1, on_message=lambda _: gate.wait(TIMEOUT))
    sock = raw_connections(receiver.address)
    handshake(sock, os.urandom(16))
    sock.sendall(frame(0, b"zero"))
    sock.close()  # the session's only stream ended; on_message still holds "zero"
    busy = raw_connections(receiver.address)
    assert handshake(busy, os.urandom(16)) == wire.STATUS_BUSY
    gate.set()
    assert wait_for(lambda: receiver.session_count == 0)
    free = raw_connections(receiver.address)
    assert handshake(free, os.urandom(16)) == wire.STATUS_ACCEPTED


def test_duplicates_are_dropped_for_unacknowledged_named_senders_too(
    hostile_receiver_factory: Callable[..., tuple[MultiStreamReceiver, Inbox]],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
) -> None:
    """wire-format.md, Replay: the receiver drops messages below its position for every
    named sender, acknowledged or not (at most once stays at most once)."""
    receiver, inbox = hostile_receiver_factory()
    sender = os.urandom(16)
    first = raw_connections(receiver.address)
    first.sendall(wire.pack_handshake(os.urandom(16), 0, 1, acknowledged=False, sender_id=sender))
    assert wire.parse_welcome(first.recv(wire.WELCOME.size, socket.MSG_WAITALL)) == 0
    first.sendall(b"".join(frame(mid, b"%d" % mid) for mid in range(5)))
    assert receiver.wait_delivered(5, TIMEOUT)
    first.close()
    again = raw_connections(receiver.address)
    again.sendall(
        wire.pack_handshake(os.urandom(16), 0, 1, acknowledged=False, sender_id=sender, first_id=3)
    )
    assert wire.parse_welcome(again.recv(wire.WELCOME.size, socket.MSG_WAITALL)) == 0
    again.sendall(b"".join(frame(mid, b"%d" % mid) for mid in range(3, 6)))
    assert receiver.wait_delivered(6, TIMEOUT)
    assert inbox.messages == [b"%d" % mid for mid in range(6)]
    assert receiver.duplicates_dropped == 2


# -- starting and accepting ---------------------------------------------------------------------


@pytest.mark.parametrize("host", ["no-such-host.invalid", "256.1.1.1"], ids=["dns", "ip"])
def test_start_on_a_bad_host_raises_listen_failed(host: str) -> None:
    """README, errors: start() that cannot resolve or bind raises TransportError
    LISTEN_FAILED with the socket error as its cause. (A host IDNA cannot encode is a
    ValueError at construction: tests/unit/test_host_names.py.)"""
    receiver = MultiStreamReceiver((host, 0), on_message=print)
    with pytest.raises(TransportError, match="cannot listen") as caught:
        receiver.start()
    assert caught.value.code == "LISTEN_FAILED"
    assert isinstance(caught.value.__cause__, OSError)
    assert "running" not in repr(receiver).split()  # nothing was started
    receiver.stop()  # a no-op


def test_start_on_a_busy_port_raises_listen_failed(receiver_factory: ReceiverFactory) -> None:
    taken, _ = receiver_factory()
    receiver = MultiStreamReceiver(taken.address, on_message=print)
    with pytest.raises(TransportError) as caught:
        receiver.start()
    assert caught.value.code == "LISTEN_FAILED"
    assert isinstance(caught.value.__cause__, OSError)


@pytest.mark.parametrize(
    "code",
    [errno.ECONNABORTED, errno.EPROTO, errno.ENETDOWN, errno.EHOSTUNREACH, errno.EINVAL],
    ids=["ECONNABORTED", "EPROTO", "ENETDOWN", "EHOSTUNREACH", "unlisted-EINVAL"],
)
def test_the_accept_loop_survives_an_accept_error(
    receiver_factory: ReceiverFactory, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """An error from accept() (accept(2) lists the transient ones) does not end the accept
    thread: the receiver goes on accepting while it says it is running."""
    receiver, inbox = receiver_factory()
    real_accept = socket.socket.accept
    failed = threading.Event()

    def accept_failing_once(sock: socket.socket) -> tuple[socket.socket, Any]:
        if not failed.is_set() and sock.getsockname()[:2] == receiver.address:
            failed.set()
            raise OSError(code, os.strerror(code))
        return real_accept(sock)

    monkeypatch.setattr(socket.socket, "accept", accept_failing_once)
    transport = MultiStreamTCPTransport(
        receiver.address, streams=2, connect_timeout=TIMEOUT, acknowledged=True
    )
    try:
        transport.start()
        assert failed.is_set()
        transport.send(b"accepted after the error", wait=True)
    finally:
        transport.close()
    assert inbox.messages == [b"accepted after the error"]


def test_a_replaced_unacknowledged_session_still_delivers_what_its_streams_hold(
    hostile_receiver_factory: Callable[..., tuple[MultiStreamReceiver, Inbox]],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
) -> None:
    """wire-format.md, Replay: a new session of an unacknowledged sender does not cut off the
    old one; its streams are read to their end (the sender closed them), and everything
    is delivered in order, the old session's messages first."""
    gate, inbox = threading.Event(), Inbox()

    def slow(data: bytes) -> None:
        gate.wait(TIMEOUT)
        inbox(data)

    receiver, _ = hostile_receiver_factory(
        on_message=slow, max_buffered_bytes=64 * 1024, idle_timeout=60.0
    )
    sender = os.urandom(16)
    old = raw_connections(receiver.address)
    old.sendall(wire.pack_handshake(os.urandom(16), 0, 1, acknowledged=False, sender_id=sender))
    assert wire.parse_welcome(old.recv(wire.WELCOME.size, socket.MSG_WAITALL)) == 0
    payloads = [bytes([mid]) * 16 * 1024 for mid in range(10)]
    # More than the budget: most of it stays in the kernel while on_message holds the first.
    old.sendall(b"".join(frame(mid, payloads[mid]) for mid in range(10)))
    old.close()  # what a sender's close() does; its start() comes next
    new = raw_connections(receiver.address)
    new.sendall(
        wire.pack_handshake(os.urandom(16), 0, 1, acknowledged=False, sender_id=sender, first_id=10)
    )
    assert wire.parse_welcome(new.recv(wire.WELCOME.size, socket.MSG_WAITALL)) == 0
    new.sendall(frame(10, b"new"))
    gate.set()
    assert receiver.wait_delivered(11, TIMEOUT)
    assert inbox.messages == [*payloads, b"new"]


def test_a_replaced_unacknowledged_session_whose_streams_stay_open_is_closed_when_it_stalls(
    hostile_receiver_factory: Callable[..., tuple[MultiStreamReceiver, Inbox]],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
) -> None:
    """wire-format.md, Replay: a replaced session whose streams do not end (a dead link) is
    closed once it made no progress for 1 s; then the new session delivers."""
    receiver, inbox = hostile_receiver_factory(idle_timeout=60.0)
    sender = os.urandom(16)
    old = raw_connections(receiver.address)
    old.sendall(wire.pack_handshake(os.urandom(16), 0, 1, acknowledged=False, sender_id=sender))
    assert wire.parse_welcome(old.recv(wire.WELCOME.size, socket.MSG_WAITALL)) == 0
    old.sendall(frame(0, b"old"))
    assert receiver.wait_delivered(1, TIMEOUT)
    new = raw_connections(receiver.address)
    new.sendall(
        wire.pack_handshake(os.urandom(16), 0, 1, acknowledged=False, sender_id=sender, first_id=1)
    )
    assert wire.parse_welcome(new.recv(wire.WELCOME.size, socket.MSG_WAITALL)) == 0
    new.sendall(frame(1, b"new"))
    assert closed_by_peer(old, TIMEOUT)  # the old stream never ended: closed by the receiver
    assert receiver.wait_delivered(2, TIMEOUT)
    assert inbox.messages == [b"old", b"new"]


def _listening(address: tuple[str, int]) -> bool:
    with socket.socket() as probe:
        probe.settimeout(TIMEOUT)
        return probe.connect_ex(address) == 0


def _receiver_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("dwcp-receiver")]


def test_start_while_stop_joins_waits_for_it_and_runs_cleanly() -> None:
    """A start() racing a stop() (the outside attack wedged 4-8 of 300 races: a listening
    port that stop() could no longer close, stop() raising AssertionError) waits for the
    stop to finish, then starts; a later stop() closes everything."""
    receiver = MultiStreamReceiver(on_message=lambda data: None)
    receiver.start()
    address = receiver.address
    joining, proceed = threading.Event(), threading.Event()
    accept_thread = receiver._accept_thread
    assert accept_thread is not None

    class GatedJoin:  # holds stop() inside its join of the accept thread
        def join(self, timeout: float | None = None) -> None:
            joining.set()
            assert proceed.wait(TIMEOUT)
            assert accept_thread is not None
            accept_thread.join(timeout)

    receiver._accept_thread = GatedJoin()  # type: ignore[assignment]
    errors: list[BaseException] = []

    def call(method: Callable[[], None]) -> threading.Thread:
        def run() -> None:
            try:
                method()
            except BaseException as exc:  # noqa: BLE001 - reported by the asserts below
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    stopping = call(receiver.stop)
    assert joining.wait(TIMEOUT)
    starting = call(receiver.start)
    starting.join(0.2)
    assert starting.is_alive(), "start() returned while stop() was still stopping"
    proceed.set()
    stopping.join(TIMEOUT)
    starting.join(TIMEOUT)
    assert errors == []
    assert "running" in repr(receiver).split()
    assert _listening(address)
    receiver.stop()
    assert not _listening(address)
    wait_until(lambda: not _receiver_threads())
    receiver.start()  # and it starts again on the same port
    assert receiver.address == address
    receiver.stop()


def test_stop_while_start_binds_waits_for_the_start_then_stops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dwcp.transport import receiver as receiver_module

    binding, proceed = threading.Event(), threading.Event()
    real_listen = receiver_module.listen  # type: ignore[attr-defined]

    def slow_listen(host: str, port: int) -> socket.socket:
        binding.set()
        assert proceed.wait(TIMEOUT)
        return real_listen(host, port)

    monkeypatch.setattr(receiver_module, "listen", slow_listen)
    receiver = MultiStreamReceiver(on_message=lambda data: None)
    starting = threading.Thread(target=receiver.start)
    starting.start()
    assert binding.wait(TIMEOUT)
    stopping = threading.Thread(target=receiver.stop)
    stopping.start()
    with pytest.raises(DWCPError) as second:  # starting counts as started
        receiver.start()
    assert second.value.code == "ALREADY_STARTED"
    proceed.set()
    starting.join(TIMEOUT)
    stopping.join(TIMEOUT)
    assert not starting.is_alive() and not stopping.is_alive()
    assert "running" not in repr(receiver).split()
    assert not _listening(receiver.address)
    wait_until(lambda: not _receiver_threads())


def test_start_and_stop_from_many_threads_leave_one_consistent_receiver() -> None:
    receiver = MultiStreamReceiver(on_message=lambda data: None)
    receiver.start()
    address = receiver.address
    unexpected: list[BaseException] = []

    def churn(seed: int) -> None:
        for i in range(40):
            try:
                receiver.start() if (i + seed) % 2 else receiver.stop()
            except DWCPError as exc:
                if exc.code != "ALREADY_STARTED":
                    unexpected.append(exc)
            except BaseException as exc:  # noqa: BLE001 - reported by the asserts below
                unexpected.append(exc)

    threads = [threading.Thread(target=churn, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 4)
    assert unexpected == []
    receiver.stop()
    assert not _listening(address)
    wait_until(lambda: not _receiver_threads())
    receiver.start()
    assert _listening(address)
    receiver.stop()
