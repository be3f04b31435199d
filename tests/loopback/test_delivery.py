"""``Manager.deliver()`` on real loopback sockets: confirmed in order, retried through an
outage without touching the transport while the breaker is open, bounded by its byte budget
and each message's deadline, settled by ``stop()``; and the receiver's ``with_ids`` and
``resume_from``."""

from __future__ import annotations

import array
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import dwcp
from dwcp import Delivery, DeliveryError, DWCPError, MultiStreamReceiver, MultiStreamTCPTransport
from tests.conftest import ReceiverFactory, TransportFactory, wait_until

TIMEOUT = 10.0
#: A manager that notices a dead transport at once and retries its recovery quickly.
FAST = {"health_interval": 0.05, "initial_backoff": 0.05, "max_retries": 1000}


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


def numbered(count: int, start: int = 0) -> list[bytes]:
    return [b"message %d" % i for i in range(start, start + count)]


def test_delivered_messages_arrive_once_in_order_and_settle_confirmed(
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    make_manager: Callable[..., dwcp.Manager],
) -> None:
    receiver, inbox = receiver_factory()
    manager = make_manager(transport_factory(receiver.address, acknowledged=True))
    manager.start()
    handles = [manager.deliver(message) for message in numbered(1000)]
    manager.flush()
    assert inbox.messages == numbered(1000)
    assert all(h.done() and h.exception() is None for h in handles)
    assert [t.name for t in threading.enumerate()].count("dwcp-delivery") == 1
    manager.stop()
    assert "dwcp-delivery" not in [t.name for t in threading.enumerate()]


def test_a_handle_settles_only_once_the_receiver_confirmed_the_message(
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    make_manager: Callable[..., dwcp.Manager],
) -> None:
    gate = Gate()
    gate.open.clear()
    receiver, _ = receiver_factory(on_message=gate)
    manager = make_manager(transport_factory(receiver.address, acknowledged=True))
    manager.start()
    done: list[Delivery] = []
    handle = manager.deliver(b"held", callback=done.append)
    assert gate.waiting.wait(TIMEOUT)  # the receiver has it, in on_message, unconfirmed
    with pytest.raises(TimeoutError):
        handle.result(timeout=0.2)
    assert not handle.done() and not done
    gate.open.set()
    handle.result(timeout=TIMEOUT)
    wait_until(lambda: done == [handle], timeout=TIMEOUT)
    late: list[Delivery] = []
    handle.add_done_callback(late.append)  # already settled: called at once, here
    assert late == [handle]


def test_messages_are_retried_through_an_outage_and_recovery(
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    make_manager: Callable[..., dwcp.Manager],
) -> None:
    receiver, inbox = receiver_factory()
    transport = transport_factory(receiver.address, acknowledged=True)
    manager = make_manager(transport, max_failures=2, reset_timeout=0.2, **FAST)
    manager.start()
    manager.deliver(b"before").result(timeout=TIMEOUT)
    receiver.stop()
    handles = [manager.deliver(message) for message in numbered(300)]
    wait_until(lambda: manager.circuit_breaker_state != "closed", timeout=TIMEOUT)
    receiver.start()  # same port
    manager.flush(timeout=30.0)
    assert [h.exception() for h in handles] == [None] * 300
    assert inbox.messages == [b"before", *numbered(300)]


