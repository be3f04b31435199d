"""Time and resource bounds of the transport: keepalive, send_timeout, deadlines, IPv6."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

import pytest

from dwcp._errors import TransportError
from dwcp.transport import MultiStreamReceiver, wire
from tests._frames import encode_message
from tests.conftest import (
    RawPeer,
    ReceiverFactory,
    TransportFactory,
    closed_by_peer,
    healthy,
    stays,
    wait_until,
)

TIMEOUT = 5.0


# -- keepalive --------------------------------------------------------------------------------


def test_a_quiet_link_outlives_the_receivers_idle_timeout(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    receiver, inbox = receiver_factory(idle_timeout=0.4)
    transport = transport_factory(
        receiver.address, streams=3, keepalive_interval=0.1, keepalive_timeout=1.0
    )
    transport.start()
    assert stays(lambda: healthy(transport) and receiver.session_count == 1, 1.5)
    transport.send(b"still here")
    assert receiver.wait_delivered(1, TIMEOUT)
    assert inbox.messages == [b"still here"]


def test_without_keepalive_the_idle_timeout_ends_a_quiet_session(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    receiver, _ = receiver_factory(idle_timeout=0.3)
    transport = transport_factory(receiver.address, keepalive_interval=None)
    transport.start()
    wait_until(lambda: not healthy(transport), TIMEOUT)


def test_a_receiver_that_vanished_silently_shows_in_health_check_in_time(
    raw_peer: Callable[..., RawPeer], transport_factory: TransportFactory
) -> None:
    # The peer keeps its sockets open and never answers: no FIN, no RST, like a host
    # that lost power or a partition.
    peer = raw_peer("stall")
    interval, timeout = 0.2, 0.3
    transport = transport_factory(
        peer.address, streams=2, keepalive_interval=interval, keepalive_timeout=timeout
    )
    began = time.monotonic()  # before start(): the streams are idle from their start on
    transport.start()
    wait_until(lambda: not healthy(transport), TIMEOUT)
    elapsed = time.monotonic() - began
    bound = interval + timeout + min(interval, timeout) / 4  # docs/wire-format.md
    # Never before the keepalive allows; the upper bound is generous (a loaded machine runs
    # the keepalive thread late), it only catches a keepalive that never fires.
    assert interval + timeout <= elapsed < bound + 3.0, elapsed
    with pytest.raises(TransportError, match="keepalive"):
        transport.health_check()


def test_a_slow_consumer_is_not_mistaken_for_a_vanished_receiver(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    # Readers wait for buffer room while on_message is slow: they say "alive" unprompted.
    gate = threading.Event()
    receiver, _ = receiver_factory(on_message=lambda data: gate.wait(), max_buffered_bytes=4096)
    transport = transport_factory(
        receiver.address, keepalive_interval=0.1, keepalive_timeout=0.3, send_timeout=5.0
    )
    transport.start()
    for _ in range(8):
        transport.send(b"x" * 2000)  # the first blocks on_message; the rest fill the budget
    try:
        assert stays(lambda: healthy(transport), 1.2)
    finally:
        gate.set()
    assert receiver.wait_delivered(8, TIMEOUT)


# -- send_timeout -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [b"s" * 1024, b"m" * (16 * 1024), b"l" * (64 * 1024), bytearray(1 << 20)],
    ids=["1KiB", "16KiB", "64KiB", "1MiB-mutable"],
)
def test_send_timeout_bounds_every_send_to_a_stalled_peer(
    raw_peer: Callable[..., RawPeer], transport_factory: TransportFactory, message: bytes
) -> None:
    peer = raw_peer("stall")
    send_timeout = 0.4
    transport = transport_factory(
        peer.address,
        streams=2,
        chunk_size=256 * 1024,
        send_timeout=send_timeout,
        keepalive_interval=None,  # without one, nothing written for send_timeout is a stall
    )
    transport.start()
    # A send waits at most send_timeout for room (then BACKPRESSURE, nothing sent); one that
    # waits for its own write (the mutable buffer) fails once nothing could be written for
    # send_timeout. Then the session is broken as stalled.
    longest = 0.0
    codes: list[str] = []
    for _ in range(100_000):  # far more than the socket buffers hold
        began = time.monotonic()
        try:
            transport.send(message)
        except TransportError as exc:
            codes.append(exc.code)
            if exc.code != "BACKPRESSURE":
                assert "stalled" in str(exc), exc
                break
        finally:
            longest = max(longest, time.monotonic() - began)
    assert codes and codes[-1] == "TRANSPORT_ERROR", codes
    assert longest < send_timeout * 2 + 2.0, longest  # generous: only catches an unbounded send
    assert not healthy(transport)


# -- receiver deadlines -----------------------------------------------------------------------


def test_a_hello_trickled_byte_by_byte_is_cut_off_at_handshake_timeout(
    receiver_factory: ReceiverFactory,
) -> None:
    receiver, _ = receiver_factory(handshake_timeout=0.4, idle_timeout=10.0)
    hello = wire.pack_handshake(os.urandom(16), 0, 1, acknowledged=False)
    sock = socket.create_connection(receiver.address, timeout=TIMEOUT)
    with sock:
        began = time.monotonic()
        sent = 0
        for byte in hello:  # one byte every 50 ms: each read is "active", the whole is not
            try:
                sock.send(bytes([byte]))
            except OSError:
                break  # the receiver closed the connection
            sent += 1
            if closed_by_peer(sock, 0.05):
                break
        cut_at = time.monotonic() - began
        assert closed_by_peer(sock, TIMEOUT)
    # Cut off while the HELLO still trickled in (its 60 bytes take 3 s at this pace), not
    # once it was whole; and not before handshake_timeout.
    assert sent < len(hello), "the receiver let the whole trickled HELLO in"
    assert cut_at > 0.35, cut_at


def test_a_session_whose_streams_never_all_join_is_closed(
    receiver_factory: ReceiverFactory,
) -> None:
    receiver, _ = receiver_factory(join_timeout=0.3, idle_timeout=10.0)
    sock = socket.create_connection(receiver.address, timeout=TIMEOUT)
    with sock:
        sock.sendall(wire.pack_handshake(os.urandom(16), 0, 32, acknowledged=False))
        assert wire.parse_welcome(sock.recv(wire.WELCOME.size, socket.MSG_WAITALL)) == 0
        assert receiver.session_count == 1
        # Within TIMEOUT (5 s): far below the idle_timeout (10 s) that would close it
        # if join_timeout did not.
        assert closed_by_peer(sock, TIMEOUT)
    wait_until(lambda: receiver.session_count == 0, TIMEOUT)


# A frame's payload below LARGE (32 KiB) is parsed out of the read buffer; one above it is
# read straight into pieces of its own (_reader.read_large): both paths count a stall.
FRAME_SIZES = pytest.mark.parametrize("size", [1000, 100_000], ids=["buffered", "large"])


def _joined(address: tuple[str, int]) -> socket.socket:
    """A raw connection that is the one stream of a new session (HELLO and WELCOME done)."""
    sock = socket.create_connection(address, timeout=TIMEOUT)
    sock.sendall(wire.pack_handshake(os.urandom(16), 0, 1, acknowledged=False))
    assert wire.parse_welcome(sock.recv(wire.WELCOME.size, socket.MSG_WAITALL)) == 0
    return sock


def _trickle(sock: socket.socket, data: bytes, pieces: int, gap: float) -> None:
    """Send ``data`` in ``pieces`` parts, ``gap`` seconds apart (a slow, healthy link)."""
    pace = threading.Event()  # the pace of the trickle is what is tested, never set
    step = -(-len(data) // pieces)
    for at in range(0, len(data), step):
        if at:
            pace.wait(gap)
        try:
            sock.sendall(data[at : at + step])
        except OSError as exc:
            raise AssertionError(
                f"the receiver cut off a frame still arriving, after {at} of its bytes"
            ) from exc


@FRAME_SIZES
def test_a_frame_that_keeps_trickling_in_is_delivered_however_long_it_takes(
    receiver_factory: ReceiverFactory, size: int
) -> None:
    frame_timeout = 0.6
    receiver, inbox = receiver_factory(frame_timeout=frame_timeout, idle_timeout=10.0)
    message = os.urandom(size)
    frame = encode_message(0, message, 1 << 20)[0]
    with _joined(receiver.address) as sock:
        began = time.monotonic()
        _trickle(sock, frame, 20, 0.1)  # a gap of 0.1 s is no stall of 0.6 s
        took = time.monotonic() - began
        assert receiver.wait_delivered(1, TIMEOUT)
        assert receiver.session_count == 1  # its stream still open
    assert inbox.messages == [message]
    # 19 gaps of at least 0.1 s: the frame took three frame_timeouts to arrive, and more.
    assert took > 3 * frame_timeout, took


@FRAME_SIZES
def test_a_frame_that_stops_midway_is_cut_off_once_nothing_came_for_frame_timeout(
    receiver_factory: ReceiverFactory, size: int
) -> None:
    frame_timeout = 0.6
    receiver, inbox = receiver_factory(frame_timeout=frame_timeout, idle_timeout=10.0)
    frame = encode_message(0, os.urandom(size), 1 << 20)[0]
    with _joined(receiver.address) as sock:
        # Its first half trickles in over longer than frame_timeout (not a stall)...
        _trickle(sock, frame[: len(frame) // 2], 10, 0.1)
        stopped = time.monotonic()
        # ...then nothing: cut off within TIMEOUT (5 s), far below the idle_timeout (10 s)
        # that would end it otherwise.
        assert closed_by_peer(sock, TIMEOUT)
        cut = time.monotonic() - stopped
    wait_until(lambda: receiver.session_count == 0, TIMEOUT)
    assert inbox.messages == []
    # Counted from the last byte: the receiver saw it at about ``stopped`` (the half bound
    # only allows for the test thread running late after its last send).
    assert cut > frame_timeout / 2, cut


# -- addresses --------------------------------------------------------------------------------


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_both_ends_work_over_ipv6_loopback(transport_factory: TransportFactory) -> None:
    received: list[bytes] = []
    receiver = MultiStreamReceiver(("::1", 0), on_message=received.append)
    receiver.start()
    try:
        assert receiver.address[0] == "::1"
        transport = transport_factory(receiver.address, streams=2)
        transport.start()
        messages = [os.urandom(n) for n in (0, 10, 5000)]
        for message in messages:
            transport.send(message)
        assert receiver.wait_delivered(3, TIMEOUT)
        assert received == messages
        transport.close()
    finally:
        receiver.stop()


def test_flush_waits_until_everything_queued_is_written(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    receiver, inbox = receiver_factory()
    transport = transport_factory(receiver.address, streams=2)
    with pytest.raises(TransportError, match="not started"):
        transport.flush()
    transport.start()
    for i in range(1000):
        transport.send(b"%d" % i)
    transport.flush(TIMEOUT)
    assert receiver.wait_delivered(1000, TIMEOUT)
    assert inbox.messages == [b"%d" % i for i in range(1000)]
