"""Liveness on a slow link: keepalive measures a stall, not how long queued bytes take.

A proxy process (``tests.faultproxy``, mode "rate") forwards the sender's bytes at a fixed
rate, as a WAN bottleneck does: what the sender wrote waits in the kernel's buffers, and a
PING sent once the stream has nothing left to write waits behind it. A stream whose bytes
the kernel still sees acknowledged is alive; one whose bytes stop moving is not.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import pytest

import dwcp
from dwcp import TransportError
from tests.conftest import ReceiverFactory, TransportFactory, healthy, wait_until
from tests.faultproxy import FaultProxy, fault_proxy_fixture  # noqa: F401 - "fault_proxy"

ProxyFactory = Callable[..., FaultProxy]

RATE = 100_000  # bytes per second through the proxy
# keepalive_interval, keepalive_timeout. On loopback (MSS 64 KiB) the proxy's kernel opens its
# window, and the sender's bytes move, in 64 KiB steps: 0.65 s apart at RATE.
INTERVAL, TIMEOUT = 0.5, 2.0
# A window of this many 1 MiB messages resent at SLOW_RATE bytes per second: over 5 minutes.
WINDOW_MIB, SLOW_RATE = 12, 20_000


@pytest.mark.timeout(90)
def test_a_ping_queued_behind_bytes_still_moving_does_not_break_the_session(
    receiver_factory: ReceiverFactory,
    fault_proxy: ProxyFactory,
    transport_factory: TransportFactory,
) -> None:
    receiver, inbox = receiver_factory()
    proxy = fault_proxy(receiver.address)
    proxy.rate(RATE)
    transport = transport_factory(
        proxy.address,
        streams=1,
        chunk_size=64 * 1024,
        keepalive_interval=INTERVAL,
        keepalive_timeout=TIMEOUT,
        send_timeout=60.0,
    )
    transport.start()
    message = os.urandom(1 << 20)  # about 10 s through the proxy: 5 keepalive timeouts
    transport.send(message)
    assert receiver.wait_delivered(1, 60.0), "the session broke while its bytes were moving"
    assert inbox.messages == [message]
    assert healthy(transport)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("acknowledged", [False, True], ids=["unacknowledged", "acknowledged"])
def test_streams_sharing_one_slow_link_are_not_taken_for_dead(
    receiver_factory: ReceiverFactory,
    fault_proxy: ProxyFactory,
    transport_factory: TransportFactory,
    acknowledged: bool,
) -> None:
    # Issue 24: four streams through one rate limit for all of them (one throttling proxy)
    # broke with "no keepalive answer": each stream gets a quarter of the rate, so its
    # kernel sees its bytes acknowledged in 64 KiB steps over 2.6 s apart, and its last
    # ones wait in the proxy's buffers, past what the kernel can see, for as long. The
    # receiver, reading each stream's bytes as they come, says it is alive on each.
    receiver, inbox = receiver_factory()
    proxy = fault_proxy(receiver.address)
    proxy.rate(RATE, shared=True)
    transport = transport_factory(
        proxy.address,
        streams=4,
        acknowledged=acknowledged,
        chunk_size=64 * 1024,
        keepalive_interval=INTERVAL,
        keepalive_timeout=TIMEOUT,
        send_timeout=60.0,
    )
    transport.start()
    message = os.urandom(1 << 20)  # 256 KiB a stream, about 10 s through the shared link
    transport.send(message)
    assert receiver.wait_delivered(1, 60.0), "the session broke while its bytes were moving"
    assert inbox.messages == [message]
    transport.health_check()  # raises, naming the fault, had the session broken


@pytest.mark.timeout(90)
def test_a_chunk_that_takes_several_frame_timeouts_to_cross_is_delivered(
    receiver_factory: ReceiverFactory,
    fault_proxy: ProxyFactory,
    transport_factory: TransportFactory,
) -> None:
    # The receiver's side of the same rule: its frame deadline counts a stall (no byte of a
    # begun frame for frame_timeout), not how long the frame takes. 3 x the proxy's step.
    frame_timeout = 2.0
    receiver, inbox = receiver_factory(frame_timeout=frame_timeout)
    proxy = fault_proxy(receiver.address)
    proxy.rate(RATE)
    transport = transport_factory(proxy.address, streams=1, chunk_size=1 << 20, send_timeout=60.0)
    transport.start()
    message = os.urandom(512 * 1024)  # one chunk, about 5 s through the proxy
    began = time.monotonic()
    transport.send(message)
    assert receiver.wait_delivered(1, 60.0), "the receiver cut off a frame still arriving"
    took = time.monotonic() - began
    assert inbox.messages == [message]
    assert healthy(transport)
    # Its bytes cannot cross faster than RATE: the one frame took over frame_timeout.
    assert took > frame_timeout, took


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("streams", "shared"), [(1, False), (4, True)], ids=["one-stream", "four-sharing-the-link"]
)
def test_a_peer_that_stops_reading_mid_transfer_is_still_detected_in_time(
    receiver_factory: ReceiverFactory,
    fault_proxy: ProxyFactory,
    transport_factory: TransportFactory,
    streams: int,
    shared: bool,
) -> None:
    # Four streams sharing the link: the receiver's PONGs while bytes arrive (issue 24)
    # stop with the bytes, so they cannot keep a stalled session alive.
    receiver, _ = receiver_factory()
    proxy = fault_proxy(receiver.address)
    proxy.rate(RATE, shared=shared)
    transport = transport_factory(
        proxy.address,
        streams=streams,
        chunk_size=64 * 1024,
        keepalive_interval=INTERVAL,
        keepalive_timeout=TIMEOUT,
        send_timeout=60.0,
    )
    transport.start()
    transport.send(os.urandom(256 * 1024))  # queued in the kernel: about 2.5 s of bytes
    proxy.wait_for(lambda stats: stats["bytes_up"] > 50_000, 30.0)
    proxy.stall()  # nothing moves any more, and the sockets stay open: no FIN, no RST
    stalled = time.monotonic()
    wait_until(lambda: not healthy(transport), 10.0)
    elapsed = time.monotonic() - stalled
    # The README's bound from the moment nothing moves (interval + timeout + a quarter of
    # the shorter), plus one more keepalive tick for the last progress to be seen, plus
    # 1.5 s for a busy machine running the keepalive thread late. It still fails a
    # detection that waits for the ~2.5 s of bytes queued at the stall first.
    tick = min(INTERVAL, TIMEOUT) / 4
    assert elapsed < INTERVAL + TIMEOUT + 2 * tick + 1.5, elapsed
    with pytest.raises(TransportError, match="keepalive"):
        transport.health_check()


@pytest.mark.timeout(90)
def test_an_acknowledged_message_slower_than_the_ack_bound_is_confirmed_not_timed_out(
    receiver_factory: ReceiverFactory,
    fault_proxy: ProxyFactory,
    transport_factory: TransportFactory,
) -> None:
    # Issue 24: one acknowledged stream at 1 % loss took ~45 s per 16 MiB message, no ACK
    # can come before a message is whole, and its busy stream is never pinged: the session
    # broke with ACK_TIMEOUT (send_timeout + keepalive bound) on a link still moving. While
    # the receiver's host acknowledges the bytes, the receiver counts as heard from.
    receiver, inbox = receiver_factory()
    proxy = fault_proxy(receiver.address)
    proxy.rate(RATE)
    transport = transport_factory(
        proxy.address,
        streams=1,
        acknowledged=True,
        chunk_size=1 << 20,
        keepalive_interval=INTERVAL,
        keepalive_timeout=TIMEOUT,
        send_timeout=1.0,  # a bound of 1 + 0.5 + 2 s, under half the message's crossing
    )
    transport.start()
    message = os.urandom(768 * 1024)  # one chunk, about 7.5 s through the proxy
    transport.send(message)
    transport.flush(60.0)  # confirmed: the session never broke
    assert inbox.messages == [message]
    assert healthy(transport)


@pytest.mark.timeout(150)
def test_recovery_reopens_the_session_while_the_resent_window_still_crosses_a_slow_link(
    receiver_factory: ReceiverFactory,
    fault_proxy: ProxyFactory,
    transport_factory: TransportFactory,
    make_manager: Callable[..., dwcp.Manager],
) -> None:
    # Issue 24: after an acknowledged session broke on a slow path (16 MiB messages, about
    # 3 Mbit/s), the manager showed no new session for the rest of the run and sends gave
    # NOT_STARTED: start() resent the window and returned only once all of it was written,
    # minutes on that path, with the transport not started and close() waiting meanwhile.
    receiver, inbox = receiver_factory()
    proxy = fault_proxy(receiver.address)
    transport = transport_factory(
        proxy.address,
        streams=1,
        acknowledged=True,
        chunk_size=1 << 20,
        send_timeout=5.0,
        connect_timeout=2.0,
    )
    manager = make_manager(transport, health_interval=0.2)
    manager.start()
    assert transport.started
    proxy.blackhole("down")  # the receiver's ACKs are lost: everything stays in the window
    messages = [os.urandom(1 << 20) for _ in range(WINDOW_MIB)]
    for message in messages:
        transport.send(message)
    assert receiver.wait_delivered(WINDOW_MIB, 60.0)
    assert transport.unacknowledged == WINDOW_MIB
    first = transport._session
    proxy.kill_all("rst")  # before the ACKs may flow again: none of this session's arrives
    wait_until(lambda: transport._session is not first, 30.0)  # recovery closed it
    # Resent at SLOW_RATE, the window takes minutes to cross (the kernel's buffers take a
    # few MiB of it at once): recovery must not wait for that to open the next session.
    # (An attempt begun before this switch fails its handshake, its WELCOME discarded.)
    proxy.rate(SLOW_RATE)
    wait_until(lambda: transport._session is not None, 60.0)
    assert transport.started
    assert transport.unacknowledged == WINDOW_MIB  # resent, not yet confirmed
    proxy.passthrough()
    transport.flush(60.0)
    assert inbox.messages == messages  # the resent copies were dropped: exactly once
    manager.stop()  # bounded: no start() holds the transport's lifecycle any more
    assert not transport.started


@pytest.mark.timeout(150)
def test_send_timeout_bounds_waiting_for_room_not_how_long_a_large_message_takes_to_write(
    receiver_factory: ReceiverFactory,
    fault_proxy: ProxyFactory,
    transport_factory: TransportFactory,
) -> None:
    """README, "Sending across a WAN": ``send_timeout`` bounds how long a send waits for
    room, not how long writing a message takes: a message over 16 KiB in a mutable buffer
    is in the kernel when ``send()`` returns, as long as the path needs while its bytes keep
    moving; a large send behind it waits its turn, and takes longer too."""
    receiver, inbox = receiver_factory()
    proxy = fault_proxy(receiver.address)
    rate = 30 * RATE
    proxy.rate(rate)
    transport = transport_factory(proxy.address, streams=1, send_timeout=1.0)
    transport.start()
    # The kernels' buffers (ours and the proxy's) can take up to their maximum sizes at once;
    # the 2 * rate bytes beyond them take at least 2 s to cross.
    first = bytearray(os.urandom(_kernel_buffers() + 2 * rate))
    second = bytearray(os.urandom(400_000))
    outcome: dict[str, tuple[str, float]] = {}

    def send(name: str, data: bytearray) -> None:
        began = time.monotonic()
        try:
            transport.send(data)
            outcome[name] = ("ok", time.monotonic() - began)
        except TransportError as exc:
            outcome[name] = (exc.code, time.monotonic() - began)

    senders = [threading.Thread(target=send, args=("first", first), name="test-first-send")]
    senders[0].start()
    proxy.wait_for(lambda stats: stats["bytes_up"] > 100_000, 30.0)  # under way
    senders.append(threading.Thread(target=send, args=("second", second), name="test-second"))
    senders[1].start()
    for sender in senders:
        sender.join(120.0)
    assert {name: code for name, (code, _) in outcome.items()} == {"first": "ok", "second": "ok"}
    # Both longer than send_timeout: their bytes kept moving (lower bounds only).
    assert outcome["first"][1] > 1.0 and outcome["second"][1] > 1.0
    assert receiver.wait_delivered(2, 60.0)
    assert inbox.messages == [bytes(first), bytes(second)]
    assert healthy(transport)


@pytest.mark.timeout(120)
def test_a_large_send_waits_as_long_as_a_live_receiver_takes_no_bytes(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    """README, "Sending across a WAN": a large send is in the kernel when ``send()``
    returns, which takes as long as a receiver that says it is alive takes no bytes (a
    stalled consumer), past ``send_timeout``; the session is not broken for it."""
    gate = threading.Event()
    delivered: list[bytes] = []

    def stalled_consumer(message: bytes) -> None:
        gate.wait(60.0)
        delivered.append(message)

    receiver, _ = receiver_factory(
        address=("127.0.0.1", 0), on_message=stalled_consumer, max_buffered_bytes=1 << 20
    )
    transport = transport_factory(
        receiver.address,
        streams=1,
        chunk_size=None,
        send_timeout=1.0,
        keepalive_interval=0.5,
        keepalive_timeout=1.0,
    )
    transport.start()
    # More than the kernels' buffers and the receiver's budget hold: the last send blocks.
    messages = [bytearray(os.urandom(2 << 20)) for _ in range(_kernel_buffers() // (2 << 20) + 3)]
    outcome: list[object] = []

    def send_all() -> None:
        try:
            for message in messages:
                transport.send(message)
            outcome.append("ok")
        except TransportError as exc:
            outcome.append(exc.code)

    sending = threading.Thread(target=send_all, name="test-large-sends")
    sending.start()
    # Three send_timeouts and twice the keepalive bound: still blocked, nothing raised.
    sending.join(3.0)
    assert sending.is_alive() and outcome == []
    assert healthy(transport)
    gate.set()
    sending.join(60.0)
    assert outcome == ["ok"]
    assert receiver.wait_delivered(len(messages), 60.0)
    assert delivered == [bytes(message) for message in messages]


@pytest.mark.timeout(150)
@pytest.mark.parametrize(("acknowledged", "code"), [(True, "UNCONFIRMED"), (False, "BACKPRESSURE")])
def test_a_flush_that_times_out_while_a_slow_path_still_moves_the_bytes_says_so(
    receiver_factory: ReceiverFactory,
    fault_proxy: ProxyFactory,
    transport_factory: TransportFactory,
    acknowledged: bool,
    code: str,
) -> None:
    """README's error table: ``UNCONFIRMED`` is ``flush()``'s "sent, but not confirmed in
    time", and ``BACKPRESSURE`` a slow receiver, "the session goes on", for a transport that
    is not acknowledged; so it is while the messages are still being written on a slow, live
    path (outside tests got ``TRANSPORT_ERROR``, "the peer or network failed", which counts
    against the breaker), and every message still arrives."""
    receiver, inbox = receiver_factory()
    proxy = fault_proxy(receiver.address)
    rate = 30 * RATE
    proxy.rate(rate)
    transport = transport_factory(
        proxy.address, streams=1, acknowledged=acknowledged, send_timeout=60.0
    )
    began = time.monotonic()  # the proxy paces from the handshake on
    transport.start()
    # More than the kernels' buffers hold, plus what the proxy forwarded since it began and
    # 2 s more: the last of them still wait in our queue at flush(). Counted from the clock,
    # so a busy machine that sends slowly sends more (a fixed count was all forwarded once).
    messages: list[bytes] = []
    while len(messages) < 48 and len(messages) << 20 <= _kernel_buffers() + rate * (
        time.monotonic() - began + 2
    ):
        messages.append(os.urandom(1 << 20))
        transport.send(messages[-1])
    with pytest.raises(TransportError) as info:
        transport.flush(0.2)
    assert info.value.code == code
    assert "still being written" in str(info.value)
    transport.flush(120.0)  # the session lived
    wait_until(lambda: len(inbox.messages) == len(messages), 60.0)
    assert inbox.messages == messages


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("acknowledged", "keepalive"), [(False, (0.5, 1.0)), (True, (0.5, 1.0)), (False, (5.0, 10.0))]
)
def test_close_waits_for_a_consumer_that_pauses_while_its_receiver_says_it_is_alive(
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    acknowledged: bool,
    keepalive: tuple[float, float],
) -> None:
    """README: ``close()`` writes what is queued and waits, while the receiver says it is
    alive (a consumer pausing: it PONGs once per keepalive interval meanwhile), until the
    keepalive bound passed since it last did; only then, or for a receiver that never
    answered, after ``close_timeout`` without progress, does it close anyway. It closed after
    ``close_timeout`` under a consumer paused for 5 s, and an outside test lost 83-916 messages
    whose ``send`` had returned (14 of 14 runs); at the default keepalive the receiver said
    nothing in the first seconds of the pause (its first unprompted PONG came a keepalive
    interval into it), and close() took it for silent (3 of 3 runs lost messages)."""
    gate = threading.Event()
    delivered: list[bytes] = []

    def pausing_consumer(message: bytes) -> None:
        gate.wait(60.0)
        delivered.append(message)

    receiver, _ = receiver_factory(
        address=("127.0.0.1", 0), on_message=pausing_consumer, max_buffered_bytes=1 << 20
    )
    transport = transport_factory(
        receiver.address,
        streams=1,
        chunk_size=None,
        acknowledged=acknowledged,
        send_timeout=1.0,
        close_timeout=0.3,
        keepalive_interval=keepalive[0],
        keepalive_timeout=keepalive[1],
    )
    transport.start()
    # Send until the queue is full (a send gets no room: BACKPRESSURE, nothing of it sent),
    # so what close() must write is still in our queue when it begins.
    messages: list[bytes] = []
    for _ in range(4000):  # bounded: 250 MiB, far past any kernel's buffers
        # Queued for the stream's writer (under 256 KiB, which the sender writes itself).
        message = os.urandom(64 * 1024)
        try:
            transport.send(message)
        except TransportError as exc:
            assert exc.code in ("BACKPRESSURE", "WINDOW_FULL"), exc
            break
        messages.append(message)
    else:
        pytest.fail("the queue never filled")
    closing = threading.Thread(target=transport.close, name="test-close")
    closing.start()
    try:
        # Ten close_timeouts and twice the keepalive bound: the receiver PONGs, so close()
        # waits.
        closing.join(3.0)
        assert closing.is_alive()
    finally:
        gate.set()
    closing.join(60.0)
    assert not closing.is_alive()
    assert receiver.wait_delivered(len(messages), 60.0)
    assert delivered == messages


def _kernel_buffers() -> int:
    """The most the kernel's TCP buffers can hold on the sender's and the proxy's side
    (``tcp_wmem`` and ``tcp_rmem`` maxima); the test is skipped where that is over 48 MiB,
    past what it can send within the default message and window limits (64 MiB)."""
    total = 0
    for name in ("tcp_wmem", "tcp_rmem"):
        with open(f"/proc/sys/net/ipv4/{name}") as sysctl:
            total += int(sysctl.read().split()[2])
    if total > 48 * 2**20:
        pytest.skip(f"the kernel's TCP buffers can hold {total} bytes: over what this test sends")
    return total