def test_each_threads_messages_arrive_once_in_its_order(
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    make_manager: Callable[..., dwcp.Manager],
) -> None:
    receiver, inbox = receiver_factory()
    manager = make_manager(transport_factory(receiver.address, acknowledged=True))
    manager.start()

    def deliver_all(writer: int) -> None:
        for i in range(500):
            manager.deliver(b"%d %d" % (writer, i))

    threads = [threading.Thread(target=deliver_all, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    manager.flush(timeout=TIMEOUT)
    for writer in range(4):
        mine = [m for m in inbox.messages if m.startswith(b"%d " % writer)]
        assert mine == [b"%d %d" % (writer, i) for i in range(500)]
    assert len(inbox.messages) == 2000


class Recording(MultiStreamTCPTransport):
    """A real transport that records the breaker's state and generation at each send."""

    manager: dwcp.Manager

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[str, int]] = []
        self.runs: list[tuple[str, int]] = []  # the breaker's state at each run, its size

    def send(self, data: Any, *, wait: bool = False) -> None:
        breaker = self.manager._breaker
        self.seen.append((breaker.state, breaker._generation))
        super().send(data, wait=wait)

    def _queue_for_delivery(self, messages: Any) -> int:
        # A run (see Held): its state counts as each of its messages' sends.
        breaker = self.manager._breaker
        state = (breaker.state, breaker._generation)
        queued = super()._queue_for_delivery(messages)
        self.seen += [state] * queued
        self.runs.append((state[0], queued))
        return queued


def test_nothing_queued_touches_the_transport_while_the_breaker_is_open(
    receiver_factory: ReceiverFactory, make_manager: Callable[..., dwcp.Manager]
) -> None:
    receiver, inbox = receiver_factory()
    transport = Recording(receiver.address, acknowledged=True, send_timeout=5.0)
    # The breaker opens on the sends that find the session broken; a recovery that closed
    # the transport first would leave them NOT_STARTED, which never counts (README), so the
    # health pass comes a second later here, not 50 ms.
    slower = {**FAST, "health_interval": 1.0}
    manager = make_manager(transport, max_failures=2, reset_timeout=0.2, **slower)
    transport.manager = manager
    manager.start()
    receiver.stop()
    handles = [manager.deliver(message) for message in numbered(50)]
    # The breaker opens, then admits trials after its reset timeout. A trial that finds the
    # transport closed by a recovery that could not restart it fails NOT_STARTED, which says
    # nothing about the peer: released, it leaves the breaker half-open, never closed.
    wait_until(lambda: manager._breaker.transition_counts.get(("closed", "open"), 0) >= 1)
    wait_until(lambda: any(state == "half-open" for state, _ in transport.seen), TIMEOUT)
    receiver.start()
    manager.flush(timeout=30.0)
    assert [h.exception() for h in handles] == [None] * 50
    assert inbox.messages == numbered(50)
    states = [state for state, _ in transport.seen]
    assert "open" not in states  # nothing queued touched the transport while it was open
    # README: the half-open trial is one send of one message (after a failure or a
    # rejection the thread sends one at a time until one goes through): never a run.
    assert not [run for run in transport.runs if run[0] != "closed" and run[1]]


def test_a_half_open_trial_is_one_message_even_when_the_breaker_opened_on_other_calls(
    receiver_factory: ReceiverFactory, make_manager: Callable[..., dwcp.Manager]
) -> None:
    """README.md, **Retries and the breaker.**: "the thread waits until the breaker reads
    half-open, and its next send, of one message, is the one trial", also when the breaker
    opened on the application's guarded calls while messages waited for confirmation (the
    delivery thread saw no rejection: its next run was admitted as the trial)."""
    gate = Gate()
    gate.open.clear()
    receiver, _ = receiver_factory(on_message=gate)
    transport = Recording(receiver.address, acknowledged=True)
    manager = make_manager(transport, max_failures=2, reset_timeout=0.3)
    transport.manager = manager
    manager.start()
    manager.deliver(b"first")
    assert gate.waiting.wait(TIMEOUT)  # held: the window stays non-empty, so the rest queue

    def flaky() -> None:
        raise ConnectionResetError("the application's own peer failed")

    for _ in range(2):
        with pytest.raises(ConnectionResetError):
            manager.call(flaky)
    assert manager.circuit_breaker_state == "open"
    wait_until(lambda: manager.circuit_breaker_state == "half-open", TIMEOUT)
    handles = [manager.deliver(message) for message in numbered(50)]
    wait_until(lambda: transport.unacknowledged == 51, TIMEOUT)
    trial = [run for run in transport.runs if run[0] != "closed"]
    assert trial == [("half-open", 1)]  # one message, then closed again: runs
    assert manager.circuit_breaker_state == "closed"
    gate.open.set()
    manager.flush(timeout=TIMEOUT)
    assert [handle.exception() for handle in handles] == [None] * 50
    assert gate.messages == [b"first", *numbered(50)]


def test_a_full_budget_blocks_deliver_then_raises_buffer_full(
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    make_manager: Callable[..., dwcp.Manager],
) -> None:
    gate = Gate()
    gate.open.clear()
    receiver, _ = receiver_factory(on_message=gate)
    manager = make_manager(
        transport_factory(receiver.address, acknowledged=True),
        delivery_buffer_bytes=4096,
        delivery_max_block=0.3,
    )
    manager.start()
    for _ in range(4):
        manager.deliver(bytes(1024))  # the budget, unconfirmed
    began = time.monotonic()
    with pytest.raises(DeliveryError) as raised:
        manager.deliver(b"x")
    assert raised.value.code == "BUFFER_FULL"
    assert time.monotonic() - began >= 0.3
    with pytest.raises(ValueError, match="delivery_buffer_bytes"):
        manager.deliver(bytes(4097))  # could never fit
    gate.open.set()
    manager.deliver(b"x").result(timeout=TIMEOUT)  # confirmations made room


def test_a_message_past_its_deadline_fails_with_a_typed_error(
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    make_manager: Callable[..., dwcp.Manager],
) -> None:
    gate = Gate()
    gate.open.clear()
    receiver, _ = receiver_factory(on_message=gate)
    manager = make_manager(transport_factory(receiver.address, acknowledged=True))
    manager.start()
    failed: list[Delivery] = []
    sent = manager.deliver(b"unconfirmed", timeout=0.2, callback=failed.append)
    error = sent.exception(timeout=TIMEOUT)
    assert isinstance(error, DeliveryError)
    assert (error.code, error.sent) == ("DELIVERY_TIMEOUT", True)
    wait_until(lambda: failed == [sent], timeout=TIMEOUT)
    with pytest.raises(DeliveryError):
        sent.result()
    gate.open.set()
    receiver.stop()  # now nothing can be sent: it stays queued until its deadline
    wait_until(lambda: not transport_started(manager), timeout=TIMEOUT)
    unsent = manager.deliver(b"never sent", timeout=0.2)
    error = unsent.exception(timeout=TIMEOUT)
    assert error is not None and (error.code, error.sent) == ("DELIVERY_TIMEOUT", False)
    manager.flush(timeout=TIMEOUT)  # nothing left unsettled


def test_messages_waiting_behind_a_full_window_fail_at_their_deadline_not_after_send_timeout(
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    make_manager: Callable[..., dwcp.Manager],
) -> None:
    """README.md, **Deadline.**: "A message not confirmed by then fails with `DeliveryError`
    (code `DELIVERY_TIMEOUT`)", also while the transport's window is full (a slow consumer):
    the delivery thread sat in a send waiting for room, and no handle settled until
    send_timeout (an outside test: 6.5-15 s past 1-1.5 s deadlines, 7 of 7 runs)."""
    gate = Gate()
    gate.open.clear()
    receiver, _ = receiver_factory(on_message=gate)
    transport = transport_factory(
        receiver.address, acknowledged=True, max_in_flight=4, send_timeout=120.0
    )
    manager = make_manager(transport)
    manager.start()
    began = time.monotonic()
    handles = [manager.deliver(message, timeout=1.0) for message in numbered(12)]
    wait_until(lambda: all(handle.done() for handle in handles), timeout=30.0)  # not 120 s
    assert time.monotonic() - began < 30.0
    errors = [handle.exception() for handle in handles]
    assert {error.code for error in errors if error is not None} == {"DELIVERY_TIMEOUT"}
    sent = [error.sent for error in errors if error is not None]
    assert sent == sorted(sent, reverse=True) and not sent[-1]  # the window's four, then never
    gate.open.set()
    manager.flush(timeout=TIMEOUT)


def test_a_waiter_settles_the_others_while_the_thread_writes_a_large_message(
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    make_manager: Callable[..., dwcp.Manager],
) -> None:
    """README.md, **Deadline.**: while the delivery thread writes a message on its own, the
    others still fail at their deadline when something waits on them (before, not until
    that write ended: a receiver that stopped reading held them all)."""
    gate = Gate()
    gate.open.clear()
    receiver, _ = receiver_factory(on_message=gate, max_buffered_bytes=2**20)
    transport = transport_factory(
        receiver.address, acknowledged=True, streams=1, chunk_size=2**20, send_timeout=120.0
    )
    manager = make_manager(transport)
    manager.start()
    manager.deliver(b"first")
    assert gate.waiting.wait(TIMEOUT)  # held in on_message
    manager.deliver(b"second")  # waits for on_message: the receiver reads within its budget
    large = manager.deliver(bytes(24 * 2**20), timeout=600.0)  # written, never read whole
    wait_until(lambda: manager._outbox._sending, timeout=TIMEOUT)  # the thread writes it
    late = manager.deliver(b"late", timeout=0.5)
    error = late.exception(timeout=30.0)  # not until the large write ends (never, here)
    assert error is not None and (error.code, error.sent) == ("DELIVERY_TIMEOUT", False)
    assert not large.done()
    gate.open.set()
    manager.flush(timeout=60.0)
    assert large.exception() is None


def transport_started(manager: dwcp.Manager) -> bool:
    transport = manager._transport
    assert isinstance(transport, MultiStreamTCPTransport)
    try:
        transport.health_check()
    except dwcp.TransportError:
        return False
    return True


def test_stop_fails_what_is_not_confirmed_and_ends_the_thread(
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    make_manager: Callable[..., dwcp.Manager],
) -> None:
    gate = Gate()
    gate.open.clear()
    receiver, _ = receiver_factory(on_message=gate)
    manager = make_manager(transport_factory(receiver.address, acknowledged=True, send_timeout=0.5))
    manager.start()
    handles = [manager.deliver(message) for message in numbered(5)]
    assert gate.waiting.wait(TIMEOUT)
    transport = manager._transport
    assert isinstance(transport, MultiStreamTCPTransport)
    wait_until(lambda: transport.unacknowledged == 5)  # all sent (the thread sends the last 4)
    manager.stop()
    errors = [h.exception(timeout=TIMEOUT) for h in handles]
    assert {(e.code, e.sent) for e in errors if e is not None} == {("STOPPED", True)}
    assert len([e for e in errors if e is not None]) == 5
    assert "dwcp-delivery" not in [t.name for t in threading.enumerate()]
    with pytest.raises(DWCPError) as raised:
        manager.deliver(b"late")
    assert raised.value.code == "NOT_STARTED"
    gate.open.set()


def test_deliver_needs_an_acknowledged_transport(
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    make_manager: Callable[..., dwcp.Manager],
) -> None:
    receiver, _ = receiver_factory()
    manager = make_manager(transport_factory(receiver.address))
    with pytest.raises(DWCPError) as raised:
        manager.deliver(b"x")
    assert raised.value.code == "NOT_STARTED"
    manager.start()
    with pytest.raises(DWCPError, match="acknowledged=True") as raised:
        manager.deliver(b"x")
    assert raised.value.code == "NOT_ACKNOWLEDGED"
    with pytest.raises(DWCPError) as raised:
        make_manager().deliver(b"x")
    assert raised.value.code == "NO_TRANSPORT"


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"delivery_buffer_bytes": 0}, ValueError, "delivery_buffer_bytes"),
        ({"delivery_buffer_bytes": 1.5}, TypeError, "delivery_buffer_bytes"),
        ({"delivery_timeout": 0}, ValueError, "delivery_timeout"),
        ({"delivery_max_block": -1}, ValueError, "delivery_max_block"),
    ],
)
def test_delivery_arguments_are_validated(
    kwargs: dict[str, object], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=name):
        dwcp.Manager(**kwargs)  # type: ignore[arg-type]


