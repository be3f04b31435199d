"""Pipelined acknowledgements on real loopback sockets: the window, flush(), send(wait=True),
resending across close()/start(), the receiver dropping what it delivered already; and the
receiver's lifecycle and argument errors."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest

from dwcp import (
    DWCPError,
    Manager,
    MultiStreamReceiver,
    MultiStreamTCPTransport,
    TransportError,
)
from dwcp.transport import _receiving
from tests.conftest import RawPeer, ReceiverFactory, TransportFactory, wait_until

TIMEOUT = 10.0


class Gate:
    """An ``on_message`` that records, and blocks while the gate is closed."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.open = threading.Event()
        self.open.set()
        self.waiting = threading.Event()

    def __call__(self, data: bytes) -> None:
        if not self.open.is_set():
            self.waiting.set()
            self.open.wait(TIMEOUT)
        self.messages.append(data)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"max_in_flight": 0}, ValueError, "max_in_flight"),
        ({"max_in_flight": 1.5}, TypeError, "max_in_flight"),
        ({"max_in_flight_bytes": 0}, ValueError, "max_in_flight_bytes"),
        ({"max_in_flight_bytes": "1"}, TypeError, "max_in_flight_bytes"),
    ],
)
def test_window_bounds_are_validated(
    kwargs: dict[str, object], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=name):
        MultiStreamTCPTransport(("127.0.0.1", 9), acknowledged=True, **kwargs)  # type: ignore[arg-type]


