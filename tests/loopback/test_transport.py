"""MultiStreamTCPTransport against a real MultiStreamReceiver (or a raw socket) on loopback."""

from __future__ import annotations

import array
import contextlib
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

import dwcp
from dwcp import DWCPError, TransportError
from dwcp.transport import MultiStreamReceiver, MultiStreamTCPTransport, wire
from tests.conftest import Inbox, RawPeer, ReceiverFactory, TransportFactory

CHUNK = 1024
DELIVERY_TIMEOUT = 10.0


@pytest.fixture
def link(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> tuple[MultiStreamTCPTransport, MultiStreamReceiver, Inbox]:
    receiver, inbox = receiver_factory()
    transport = transport_factory(receiver.address)
    transport.start()
    return transport, receiver, inbox


def wait_until(condition: Callable[[], bool], timeout: float = DELIVERY_TIMEOUT) -> bool:
    """Poll ``condition`` until true or ``timeout``; returns its last value."""
    deadline = time.monotonic() + timeout
    stop = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            return False
        stop.wait(0.005)
    return True


def unhealthy(transport: MultiStreamTCPTransport) -> bool:
    try:
        transport.health_check()
    except TransportError:
        return True
    return False


def transport_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("dwcp-transport")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- delivery ---------------------------------------------------------------------------------

SHAPES = {
    "empty": 0,
    "small": 10,
    "exactly-chunk": CHUNK,
    "chunk-plus-one": CHUNK + 1,
    "fewer-chunks-than-streams": 2 * CHUNK + 5,
    "many-chunks": 37 * CHUNK + 3,
    "megabyte": 1 << 20,
}


@pytest.mark.parametrize("streams", [1, 3, 4])
def test_messages_arrive_intact_in_order_exactly_once(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory, streams: int
) -> None:
    receiver, inbox = receiver_factory()
    transport = transport_factory(receiver.address, streams=streams)
    transport.start()
    messages = [os.urandom(size) for size in SHAPES.values()] * 3
    for message in messages:
        transport.send(message)
    assert receiver.wait_delivered(len(messages), DELIVERY_TIMEOUT)
    assert inbox.messages == messages
    transport.health_check()


def test_bytes_like_inputs(
    link: tuple[MultiStreamTCPTransport, MultiStreamReceiver, Inbox],
) -> None:
    transport, receiver, inbox = link
    block = bytes(range(256)) * 20
    transport.send(bytearray(block))
    transport.send(memoryview(block)[::2])  # not contiguous
    transport.send(memoryview(block).cast("I"))  # not bytes-formatted
    assert receiver.wait_delivered(3, DELIVERY_TIMEOUT)
    assert inbox.messages == [block, block[::2], block]


def test_concurrent_senders_each_keep_their_order(
    link: tuple[MultiStreamTCPTransport, MultiStreamReceiver, Inbox],
) -> None:
    transport, receiver, inbox = link
    threads, per_thread = 6, 150
    start = threading.Barrier(threads)

    def sender(number: int) -> None:
        start.wait()
        for seq in range(per_thread):
            padding = b"x" * (3 * CHUNK if seq % 10 == 0 else seq)  # mix in striped messages
            transport.send(b"%d:%d:" % (number, seq) + padding)

    workers = [threading.Thread(target=sender, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert receiver.wait_delivered(threads * per_thread, DELIVERY_TIMEOUT)
    seen: dict[int, list[int]] = {n: [] for n in range(threads)}
    for message in inbox.messages:
        number, seq, _ = message.split(b":", 2)
        seen[int(number)].append(int(seq))
    assert seen == {n: list(range(per_thread)) for n in range(threads)}


def test_acknowledged_send_returns_after_delivery(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    receiver, inbox = receiver_factory()
    transport = transport_factory(receiver.address, acknowledged=True)
    transport.start()
    for size in SHAPES.values():
        message = os.urandom(size)
        transport.send(message, wait=True)
        assert inbox.messages[-1] == message  # no waiting: delivery happened before return
    assert receiver.delivered_count == len(SHAPES)


def test_acknowledged_concurrent_senders(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    receiver, inbox = receiver_factory()
    transport = transport_factory(receiver.address, acknowledged=True)
    transport.start()

    def sender(number: int) -> None:
        for _ in range(40):
            transport.send(b"%d" % number * 700)

    workers = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    transport.flush()  # every message acknowledged, so delivered
    assert len(inbox.messages) == 160
    assert sorted(set(inbox.messages)) == [b"%d" % n * 700 for n in range(4)]


def test_unchecked_frames_are_delivered(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    receiver, inbox = receiver_factory()
    transport = transport_factory(receiver.address, checksum=False)
    transport.start()
    messages = [os.urandom(10), os.urandom(5 * CHUNK)]
    for message in messages:
        transport.send(message)
    assert receiver.wait_delivered(2, DELIVERY_TIMEOUT)
    assert inbox.messages == messages


def test_handler_exception_does_not_stop_delivery(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    delivered: list[bytes] = []

    def flaky(data: bytes) -> None:
        delivered.append(data)
        if data == b"boom":
            raise RuntimeError("application bug")

    receiver, _ = receiver_factory(on_message=flaky)
    transport = transport_factory(receiver.address, acknowledged=True)
    transport.start()
    transport.send(b"boom")
    transport.send(b"fine", wait=True)
    assert delivered == [b"boom", b"fine"]
    transport.health_check()


# -- lifecycle and argument checks ------------------------------------------------------------


def test_send_before_start_and_after_close(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    receiver, _ = receiver_factory()
    transport = transport_factory(receiver.address)
    with pytest.raises(TransportError) as not_started:
        transport.send(b"x")
    assert not_started.value.code == "NOT_STARTED"
    transport.start()
    transport.send(b"x")
    transport.close()
    with pytest.raises(TransportError):
        transport.send(b"x")
    with pytest.raises(TransportError):
        transport.health_check()
    transport.close()  # idempotent
    assert transport_threads() == []


@pytest.mark.parametrize(
    ("data", "error"),
    [("text", TypeError), (12, TypeError), (None, TypeError), (b"x" * 4097, ValueError)],
)
def test_caller_errors_do_not_touch_the_network(
    link: tuple[MultiStreamTCPTransport, MultiStreamReceiver, Inbox],
    transport_factory: TransportFactory,
    data: Any,
    error: type[Exception],
) -> None:
    _, receiver, inbox = link
    # Not started: a caller error must still win over the "not started" TransportError.
    idle = transport_factory(receiver.address, max_message_size=4096)
    with pytest.raises(error):
        idle.send(data)
    limited = transport_factory(receiver.address, max_message_size=4096)
    limited.start()
    with pytest.raises(error):
        limited.send(data)
    limited.health_check()
    limited.send(b"after")  # the failed call consumed no message id: this one is delivered
    assert receiver.wait_delivered(1, DELIVERY_TIMEOUT)
    assert inbox.messages == [b"after"]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"streams": 0}, "streams"),
        ({"streams": 33}, "streams"),
        ({"chunk_size": 1023}, "chunk_size"),
        ({"connect_timeout": 0}, "connect_timeout"),
        ({"send_timeout": -1.0}, "send_timeout"),
        ({"max_message_size": -1}, "max_message_size"),
        ({"max_message_size": 0}, "max_message_size must be in 1.."),
        ({"max_message_size": 2**32}, "max_message_size"),
    ],
)
def test_constructor_rejects_bad_values(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        MultiStreamTCPTransport(("127.0.0.1", 9), **kwargs)


WIRE_MAX = "4.29497e+06"  # seconds: 2**32 - 1 milliseconds, as the HELLO carries them


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"send_timeout": float("inf")}, ValueError, "send_timeout must be a finite positive"),
        ({"connect_timeout": float("nan")}, ValueError, "connect_timeout must be a finite"),
        ({"keepalive_timeout": float("inf")}, ValueError, "keepalive_timeout must be a finite"),
        ({"send_timeout": 1e12}, ValueError, re.escape(f"must be from 0.001 to {WIRE_MAX}")),
        ({"keepalive_interval": 5e6}, ValueError, "keepalive_interval must be from 0.001 to"),
        ({"keepalive_interval": 0.0005}, ValueError, "keepalive_interval must be from 0.001"),
        ({"keepalive_interval": timedelta(days=60)}, ValueError, "whole milliseconds"),
        ({"send_timeout": "10"}, TypeError, "send_timeout must be a number of seconds"),
        ({"address": ("a" * 64 + ".example", 9)}, ValueError, "address host .* not a valid host"),
        ({"address": ("bad..name", 9)}, ValueError, "address host 'bad..name' is not a valid"),
    ],
)
def test_constructor_rejects_what_start_could_not_use(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    # Each used to be accepted, then fail in start() with OverflowError, struct.error or
    # UnicodeError (or, under 1 ms, announce "no keepalive" in the HELLO).
    address = kwargs.pop("address", ("127.0.0.1", 9))
    with pytest.raises(error, match=match):
        MultiStreamTCPTransport(address, **kwargs)


@pytest.mark.parametrize(
    ("interval", "announced"),
    [(0.001, 1), (0.0016, 2), (2.5, 2500), ((2**32 - 1) / 1000, 2**32 - 1), (None, 0)],
)
def test_the_keepalive_interval_is_announced_in_whole_milliseconds(
    interval: float | None, announced: int
) -> None:
    # What the HELLO carries, read off the wire by a listener that answers WELCOME.
    listener = socket.create_server(("127.0.0.1", 0))
    hellos: list[wire.Handshake] = []

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(DELIVERY_TIMEOUT)
            hellos.append(wire.parse_handshake(conn.recv(wire.HANDSHAKE.size, socket.MSG_WAITALL)))
            conn.sendall(wire.pack_welcome(wire.STATUS_ACCEPTED))
            conn.recv(1)  # until the transport closes

    peer = threading.Thread(target=answer, name="test-hello-reader")
    peer.start()
    transport = MultiStreamTCPTransport(
        listener.getsockname()[:2], streams=1, keepalive_interval=interval, close_timeout=0.1
    )
    try:
        transport.start()
    finally:
        transport.close()
        peer.join(DELIVERY_TIMEOUT)
        listener.close()
    assert [h.keepalive_ms for h in hellos] == [announced]


def test_flush_rejects_a_timeout_it_could_not_wait(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    receiver, _ = receiver_factory()
    transport = transport_factory(receiver.address)
    transport.start()
    with pytest.raises(ValueError, match="timeout must be a finite positive"):
        transport.flush(float("inf"))  # it used to raise OverflowError
    transport.send(b"x")
    transport.flush(timedelta(seconds=DELIVERY_TIMEOUT))


@pytest.mark.parametrize("wait", ["yes", 1, None], ids=["str", "int", "None"])
def test_send_refuses_a_wait_that_is_not_a_bool(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory, wait: object
) -> None:
    """send(): TypeError (``wait`` not a bool) before any I/O: "yes" and 1 used to be taken
    for True."""
    receiver, inbox = receiver_factory()
    transport = transport_factory(receiver.address, acknowledged=True)
    transport.start()
    with pytest.raises(TypeError, match="^wait must be a bool"):
        transport.send(b"refused", wait=wait)  # type: ignore[arg-type]
    transport.send(b"sent", wait=True)
    assert receiver.wait_delivered(1, DELIVERY_TIMEOUT)
    assert inbox.messages == [b"sent"]  # the refused one was never sent


def test_constructor_rejects_bad_types() -> None:
    with pytest.raises(TypeError, match="address"):
        MultiStreamTCPTransport("127.0.0.1:9")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="streams"):
        MultiStreamTCPTransport(("127.0.0.1", 9), streams=2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="acknowledged"):
        MultiStreamTCPTransport(("127.0.0.1", 9), acknowledged=1)  # type: ignore[arg-type]


def test_start_twice_raises_already_started_and_close_then_start_reconnects(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    receiver, inbox = receiver_factory()
    transport = transport_factory(receiver.address)
    transport.start()
    with pytest.raises(DWCPError, match="already started") as raised:
        transport.start()
    assert raised.value.code == "ALREADY_STARTED"
    assert receiver.session_count == 1
    transport.send(b"first")
    transport.close()
    transport.start()
    transport.send(b"second" * 1000)
    assert receiver.wait_delivered(2, DELIVERY_TIMEOUT), (inbox.messages[:1], repr(transport))
    assert inbox.messages == [b"first", b"second" * 1000]
    transport.health_check()


def test_a_broken_transport_refuses_start_until_it_is_closed(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    """README.md, "Quick start", the error table: "`DWCPError` | `ALREADY_STARTED` |
    `start()` on a running [...] `MultiStreamTCPTransport` (also a broken one: `close()`
    first)"."""
    receiver, inbox = receiver_factory()
    transport = transport_factory(receiver.address, keepalive_interval=0.2, keepalive_timeout=1.0)
    transport.start()
    transport.send(b"first")
    assert receiver.wait_delivered(1, DELIVERY_TIMEOUT)
    receiver.stop()  # the peer goes away: the session breaks

    def broken() -> bool:
        try:
            transport.health_check()
        except TransportError:
            return True
        return False

    assert wait_until(broken)
    receiver.start()  # the same port: a start() could connect again, but is refused
    with pytest.raises(DWCPError) as raised:
        transport.start()
    assert raised.value.code == "ALREADY_STARTED"
    transport.close()
    transport.start()
    transport.send(b"second")
    assert receiver.wait_delivered(2, DELIVERY_TIMEOUT)
    assert inbox.messages == [b"first", b"second"]


def test_context_managers(receiver_factory: ReceiverFactory) -> None:
    inbox = Inbox()
    with MultiStreamReceiver(on_message=inbox) as receiver:
        with MultiStreamTCPTransport(receiver.address, acknowledged=True) as transport:
            transport.send(b"hello")
        assert inbox.messages == [b"hello"]
    assert not [t for t in threading.enumerate() if t.name.startswith("dwcp-")]


# -- failures -------------------------------------------------------------------------------


def test_a_failed_start_moves_the_next_sessions_first_id_past_its_own(
    transport_factory: TransportFactory,
) -> None:
    """The HELLO of a start() that timed out may still reach the receiver late (a stalled
    link): the next session's first id is higher, so the receiver can tell it is newer."""
    with socket.create_server(("127.0.0.1", 0)) as listener:  # accepts, never answers
        transport = transport_factory(listener.getsockname()[:2], streams=1, connect_timeout=0.2)
        first_ids = []
        for _ in range(3):
            with pytest.raises(TransportError):
                transport.start()
            conn, _ = listener.accept()  # the abandoned attempt, its HELLO still queued
            with conn:
                conn.settimeout(DELIVERY_TIMEOUT)
                hello = conn.recv(wire.HANDSHAKE.size, socket.MSG_WAITALL)
                first_ids.append(wire.parse_handshake(hello).first_id)
    assert first_ids == sorted(set(first_ids)), first_ids  # strictly increasing


def test_a_late_hello_of_a_failed_start_does_not_replace_the_session_opened_after_it(
    transport_factory: TransportFactory,
) -> None:
    """The stall fault's race, in order: a start() times out while its HELLO is held on the
    way (here: by a listener that never answers, on the port the receiver takes next); the
    next start() opens the live session; the held HELLO arrives last. It must be refused
    and the live session go on delivering (an unacknowledged sender never learns of it)."""
    with socket.create_server(("127.0.0.1", 0)) as hold:
        address = hold.getsockname()[:2]
        transport = transport_factory(address, streams=1, connect_timeout=0.2)
        with pytest.raises(TransportError):
            transport.start()
        conn, _ = hold.accept()
        with conn:
            conn.settimeout(DELIVERY_TIMEOUT)
            late_hello = conn.recv(wire.HANDSHAKE.size, socket.MSG_WAITALL)
    inbox = Inbox()
    with MultiStreamReceiver(address, on_message=inbox) as receiver:
        transport.start()
        for seq in range(5):
            transport.send(b"m%d" % seq)
        transport.flush()
        assert receiver.wait_delivered(5, DELIVERY_TIMEOUT)
        with socket.create_connection(address, timeout=DELIVERY_TIMEOUT) as late:
            late.sendall(late_hello)
            status = wire.parse_welcome(late.recv(wire.WELCOME.size, socket.MSG_WAITALL))
            assert status == wire.STATUS_REFUSED
        for seq in range(5, 50):
            transport.send(b"m%d" % seq)
        transport.flush()
        assert receiver.wait_delivered(50, DELIVERY_TIMEOUT)
        transport.health_check()
        transport.close()
    assert inbox.messages == [b"m%d" % seq for seq in range(50)]


def test_a_listener_that_never_answers_fails_start_naming_the_missing_welcome(
    transport_factory: TransportFactory,
) -> None:
    """wire-format.md: connect_timeout bounds reading every WELCOME; when it passes, start()
    fails with a TransportError. Its message names the missing WELCOME (it said "cannot
    connect ...: timed out", though every connection had been accepted)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:  # accepts, never answers
        host, port = listener.getsockname()[:2]
        transport = transport_factory((host, port), streams=2, connect_timeout=0.3)
        with pytest.raises(TransportError) as silent:
            transport.start()
        accepted = [listener.accept()[0] for _ in range(2)]  # both streams had connected
        for conn in accepted:
            conn.close()
    assert silent.value.code == "TRANSPORT_ERROR"
    assert str(silent.value) == (
        f"[TRANSPORT_ERROR] no WELCOME from {host}:{port} within connect_timeout (0.3 s): "
        "is a dwcp receiver listening there?"
    )
    assert isinstance(silent.value.__cause__, TimeoutError)
    assert not transport.started
    assert transport_threads() == []


def test_connection_refused_raises_transport_error(transport_factory: TransportFactory) -> None:
    transport = transport_factory(("127.0.0.1", free_port()), connect_timeout=2.0)
    with pytest.raises(TransportError) as refused:
        transport.start()
    assert isinstance(refused.value.__cause__, OSError)
    assert isinstance(refused.value, DWCPError)
    assert not transport.started
    assert transport_threads() == []


def test_busy_receiver_refuses_the_session(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    receiver, _ = receiver_factory(max_sessions=1)
    transport_factory(receiver.address).start()
    second = transport_factory(receiver.address)
    with pytest.raises(TransportError, match="refused"):
        second.start()
    assert not second.started


def test_peer_resetting_mid_message_fails_the_send(
    raw_peer: Callable[..., RawPeer], transport_factory: TransportFactory
) -> None:
    peer = raw_peer("reset", read_bytes=1000)
    transport = transport_factory(peer.address, chunk_size=256 * 1024, send_timeout=5.0)
    transport.start()
    with pytest.raises(TransportError):
        transport.send(b"\0" * (32 << 20))
    assert unhealthy(transport)
    with pytest.raises(TransportError):
        transport.send(b"later")


def test_receiver_closing_mid_message_never_half_delivers(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    receiver, inbox = receiver_factory(max_message_size=1 << 20)
    transport = transport_factory(receiver.address)
    transport.start()
    transport.send(b"before")
    with contextlib.suppress(TransportError):  # may already be in the kernel when cut
        transport.send(os.urandom(4 << 20))  # over the receiver's limit: session closed
    assert wait_until(lambda: unhealthy(transport))
    assert receiver.wait_delivered(1, DELIVERY_TIMEOUT)
    assert inbox.messages == [b"before"]


def test_stalled_peer_fails_the_send_within_send_timeout(
    raw_peer: Callable[..., RawPeer], transport_factory: TransportFactory
) -> None:
    peer = raw_peer("stall")
    # Without a keepalive, nothing written for send_timeout is a stall (with one, the receiver
    # must also have said nothing for keepalive_interval + keepalive_timeout).
    transport = transport_factory(
        peer.address, chunk_size=256 * 1024, send_timeout=0.5, keepalive_interval=None
    )
    transport.start()
    began = time.monotonic()
    with pytest.raises(TransportError, match="stalled"):
        transport.send(bytearray(64 << 20))  # a mutable buffer: written before send returns
    assert time.monotonic() - began < 10.0  # only catches a hang (it stalls after ~0.5 s)
    assert unhealthy(transport)


def test_stalled_peer_fails_small_sends_too(
    raw_peer: Callable[..., RawPeer], transport_factory: TransportFactory
) -> None:
    # Sends that find no room fail alone (BACKPRESSURE) while the session waits out
    # send_timeout with nothing written; then it breaks as stalled, and later sends say so.
    peer = raw_peer("stall")
    transport = transport_factory(
        peer.address, streams=2, send_timeout=0.3, keepalive_interval=None
    )
    transport.start()
    message = b"\0" * 1000
    began = time.monotonic()
    codes: list[str] = []
    for _ in range(200_000):  # far more than any socket buffer holds
        try:
            transport.send(message)
        except TransportError as exc:
            codes.append(exc.code)
            if exc.code != "BACKPRESSURE":
                assert "stalled" in str(exc), exc
                break
    assert codes and codes[-1] == "TRANSPORT_ERROR", codes
    assert time.monotonic() - began < 10.0  # only catches a hang
    assert unhealthy(transport)


def test_missing_acknowledgement_fails_the_send(
    raw_peer: Callable[..., RawPeer], transport_factory: TransportFactory
) -> None:
    peer = raw_peer("drain")  # reads, never answers: without a keepalive, only ACKs tell
    transport = transport_factory(
        peer.address, acknowledged=True, send_timeout=0.3, keepalive_interval=None
    )
    transport.start()
    began = time.monotonic()
    with pytest.raises(TransportError, match="acknowledgement") as raised:
        transport.send(b"hello", wait=True)
    assert raised.value.code == "UNCONFIRMED"  # sent, and kept in the window
    assert 0.3 <= time.monotonic() - began < 5.0  # the upper bound only catches a hang
    # The keepalive thread, which alone decides that acknowledgements are overdue, breaks
    # the session within one of its ticks.
    assert wait_until(lambda: unhealthy(transport))
    with pytest.raises(TransportError) as raised:
        transport.health_check()
    assert raised.value.code == "ACK_TIMEOUT"


def test_peer_restart_then_recovery_by_close_and_start(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    receiver, inbox = receiver_factory()
    transport = transport_factory(receiver.address)
    transport.start()
    transport.send(b"one")
    assert receiver.wait_delivered(1, DELIVERY_TIMEOUT)
    receiver.stop()
    assert wait_until(lambda: unhealthy(transport))
    with pytest.raises(TransportError):
        transport.send(b"lost")
    receiver.start()  # same port, SO_REUSEADDR
    transport.close()
    transport.start()
    transport.health_check()
    transport.send(b"two")
    assert receiver.wait_delivered(2, DELIVERY_TIMEOUT)
    assert inbox.messages == [b"one", b"two"]


def test_health_check_cases(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    receiver, _ = receiver_factory()
    transport = transport_factory(receiver.address)
    with pytest.raises(TransportError, match="not started"):
        transport.health_check()
    transport.start()
    transport.health_check()
    receiver.stop()  # every stream dies: far fewer than half alive
    assert wait_until(lambda: unhealthy(transport))
    with pytest.raises(TransportError, match="broken"):
        transport.health_check()
    transport.close()
    with pytest.raises(TransportError, match="not started"):
        transport.health_check()


def test_any_bytes_like_object_is_sent_as_its_bytes(
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    make_manager: Callable[..., dwcp.Manager],
) -> None:
    """README's error table: ``TypeError`` is for what is not bytes-like; an
    ``array.array`` is bytes-like (an outside test got TypeError for one), and so is a
    view that is not contiguous (sent as a copy of its bytes)."""
    receiver, inbox = receiver_factory(address=("127.0.0.1", 0))
    transport = transport_factory(receiver.address, streams=2)
    manager = make_manager(transport)
    manager.start()
    numbers = array.array("d", range(1000))
    every_other = memoryview(numbers)[::2]
    manager.send_with_circuit_breaker(numbers)  # type: ignore[arg-type]
    transport.send(numbers)  # type: ignore[arg-type]
    transport.send(every_other)
    for send in (manager.send_with_circuit_breaker, transport.send):
        with pytest.raises(TypeError, match="bytes-like"):
            send("text")  # type: ignore[arg-type]
    assert receiver.wait_delivered(3, 30.0)
    assert inbox.messages == [numbers.tobytes(), numbers.tobytes(), every_other.tobytes()]
    metrics = manager.metrics()
    assert (metrics.sends, metrics.sent_bytes) == (1, numbers.itemsize * len(numbers))


def test_close_during_a_start_waits_for_that_start_to_fail_and_the_transport_stays_closed() -> None:
    """README: a close() during a start() on another thread waits for that start to finish
    or fail (within connect_timeout), then closes; nothing is left started. (Outside attack
    on #22: what close() did then was not documented.)"""
    silent = socket.socket()  # accepts (the kernel does) and never answers a HELLO
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    transport = MultiStreamTCPTransport(silent.getsockname(), streams=2, connect_timeout=1.0)
    outcome: list[BaseException] = []

    def start() -> None:
        try:
            transport.start()
        except BaseException as exc:  # noqa: BLE001 - checked below
            outcome.append(exc)

    starter = threading.Thread(target=start, name="test-start")
    accepted: list[socket.socket] = []
    try:
        starter.start()
        silent.settimeout(30.0)
        for _ in range(2):  # both streams connected: start() now waits for WELCOMEs
            accepted.append(silent.accept()[0])
        transport.close()
        starter.join(30.0)
        assert len(outcome) == 1 and isinstance(outcome[0], TransportError), outcome
        assert "no WELCOME" in str(outcome[0])
        with pytest.raises(TransportError) as raised:
            transport.send(b"x")
        assert raised.value.code == "NOT_STARTED"
    finally:
        transport.close()
        starter.join(30.0)
        for sock in [*accepted, silent]:
            sock.close()