def test_deliver_refuses_bad_arguments_before_queueing(
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    make_manager: Callable[..., dwcp.Manager],
) -> None:
    receiver, inbox = receiver_factory()
    manager = make_manager(transport_factory(receiver.address, acknowledged=True))
    manager.start()
    with pytest.raises(TypeError, match="data"):
        manager.deliver("text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        manager.deliver(b"x", timeout=-1)
    with pytest.raises(TypeError, match="callback"):
        manager.deliver(b"x", callback=3)  # type: ignore[arg-type]
    buffer = bytearray(b"abc")
    handle = manager.deliver(buffer)
    buffer[:] = b"xyz"  # copied at deliver(): the caller may reuse its buffer
    handle.result(timeout=TIMEOUT)
    with pytest.raises(TypeError, match="bytes-like"):
        manager.deliver(5)  # type: ignore[arg-type]  # not five zero bytes
    # Any other bytes-like object goes as its bytes (README: TypeError is for what is not).
    numbers = array.array("i", range(100))
    for data in (numbers, memoryview(numbers)[::3]):
        manager.deliver(data).result(timeout=TIMEOUT)  # type: ignore[arg-type]
    assert inbox.messages[-2:] == [numbers.tobytes(), memoryview(numbers)[::3].tobytes()]


def test_a_message_the_transport_refuses_fails_alone(
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    make_manager: Callable[..., dwcp.Manager],
) -> None:
    receiver, inbox = receiver_factory()
    manager = make_manager(
        transport_factory(receiver.address, acknowledged=True, max_message_size=100)
    )
    manager.start()
    threads: list[str] = []

    def note(handle: Delivery) -> None:
        threads.append(threading.current_thread().name)

    handles = [manager.deliver(m, callback=note) for m in (b"a", bytes(101), b"b")]
    manager.flush(timeout=TIMEOUT)
    wait_until(lambda: len(threads) == 3, timeout=TIMEOUT)
    assert threads == ["dwcp-delivery"] * 3  # callbacks run on the delivery thread
    error = handles[1].exception()
    assert error is not None and error.code == "REFUSED"
    assert isinstance(error.__cause__, ValueError)
    assert handles[0].exception() is None and handles[2].exception() is None
    assert inbox.messages == [b"a", b"b"]
    assert manager.circuit_breaker_state == "closed"


def test_flush_times_out_with_a_typed_error(
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    make_manager: Callable[..., dwcp.Manager],
) -> None:
    gate = Gate()
    gate.open.clear()
    receiver, _ = receiver_factory(on_message=gate)
    manager = make_manager(transport_factory(receiver.address, acknowledged=True))
    manager.start()
    manager.deliver(b"held")
    with pytest.raises(DeliveryError) as raised:
        manager.flush(timeout=0.2)
    assert raised.value.code == "FLUSH_TIMEOUT"
    gate.open.set()
    manager.flush(timeout=TIMEOUT)


# -- the receiver's ids -------------------------------------------------------------------------


def test_with_ids_hands_on_message_the_sender_and_message_ids(
    transport_factory: TransportFactory,
) -> None:
    seen: list[tuple[bytes, str, int]] = []
    receiver = MultiStreamReceiver(
        on_message=lambda data, sender, mid: seen.append((data, sender, mid)), with_ids=True
    )
    receiver.start()
    try:
        transport = transport_factory(receiver.address, acknowledged=True)
        transport.start()
        for message in numbered(3):
            transport.send(message)
        transport.flush()
        transport.close()
        transport.start()  # a new session: the same sender, ids go on
        transport.send(b"after")
        transport.flush()
    finally:
        receiver.stop()
    assert seen == [
        *[(m, transport.sender_id, i) for i, m in enumerate(numbered(3))],
        (b"after", transport.sender_id, 3),
    ]


def test_resume_from_drops_a_senders_messages_at_or_below_the_last_processed(
    transport_factory: TransportFactory,
) -> None:
    transport = transport_factory(("127.0.0.1", 9), acknowledged=True)
    seen: list[int] = []
    receiver = MultiStreamReceiver(
        on_message=lambda data, sender, mid: seen.append(mid),
        with_ids=True,
        resume_from={transport.sender_id: 4, "ab" * 16: 100},
    )
    receiver.start()
    try:
        transport._address = receiver.address  # built before the receiver had its port
        transport.start()
        for message in numbered(10):
            transport.send(message)
        transport.flush()  # confirmed, the dropped ones too
    finally:
        receiver.stop()
    assert seen == [5, 6, 7, 8, 9]
    assert receiver.duplicates_dropped == 5


@pytest.mark.parametrize(
    ("resume_from", "error", "text"),
    [
        ([("ab" * 16, 1)], TypeError, "mapping"),
        ({b"\xab" * 16: 1}, TypeError, "str"),
        ({"xyz": 1}, ValueError, "sender id"),
        ({"00" * 16: 1}, ValueError, "not all zero"),
        ({"ab" * 16: -1}, ValueError, ">= 0"),
        ({"ab" * 16: 2**64}, ValueError, "below 2\\*\\*64"),
        ({"ab" * 16: "1"}, TypeError, "int"),
        ({"ab" * 16: True}, TypeError, "int"),
    ],
)
def test_resume_from_is_validated(resume_from: object, error: type[Exception], text: str) -> None:
    too_many = {f"{i + 1:032x}": 0 for i in range(4097)}
    with pytest.raises(ValueError, match="more than 4096"):
        MultiStreamReceiver(on_message=print, resume_from=too_many)
    with pytest.raises(error, match=text):
        MultiStreamReceiver(on_message=print, resume_from=resume_from)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="with_ids"):
        MultiStreamReceiver(on_message=print, with_ids=1)  # type: ignore[arg-type]