def test_wait_needs_acknowledged(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    receiver, _ = receiver_factory()
    transport = transport_factory(receiver.address)
    transport.start()
    with pytest.raises(ValueError, match="acknowledged"):
        transport.send(b"x", wait=True)


@pytest.fixture
def gate(receiver_factory: ReceiverFactory) -> Iterator[Gate]:
    """A Gate opened at teardown, before the receivers stop: a test that fails while the gate
    is closed must not leave ``on_message`` blocked (and its threads to the next test)."""
    made = Gate()
    yield made
    made.open.set()


def test_sends_are_pipelined_until_the_window_is_full_then_time_out(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory, gate: Gate
) -> None:
    gate.open.clear()
    receiver, _ = receiver_factory(on_message=gate)
    send_timeout = 0.5
    # No keepalive: the receiver's PONGs would show it alive, and the sends would then get
    # WINDOW_FULL (see test_a_receiver_that_answers_but_does_not_confirm_...).
    transport = transport_factory(
        receiver.address,
        acknowledged=True,
        max_in_flight=8,
        send_timeout=send_timeout,
        keepalive_interval=None,
    )
    transport.start()
    first_sent = time.monotonic()
    for n in range(8):  # no ACK can come (delivery is blocked), yet every send returns
        transport.send(b"%d" % n)
    assert transport.unacknowledged == 8
    assert "in_flight=8" in repr(transport)
    with pytest.raises(TransportError) as raised:
        transport.send(b"one too many")  # the window is full: bounded by send_timeout
    assert raised.value.code == "ACK_TIMEOUT", raised.value
    # Counted from the first send into the empty window; the upper bound only catches a hang.
    assert send_timeout < time.monotonic() - first_sent < TIMEOUT
    with pytest.raises(TransportError) as raised:
        transport.health_check()  # an acknowledgement timeout breaks the session
    assert raised.value.code == "ACK_TIMEOUT"
    assert transport.unacknowledged == 8  # the one that raised took nothing
    # Recovery: the 8 are resent; the receiver delivers each once (4 of them may have been
    # whole at the receiver already: those it drops).
    gate.open.set()
    transport.close()
    transport.start()
    transport.flush()
    wait_until(lambda: len(gate.messages) >= 8)
    assert gate.messages == [b"%d" % n for n in range(8)]
    assert transport.unacknowledged == 0


def test_an_ack_timeout_gives_ack_timeout_whichever_thread_notices_it(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory, gate: Gate
) -> None:
    # The application pauses with a full window until the keepalive thread has broken the
    # session for the missing acknowledgements; its next send reports that same fault.
    gate.open.clear()
    receiver, _ = receiver_factory(on_message=gate)
    transport = transport_factory(
        receiver.address,
        acknowledged=True,
        max_in_flight=8,
        send_timeout=0.5,
        keepalive_interval=None,  # a receiver that says nothing at all (see above)
    )
    transport.start()
    for n in range(8):
        transport.send(b"%d" % n)

    def broken() -> bool:
        try:
            transport.health_check()
        except TransportError:
            return True
        return False

    wait_until(broken, timeout=TIMEOUT)
    for message in (b"one too many", b"and another"):
        with pytest.raises(TransportError) as raised:
            transport.send(message)
        assert raised.value.code == "ACK_TIMEOUT", raised.value
    assert transport.unacknowledged == 8


def test_a_pause_before_the_send_that_finds_the_window_full_gives_ack_timeout(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory, gate: Gate
) -> None:
    # The reproduction: the application pauses 0.3 s of the 0.5 s send_timeout
    # between filling the window and the next send; the keepalive thread's break then
    # wakes that send.
    gate.open.clear()
    receiver, _ = receiver_factory(on_message=gate)
    transport = transport_factory(
        receiver.address,
        acknowledged=True,
        max_in_flight=8,
        send_timeout=0.5,
        keepalive_interval=None,  # a receiver that says nothing at all (see above)
    )
    transport.start()
    for n in range(8):
        transport.send(b"%d" % n)
    threading.Event().wait(0.3)  # the application's pause, the scenario under test
    with pytest.raises(TransportError) as raised:
        transport.send(b"one too many")
    assert raised.value.code == "ACK_TIMEOUT", raised.value


def test_flush_and_wait_return_once_acknowledged(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory, gate: Gate
) -> None:
    receiver, _ = receiver_factory(on_message=gate)
    transport = transport_factory(receiver.address, acknowledged=True, streams=3)
    transport.start()
    transport.send(b"first", wait=True)
    assert gate.messages == [b"first"]
    gate.open.clear()
    transport.send(b"held")
    assert gate.waiting.wait(TIMEOUT)
    with pytest.raises(TransportError) as raised:
        transport.flush(0.2)  # shorter than send_timeout: nothing breaks
    assert raised.value.code == "UNCONFIRMED"
    transport.health_check()
    gate.open.set()
    transport.flush()
    assert gate.messages == [b"first", b"held"] and transport.unacknowledged == 0


def test_flush_after_a_lone_send_does_not_wait_out_the_receivers_ack_delay(
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An ACK the sender did not ask for at once would come a minute after delivery. A message
    # sent into an empty window asks (ACK_NOW), so each flush() returns on its ACK.
    monkeypatch.setattr(_receiving, "ACK_DELAY", 60.0)
    receiver, inbox = receiver_factory()
    transport = transport_factory(
        receiver.address, acknowledged=True, send_timeout=30.0, keepalive_interval=None
    )  # (no PINGs: waking the receiver's delivery thread, they would send the ACK early)
    transport.start()
    for n in range(3):
        transport.send(b"m%d" % n)
        transport.flush(5.0)  # UNCONFIRMED if it waited for the delayed ACK
        assert transport.unacknowledged == 0
    assert inbox.messages == [b"m0", b"m1", b"m2"]


def test_flush_asks_for_the_ack_of_messages_sent_into_a_busy_window(
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    gate: Gate,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # "second" goes while "first" awaits its ACK (held in on_message), so it does not ask
    # for its ACK at once, and the receiver would confirm it a minute after delivery. flush()
    # asks (a PING behind "second"), so it returns on the ACK that answers. (Long reader
    # ticks: a tick of silence wakes delivery, which then acknowledges, too.)
    monkeypatch.setattr(_receiving, "ACK_DELAY", 60.0)
    receiver, _ = receiver_factory(on_message=gate, idle_timeout=None, frame_timeout=3600.0)
    transport = transport_factory(
        receiver.address, acknowledged=True, send_timeout=30.0, keepalive_interval=None
    )
    transport.start()
    gate.open.clear()
    transport.send(b"first")
    assert gate.waiting.wait(TIMEOUT)  # "first" is being delivered, unacknowledged
    transport.send(b"second")
    assert transport.unacknowledged == 2
    gate.open.set()
    transport.flush(5.0)  # UNCONFIRMED if it waited for the delayed ACK
    assert transport.unacknowledged == 0
    assert gate.messages == [b"first", b"second"]


def test_messages_left_unacknowledged_by_close_are_resent_once(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory, gate: Gate
) -> None:
    receiver, _ = receiver_factory(on_message=gate)
    transport = transport_factory(receiver.address, acknowledged=True, close_timeout=0.3)
    transport.start()
    gate.open.clear()
    for n in range(20):
        transport.send(b"m%d" % n)
    assert gate.waiting.wait(TIMEOUT)
    transport.close()  # no acknowledgement comes within close_timeout: kept
    kept = transport.unacknowledged
    assert kept > 0
    gate.open.set()
    transport.start()  # resends them first; what the old session delivered is dropped
    transport.send(b"after", wait=True)
    transport.flush()
    assert gate.messages == [b"m%d" % n for n in range(20)] + [b"after"]
    assert receiver.delivered_count == 21


def test_close_waits_for_acknowledgements(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    gate = Gate()
    receiver, _ = receiver_factory(on_message=gate)
    transport = transport_factory(receiver.address, acknowledged=True, chunk_size=4096)
    transport.start()
    messages = [bytes([n]) * (n * 997) for n in range(40)]
    for message in messages:
        transport.send(message)
    transport.close()
    assert gate.messages == messages and transport.unacknowledged == 0


def test_close_against_a_silent_peer_waits_close_timeout_not_send_timeout(
    raw_peer: Callable[..., RawPeer], transport_factory: TransportFactory
) -> None:
    peer = raw_peer("drain")  # reads everything, never acknowledges
    transport = transport_factory(
        peer.address, acknowledged=True, send_timeout=60.0, close_timeout=0.2
    )
    transport.start()
    transport.send(b"never confirmed")
    began = time.monotonic()
    transport.close()
    assert time.monotonic() - began < 10.0  # far below send_timeout; only catches a hang
    assert transport.unacknowledged == 1  # kept for the next start()


def test_close_right_after_sends_to_a_silent_peer_waits_one_close_timeout_not_two(
    raw_peer: Callable[..., RawPeer], transport_factory: TransportFactory
) -> None:
    # "Once none has [progressed] for close_timeout": the writes of the sends just before
    # close() are progress at its start, not a reason to wait a second close_timeout.
    peer = raw_peer("drain")
    close_timeout = 4.0
    transport = transport_factory(
        peer.address, acknowledged=True, send_timeout=60.0, close_timeout=close_timeout
    )
    transport.start()
    for n in range(3):
        transport.send(b"%d" % n)
    began = time.monotonic()
    transport.close()
    took = time.monotonic() - began
    # One close_timeout, with room for a busy machine; two would be 8 s.
    assert 0.95 * close_timeout <= took < 1.85 * close_timeout, took
    assert transport.unacknowledged == 3


def test_manager_stop_against_a_silent_peer_is_not_held_by_send_timeout(
    raw_peer: Callable[..., RawPeer], make_manager: Callable[..., Manager]
) -> None:
    # The default close_timeout (1 s) bounds the wait, not send_timeout (60 s here).
    peer = raw_peer("drain")
    transport = MultiStreamTCPTransport(peer.address, acknowledged=True, send_timeout=60.0)
    manager = make_manager(transport)
    manager.start()
    manager.send_with_circuit_breaker(b"never confirmed")
    began = time.monotonic()
    manager.stop()
    assert time.monotonic() - began < 10.0
    assert transport.unacknowledged == 1


def test_close_keeps_waiting_while_acknowledgements_progress(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    # The consumer takes 4 ms a message and the receiver confirms every 128 delivered (about
    # every 0.5 s): the 1,024 messages take about 4 s in all, twice close_timeout, yet
    # close() waits for every one, as confirmations keep coming.
    inbox: list[bytes] = []

    def slow(data: bytes) -> None:
        threading.Event().wait(0.004)  # the slow consumer under test
        inbox.append(data)

    receiver, _ = receiver_factory(on_message=slow)
    transport = transport_factory(receiver.address, acknowledged=True, close_timeout=2.0)
    transport.start()
    messages = [b"%d" % n for n in range(1024)]
    for message in messages:
        transport.send(message)
    began = time.monotonic()
    left = len(messages) - len(inbox)
    transport.close()
    assert transport.unacknowledged == 0 and inbox == messages
    if left > 600:  # (always, unless sending took seconds): over 2.4 s of consumer sleeps
        assert time.monotonic() - began > 2.0  # close() waited past close_timeout


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (0, ValueError, "close_timeout must be a finite positive"),
        (-1.0, ValueError, "close_timeout must be a finite positive"),
        (float("inf"), ValueError, "close_timeout must be a finite positive"),
        (float("nan"), ValueError, "close_timeout"),
        ("1", TypeError, "close_timeout must be a number of seconds or a timedelta"),
    ],
)
def test_close_timeout_is_validated(value: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        MultiStreamTCPTransport(("127.0.0.1", 9), close_timeout=value)  # type: ignore[arg-type]
    MultiStreamTCPTransport(("127.0.0.1", 9), close_timeout=timedelta(milliseconds=250))


def test_concurrent_acknowledged_senders_keep_their_order(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    gate = Gate()
    receiver, _ = receiver_factory(on_message=gate)
    transport = transport_factory(
        receiver.address, acknowledged=True, max_in_flight=16, chunk_size=4096
    )
    transport.start()

    def sender(number: int) -> None:
        for seq in range(100):
            transport.send(b"%d:%d:" % (number, seq) + b"x" * (seq * 97 % 9000))

    workers = [threading.Thread(target=sender, args=(n,)) for n in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    transport.flush()
    assert len(gate.messages) == 800
    for number in range(8):
        mine = [m for m in gate.messages if m.startswith(b"%d:" % number)]
        assert [int(m.split(b":")[1]) for m in mine] == list(range(100))


# -- receiver lifecycle, arguments, reprs (issue #14) ------------------------------------------


def test_receiver_start_twice_raises_and_address_needs_a_start() -> None:
    receiver = MultiStreamReceiver(("127.0.0.1", 0), on_message=lambda data: None)
    with pytest.raises(DWCPError) as raised:
        receiver.address  # noqa: B018 - the property is what is tested
    assert raised.value.code == "NOT_STARTED"
    assert "not bound" in repr(receiver)
    receiver.start()
    try:
        with pytest.raises(DWCPError) as raised:
            receiver.start()
        assert raised.value.code == "ALREADY_STARTED"
        host, port = receiver.address
        assert f"{host}:{port} running" in repr(receiver)
    finally:
        receiver.stop()
    assert "stopped" in repr(receiver)
    receiver.start()  # a restart after stop() is fine, on the same port
    try:
        assert receiver.address == (host, port)
    finally:
        receiver.stop()


@pytest.mark.parametrize(
    ("address", "error", "match"),
    [
        (("127.0.0.1", "7400"), TypeError, "port must be an int, got str '7400'"),
        (("127.0.0.1", 70000), ValueError, "port must be in 0..65535, got 70000"),
        (("127.0.0.1", -1), ValueError, "port must be in"),
        (("127.0.0.1", True), TypeError, "port must be an int"),
        ((7400, 7400), TypeError, "host must be a str"),
        ("127.0.0.1:7400", TypeError, r"\(host, port\) tuple"),
        (("127.0.0.1",), TypeError, r"\(host, port\) tuple"),
    ],
)
def test_receiver_rejects_bad_addresses_naming_the_problem(
    address: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        MultiStreamReceiver(address, on_message=lambda data: None)  # type: ignore[arg-type]


def test_a_slow_consumer_confirms_each_message_as_it_is_done_not_after_the_backlog(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    """A slow consumer's messages are confirmed as each is done, not after the backlog it has
    yet to work through: the sender's window follows the consumer."""
    count = 200
    done: list[bytes] = []

    def slow(data: bytes) -> None:
        time.sleep(0.005)  # the workload: a consumer that takes 5 ms a message
        done.append(data)

    receiver, _ = receiver_factory(on_message=slow)
    transport = transport_factory(receiver.address, acknowledged=True, send_timeout=30.0)
    transport.start()
    for n in range(count):
        transport.send(b"%d" % n)
    lags = []
    deadline = time.monotonic() + 60
    while len(done) < count and time.monotonic() < deadline:
        processed = len(done)
        # Confirmed, or still inside on_message, or not reached yet; nothing else waits.
        lags.append(transport.unacknowledged - (count - processed))
        threading.Event().wait(0.01)  # a sampling period, not a wait for a thread
    transport.flush()
    assert done == [b"%d" % n for n in range(count)]
    # Before: one ACK per part of up to 64 messages, so up to 63 processed messages waited.
    # A busy machine may delay an ACK's reading by a few messages' time, never by 64.
    assert max(lags) <= 16, max(lags)


def test_a_receiver_that_answers_but_does_not_confirm_is_backpressure_not_a_fault(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory, gate: Gate
) -> None:
    """A consumer blocked for longer than send_timeout: the receiver still answers PINGs, so
    the sends that find the window full fail alone with WINDOW_FULL and the session lives; once
    the consumer goes on, everything is confirmed, once."""
    gate.open.clear()
    receiver, _ = receiver_factory(on_message=gate)
    transport = transport_factory(
        receiver.address,
        acknowledged=True,
        max_in_flight=8,
        send_timeout=0.5,
        keepalive_interval=0.1,
        keepalive_timeout=5.0,
    )
    transport.start()
    for n in range(8):
        transport.send(b"%d" % n)
    for _ in range(3):  # three send_timeouts without a confirmation, the receiver alive
        with pytest.raises(TransportError) as raised:
            transport.send(b"no room")
        assert raised.value.code == "WINDOW_FULL"
    transport.health_check()  # not broken
    gate.open.set()
    transport.flush()
    assert gate.messages == [b"%d" % n for n in range(8)]
