"""Backpressure on real loopback sockets (issue 22): a slow or blocked consumer only slows the
senders. A send that gets no room within its send_timeout fails alone (``BACKPRESSURE``,
nothing of it sent) and the session lives; room goes first come, first served; every send
that returned is delivered."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable

import pytest

from dwcp import TransportError
from tests.conftest import (
    RawPeer,
    ReceiverFactory,
    TransportFactory,
    healthy,
    stays,
    wait_until,
)

TIMEOUT = 30.0
MiB = 1 << 20


class Recorder:
    """An ``on_message`` that records each message's 8-byte tag (thread, sequence), first
    blocking on ``gate`` and sleeping ``delay`` seconds (the slow consumer)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()
        self.tags: list[tuple[int, int]] = []
        self.sizes: list[int] = []
        self._pause = threading.Event()  # never set: a sleep that is the consumer's work

    def __call__(self, data: bytes) -> None:
        self.gate.wait(TIMEOUT)
        if self.delay:
            self._pause.wait(self.delay)
        self.tags.append(struct.unpack_from("!II", data))
        self.sizes.append(len(data))


def message(thread: int, seq: int, size: int) -> bytes:
    return struct.pack("!II", thread, seq) + bytes(size - 8)


def test_a_blocked_consumer_only_slows_senders(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    # The consumer blocks far longer than send_timeout. Sends fail alone with BACKPRESSURE
    # once the buffers on the way are full; the session stays up (the receiver's readers,
    # waiting for room, say "alive" every keepalive interval), and once the consumer goes on
    # every send that returned is delivered, in order.
    recorder = Recorder()
    recorder.gate.clear()
    receiver, _ = receiver_factory(on_message=recorder, max_buffered_bytes=64 * 1024)
    transport = transport_factory(
        receiver.address, streams=4, chunk_size=64 * 1024, send_timeout=0.3, keepalive_interval=0.1
    )
    transport.start()
    sent: list[tuple[int, int]] = []
    codes: list[str] = []
    try:
        for seq in range(1_000_000):  # bounded; far more than the buffers on the way hold
            try:
                transport.send(message(0, seq, 16 * 1024))
            except TransportError as exc:
                codes.append(exc.code)
                if len(codes) == 3:
                    break
                continue
            sent.append((0, seq))
        assert codes == ["BACKPRESSURE"] * 3, codes
        assert stays(lambda: healthy(transport), 1.5)  # blocked 5 send_timeouts more
    finally:
        recorder.gate.set()
    transport.flush(TIMEOUT)
    assert receiver.wait_delivered(len(sent), TIMEOUT)
    assert recorder.tags == sent
    assert healthy(transport)


def test_a_slow_consumer_loses_nothing_that_send_returned_for(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    # The fault-matrix cell: unacknowledged, 4 streams, 0.5 ms a message at the
    # receiver, senders far faster: frames wait in the queues longer than send_timeout.
    recorder = Recorder(delay=0.0005)
    receiver, _ = receiver_factory(on_message=recorder)
    transport = transport_factory(
        receiver.address, streams=4, chunk_size=64 * 1024, send_timeout=0.3
    )
    transport.start()
    returned: list[list[int]] = [[] for _ in range(4)]
    errors: list[TransportError] = []

    def sender(number: int) -> None:
        for seq in range(750):
            try:
                transport.send(message(number, seq, 16 * 1024))
            except TransportError as exc:
                errors.append(exc)
                continue
            returned[number].append(seq)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not [t for t in threads if t.is_alive()]
    assert {e.code for e in errors} <= {"BACKPRESSURE"}, errors[:3]
    assert healthy(transport)
    transport.flush(TIMEOUT)
    total = sum(map(len, returned))
    assert receiver.wait_delivered(total, TIMEOUT)
    for number in range(4):
        assert [seq for n, seq in recorder.tags if n == number] == returned[number]
    assert len(recorder.tags) == total


def test_many_threads_sending_large_messages_do_not_break_the_link(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    # 32 threads, an 8 MiB message each, send_timeout 3 s, and a consumer taking 0.1 s a
    # message (3.2 s for all): waiting for room, first come first served, breaks nothing;
    # a send that got none in time fails alone; every send that returned is delivered.
    recorder = Recorder(delay=0.1)
    receiver, _ = receiver_factory(on_message=recorder)
    transport = transport_factory(
        receiver.address, streams=4, chunk_size=256 * 1024, send_timeout=3.0
    )
    transport.start()
    barrier = threading.Barrier(32)
    returned: list[tuple[int, int]] = []
    errors: list[TransportError] = []

    def sender(number: int) -> None:
        data = bytearray(message(number, 0, 8 * MiB))  # mutable: written before send returns
        barrier.wait(TIMEOUT)
        try:
            transport.send(data)
        except TransportError as exc:
            errors.append(exc)
        else:
            returned.append((number, 0))

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 2)
    assert not [t for t in threads if t.is_alive()]
    assert {e.code for e in errors} <= {"BACKPRESSURE"}, errors[:3]
    assert healthy(transport)
    assert receiver.wait_delivered(len(returned), TIMEOUT)
    assert sorted(recorder.tags) == sorted(returned)
    assert set(recorder.sizes) <= {8 * MiB}


def test_a_silent_stalled_peer_still_breaks_the_session_with_a_keepalive(
    raw_peer: Callable[..., RawPeer], transport_factory: TransportFactory
) -> None:
    # A peer that reads nothing and says nothing is a fault, not backpressure: the session
    # breaks once nothing was written for send_timeout and nothing heard for
    # keepalive_interval + keepalive_timeout.
    peer = raw_peer("stall")
    transport = transport_factory(
        peer.address,
        streams=2,
        chunk_size=256 * 1024,
        send_timeout=0.2,
        keepalive_interval=0.1,
        keepalive_timeout=0.3,
    )
    transport.start()
    began = time.monotonic()
    try:
        transport.send(bytearray(32 * MiB))  # written before send returns: it cannot be
    except TransportError as exc:
        assert exc.code == "TRANSPORT_ERROR", exc
    else:
        raise AssertionError("32 MiB went into a peer that reads nothing")
    assert time.monotonic() - began < TIMEOUT  # only catches a hang
    wait_until(lambda: not healthy(transport), timeout=TIMEOUT)


def test_a_silent_receiver_gives_window_full_until_the_keepalive_bound_then_ack_timeout(
    raw_peer: Callable[..., RawPeer], transport_factory: TransportFactory
) -> None:
    """README: a full window raises ``WINDOW_FULL`` until the receiver has said nothing
    (no ACK, no PONG) for the keepalive bound, ``keepalive_interval + keepalive_timeout``;
    after that the session breaks and sends and ``health_check()`` give ``ACK_TIMEOUT``.
    (The outside attack read "ACK_TIMEOUT if it has gone quiet" as within send_timeout.)"""
    peer = raw_peer("drain")  # WELCOME, then reads everything and never answers
    transport = transport_factory(
        peer.address,
        acknowledged=True,
        max_in_flight=4,
        send_timeout=0.5,
        keepalive_interval=0.5,
        keepalive_timeout=5.0,  # a bound of 5.5 s, far beyond send_timeout
    )
    transport.start()
    for n in range(4):
        transport.send(b"%d" % n)
    with pytest.raises(TransportError) as raised:
        transport.send(b"no room")
    assert raised.value.code == "WINDOW_FULL", raised.value
    transport.health_check()  # the session lives: the bound has not passed

    def broken() -> bool:
        try:
            transport.health_check()
        except TransportError as exc:
            assert exc.code == "ACK_TIMEOUT", exc
            return True
        return False

    wait_until(broken, timeout=TIMEOUT)
    with pytest.raises(TransportError) as raised:
        transport.send(b"after the bound")
    assert raised.value.code == "ACK_TIMEOUT", raised.value


def test_messages_flushed_then_closed_on_reach_a_backpressured_receiver(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    """Outside attack on #22: an unacknowledged sender's 300 sends and flush() returned OK,
    close() ran while the receiver waited for a slow consumer, and only 50-76 of 300 ever
    arrived. The receiver's unprompted PONG reached the closed socket, whose reset discarded
    what the receiver's kernel still held. close() now ends each stream with a FIN and
    reads until the receiver ends too, while it shows it is alive."""
    got: list[bytes] = []
    consumer_slow = threading.Event()

    def on_message(data: bytes) -> None:
        got.append(data)
        if len(got) == 50:
            consumer_slow.set()
            threading.Event().wait(3.0)  # the slow consumer under test, not a thread's turn

    receiver, _ = receiver_factory(on_message=on_message, max_buffered_bytes=1 << 20)
    transport = transport_factory(
        receiver.address, streams=4, keepalive_interval=0.5, keepalive_timeout=2.0
    )
    transport.start()
    messages = [n.to_bytes(4, "big") * 16384 for n in range(300)]  # 64 KiB each
    for message in messages:
        transport.send(message)
    transport.flush()
    assert consumer_slow.wait(TIMEOUT)
    transport.close()
    assert receiver.wait_delivered(300, TIMEOUT), len(got)
    assert got == messages