def test_stop_from_a_delivery_callback_returns_and_a_restart_delivers(
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    make_manager: Callable[..., dwcp.Manager],
) -> None:
    receiver, _ = receiver_factory()
    manager = make_manager(transport_factory(receiver.address, acknowledged=True))
    manager.start()
    stopped = threading.Event()

    def stop_here(handle: Delivery) -> None:
        manager.stop()
        stopped.set()

    manager.deliver(b"first", callback=stop_here)
    assert stopped.wait(TIMEOUT)
    assert not manager.is_started
    manager.start()  # and it delivers again, on a new thread
    manager.deliver(b"again").result(timeout=TIMEOUT)


@pytest.mark.parametrize(
    ("with_ids", "handler"),
    [(True, lambda data: None), (False, lambda data, sender, mid: None)],
    ids=["with_ids-one-argument", "plain-three-arguments"],
)
def test_an_on_message_that_cannot_take_its_arguments_is_refused_at_construction(
    with_ids: bool, handler: Callable[..., None]
) -> None:
    # Accepted, every message would fail in the handler: logged, counted delivered, lost.
    with pytest.raises(TypeError, match="on_message must accept"):
        dwcp.MultiStreamReceiver(on_message=handler, with_ids=with_ids)


# -- more of what the README promises ---------------------------------------------------------


def test_messages_stopped_after_they_were_sent_are_resent_by_a_restarted_manager(
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    make_manager: Callable[..., dwcp.Manager],
) -> None:
    """README.md, "Delivery through outages: manager.deliver()": "Then every message still
    unconfirmed fails with `DeliveryError` (`STOPPED`) [...] Messages with `.sent` true stay
    in the transport's window: a restarted manager resends them." """
    gate = Gate()
    gate.open.clear()
    receiver, _ = receiver_factory(on_message=gate)
    transport = transport_factory(receiver.address, acknowledged=True, close_timeout=0.2)
    manager = make_manager(transport)
    manager.start()
    handles = [manager.deliver(message) for message in numbered(5)]
    assert gate.waiting.wait(TIMEOUT)  # the first is in on_message: none can be confirmed
    wait_until(lambda: transport.unacknowledged == 5)  # all sent (the thread sends the last 4)
    manager.stop()
    errors = [h.exception(timeout=TIMEOUT) for h in handles]
    assert [(e.code, e.sent) if e is not None else None for e in errors] == [("STOPPED", True)] * 5
    gate.open.set()
    manager.start()  # the same transport, with the same window
    manager.flush(timeout=30.0)
    wait_until(lambda: len(set(gate.messages)) == 5, timeout=30.0)
    assert sorted(set(gate.messages)) == sorted(numbered(5))
    assert len(gate.messages) == 5, gate.messages  # each resent message arrived once


def test_flush_without_a_timeout_ends_when_the_deadlines_pass(
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    make_manager: Callable[..., dwcp.Manager],
) -> None:
    """README.md, "Delivery through outages: manager.deliver()": "`manager.flush(timeout=None)`
    waits until every message accepted before the call has settled, confirmed or failed
    (every message has a deadline, so it ends without a timeout too)." """
    gate = Gate()
    gate.open.clear()
    receiver, _ = receiver_factory(on_message=gate)
    manager = make_manager(transport_factory(receiver.address, acknowledged=True))
    manager.start()
    handles = [manager.deliver(message, timeout=0.3) for message in numbered(3)]
    flushed = threading.Event()

    def flush() -> None:
        manager.flush()
        flushed.set()

    flusher = threading.Thread(target=flush, name="test-flush")
    flusher.start()
    try:
        assert flushed.wait(30.0), "flush() without a timeout never returned"
        assert all(h.done() for h in handles)
        assert {getattr(h.exception(), "code", None) for h in handles} == {"DELIVERY_TIMEOUT"}
    finally:
        gate.open.set()
        flusher.join(TIMEOUT)


def test_a_refused_message_does_not_count_against_the_breaker(
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    make_manager: Callable[..., dwcp.Manager],
) -> None:
    """README.md, "Delivery through outages: manager.deliver()": "A message the transport
    refuses (over its `max_message_size`) fails alone with `DeliveryError` (`REFUSED`, the
    `ValueError` as `__cause__`) and does not count against the breaker." """
    receiver, inbox = receiver_factory()
    manager = make_manager(
        transport_factory(receiver.address, acknowledged=True, max_message_size=100),
        max_failures=1,  # a single counted failure would open it
    )
    manager.start()
    refused = [manager.deliver(bytes(101)) for _ in range(3)]
    manager.flush(timeout=TIMEOUT)
    assert {getattr(h.exception(), "code", None) for h in refused} == {"REFUSED"}
    assert manager.circuit_breaker_state == "closed"
    assert manager.metrics().send_errors == 0
    manager.deliver(b"after").result(timeout=TIMEOUT)
    assert inbox.messages == [b"after"]


class Held(MultiStreamTCPTransport):
    """A real transport that notes which thread sends, and holds sends of ``b"held"``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.senders: list[tuple[bytes, str]] = []
        self.calls = 0  # of send() and of _queue_for_delivery() (a run of queued messages)
        self.runs: list[int] = []  # how many messages each run queued
        self.holding = threading.Event()
        self.release = threading.Event()

    def send(self, data: Any, *, wait: bool = False) -> None:
        self.calls += 1
        self.senders.append((bytes(data), threading.current_thread().name))
        if bytes(data) == b"held":
            self.holding.set()
            assert self.release.wait(TIMEOUT), "the test never released the send"
        super().send(data, wait=wait)

    def _queue_for_delivery(self, messages: Any) -> int:
        self.calls += 1
        queued = super()._queue_for_delivery(messages)
        self.runs.append(queued)
        name = threading.current_thread().name
        self.senders += [(bytes(message), name) for message in messages[:queued]]
        return queued


def test_deliver_sends_on_the_calling_thread_when_nothing_is_queued_else_on_dwcp_delivery(
    receiver_factory: ReceiverFactory, make_manager: Callable[..., dwcp.Manager]
) -> None:
    """README.md, "Delivery through outages: manager.deliver()", **Order.**: "one send at a
    time: by the calling thread itself when nothing is queued, nothing awaits confirmation
    and nothing stands in the way, otherwise by the manager's `dwcp-delivery` thread, which
    starts with the first `deliver()` and is joined by `stop()`." """
    receiver, inbox = receiver_factory()
    transport = Held(receiver.address, acknowledged=True)
    manager = make_manager(transport)
    manager.start()

    def delivery_threads() -> int:
        return [t.name for t in threading.enumerate()].count("dwcp-delivery")

    assert delivery_threads() == 0
    manager.deliver(b"first").result(timeout=TIMEOUT)
    assert transport.senders == [(b"first", threading.current_thread().name)]
    assert delivery_threads() == 1  # started with the first deliver()
    holder = threading.Thread(target=manager.deliver, args=(b"held",), name="test-holder")
    holder.start()
    try:
        assert transport.holding.wait(TIMEOUT)  # the holder is inside its own send
        queued = manager.deliver(b"queued")  # a send is in the way: queued, returns at once
        assert not queued.done()
    finally:
        transport.release.set()
        holder.join(TIMEOUT)
    manager.flush(timeout=TIMEOUT)
    assert transport.senders[1:] == [(b"held", "test-holder"), (b"queued", "dwcp-delivery")]
    assert inbox.messages == [b"first", b"held", b"queued"]
    manager.stop()
    assert delivery_threads() == 0


def test_a_stream_of_messages_goes_out_in_runs_each_one_call_through_the_breaker(
    receiver_factory: ReceiverFactory, make_manager: Callable[..., dwcp.Manager]
) -> None:
    """README.md, **Order.**: "a lone message goes out at once, and a stream of them queues:
    the thread sends what queued in runs of up to 256 messages, each run one call through the
    breaker"; **Retries and the breaker.**: "a run counts as one call (one success, or one
    failure), and each of its messages as a send in `metrics().sends`"."""
    gate = Gate()
    gate.open.clear()
    receiver, _ = receiver_factory(on_message=gate)
    transport = Held(receiver.address, acknowledged=True)
    manager = make_manager(transport)
    manager.start()
    admitted = [0]
    admit = manager._breaker.admit

    def counting_admit(*args: Any) -> int:
        admitted[0] += 1
        return admit(*args)

    manager._breaker.admit = counting_admit  # type: ignore[method-assign,assignment]
    manager.deliver(b"first")  # a lone message: sent by this thread at once
    assert transport.senders == [(b"first", threading.current_thread().name)]
    assert gate.waiting.wait(TIMEOUT)  # the receiver holds it: it awaits confirmation
    handles = [manager.deliver(message) for message in numbered(300)]
    wait_until(lambda: len(transport.senders) == 301)
    assert [data for data, _ in transport.senders] == [b"first", *numbered(300)]
    assert {thread for _, thread in transport.senders[1:]} == {"dwcp-delivery"}
    runs = [queued for queued in transport.runs if queued]
    assert sum(runs) >= 300 - 10 and max(runs) <= 256 and len(runs) < 300
    assert admitted[0] == transport.calls  # one admission per run, as per send
    assert manager.metrics().sends == 301
    gate.open.set()
    manager.flush(timeout=TIMEOUT)
    assert [handle.exception() for handle in handles] == [None] * 300
    assert gate.messages == [b"first", *numbered(300)]


def test_the_managers_delivery_timeout_is_each_messages_default_deadline(
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    make_manager: Callable[..., dwcp.Manager],
) -> None:
    """README.md, "Delivery through outages: manager.deliver()", **Deadline.**: "`timeout`
    (default `delivery_timeout`, 120 s) counts from `deliver()`. A message not confirmed by
    then fails with `DeliveryError` (code `DELIVERY_TIMEOUT`)." """
    gate = Gate()
    gate.open.clear()
    receiver, _ = receiver_factory(on_message=gate)
    manager = make_manager(
        transport_factory(receiver.address, acknowledged=True), delivery_timeout=0.3
    )
    manager.start()
    try:
        began = time.monotonic()
        handle = manager.deliver(b"no timeout given")
        error = handle.exception(timeout=30.0)
        assert error is not None and error.code == "DELIVERY_TIMEOUT", error
        assert time.monotonic() - began >= 0.3  # not before its deadline
        own = manager.deliver(b"its own", timeout=60.0)
        with pytest.raises(TimeoutError):  # pending past 0.3 s: its own 60 s deadline holds
            own.result(timeout=1.0)
    finally:
        gate.open.set()
