"""End to end through the Manager over loopback: a real MultiStreamTCPTransport, monitor,
recovery and breaker, against peers that refuse, hang up mid-message, stall, and restart.

Every scenario checks the delivery invariant: each message reached the receiver intact
exactly once, or its send raised; with ``acknowledged=True`` no message whose send returned
is missing (one the link lost is resent by the next session, after recovery), and none whose
send raised arrived (an acknowledged send raises only when it took nothing).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Literal, TypeVar

import pytest

import dwcp
from dwcp.transport import wire
from tests.conftest import wait_until

MakeManager = Callable[..., dwcp.Manager]
Outcome = Literal["ok", "failed", "rejected"]
E = TypeVar("E")

_ID = struct.Struct("!Q")
# Small enough that the tests stay fast, large enough that every stage shows up.
FAST = {
    "health_interval": 0.05,
    "health_check_timeout": 1.0,
    "initial_backoff": 0.02,
    "max_failures": 5,
    # Long: in these tests only a verified recovery may move the breaker to half-open.
    "reset_timeout": 30.0,
}


def message(ident: int, size: int = 256) -> bytes:
    """A message that names itself: its id, then filler derived from the id."""
    head = _ID.pack(ident)
    return (head * (size // len(head) + 1))[:size]


class Inbox:
    """What the receiver delivered, by message id; notices corrupt and foreign payloads."""

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.corrupt: list[bytes] = []
        self._cond = threading.Condition()

    def __call__(self, data: bytes) -> None:
        ident = _ID.unpack_from(data)[0] if len(data) >= _ID.size else -1
        with self._cond:
            if ident < 0 or data != message(ident, len(data)):
                self.corrupt.append(data[:32])
            else:
                self.counts[ident] += 1
            self._cond.notify_all()

    def has(self, ident: int) -> bool:
        with self._cond:
            return ident in self.counts


class Ledger:
    """The sending side's record: how each message's send ended."""

    def __init__(self, manager: dwcp.Manager, size: int = 256) -> None:
        self.manager = manager
        self.size = size
        self.outcomes: dict[int, Outcome] = {}
        self.errors: dict[int, dwcp.DWCPError] = {}
        self._lock = threading.Lock()

    def send(self, ident: int, size: int | None = None) -> Outcome:
        """Send message ``ident`` through the breaker and record how it ended."""
        outcome: Outcome
        try:
            self.manager.send_with_circuit_breaker(message(ident, size or self.size))
        except dwcp.CircuitOpenError as exc:
            outcome = "rejected"
            self.errors[ident] = exc
        except dwcp.TransportError as exc:
            outcome = "failed"
            self.errors[ident] = exc
        else:
            outcome = "ok"
        with self._lock:
            assert ident not in self.outcomes, f"message {ident} sent twice by the test"
            self.outcomes[ident] = outcome
        return outcome

    def count(self, outcome: Outcome) -> int:
        with self._lock:
            return sum(1 for o in self.outcomes.values() if o == outcome)

    def ids(self, outcome: Outcome) -> set[int]:
        with self._lock:
            return {i for i, o in self.outcomes.items() if o == outcome}


def assert_delivery_invariant(ledger: Ledger, inbox: Inbox) -> None:
    """Intact exactly once, or the send raised; a send that returned was delivered."""
    assert inbox.corrupt == [], "corrupt or foreign payloads were delivered"
    duplicates = {i: n for i, n in inbox.counts.items() if n > 1}
    assert duplicates == {}, "messages delivered more than once"
    unknown = set(inbox.counts) - set(ledger.outcomes)
    assert unknown == set(), "delivered messages nobody sent"
    rejected = ledger.ids("rejected") & set(inbox.counts)
    assert rejected == set(), "messages the breaker rejected reached the peer"
    failed = ledger.ids("failed") & set(inbox.counts)
    assert failed == set(), "messages whose send raised reached the peer"
    missing = ledger.ids("ok") - set(inbox.counts)
    assert missing == set(), "acknowledged sends missing at the receiver"


class Events:
    """Collects the manager's events; tests wait on them instead of sleeping."""

    def __init__(self) -> None:
        self.seen: list[dwcp.Event] = []
        self._cond = threading.Condition()

    def __call__(self, event: dwcp.Event) -> None:
        with self._cond:
            self.seen.append(event)
            self._cond.notify_all()

    def of(self, kind: type[E]) -> list[E]:
        with self._cond:
            return [e for e in self.seen if isinstance(e, kind)]

    def wait_for(self, condition: Callable[[], object], timeout: float = 5.0) -> None:
        with self._cond:
            if not self._cond.wait_for(condition, timeout):
                raise AssertionError(f"event condition not met within {timeout}s: {self.seen}")

    def breaker_path(self) -> list[tuple[str, str]]:
        return [(e.old, e.new) for e in self.of(dwcp.BreakerStateChanged)]

    def recovered(self) -> bool:
        return any(e.component == "transport" for e in self.of(dwcp.RecoverySucceeded))


# -- peers ----------------------------------------------------------------------------------


class RawPeer:
    """A hand-written DWCP peer on 127.0.0.1 that answers handshakes, then misbehaves.

    ``stall``: never reads a byte after the handshake.  ``hangup``: reads ``partial`` bytes
    of the first data it gets, then closes every connection and its listener.
    """

    def __init__(self, mode: Literal["stall", "hangup"], partial: int = 0) -> None:
        self.mode = mode
        self.partial = partial
        self.hung_up = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit a small receive buffer, so a stalled peer fills up fast.
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        server.bind(("127.0.0.1", 0))
        server.listen()
        self.port: int = server.getsockname()[1]
        self._server: socket.socket | None = server
        thread = threading.Thread(target=self._accept, args=(server,), name="test-rawpeer-accept")
        self._threads.append(thread)
        thread.start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with self._lock:
                if self._server is None:
                    conn.close()
                    return
                self._conns.append(conn)
                thread = threading.Thread(target=self._serve, args=(conn,), name="test-rawpeer")
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            hello = _read_exactly(conn, wire.HANDSHAKE.size)
            wire.parse_handshake(hello)
            conn.sendall(wire.pack_welcome(wire.STATUS_ACCEPTED))
            if self.mode == "hangup":
                _read_exactly(conn, self.partial)
                self.hang_up()
        except OSError:
            pass  # stop() closed the connection under us

    def hang_up(self) -> None:
        """Close the listener and every connection, without joining (a peer thread calls it)."""
        with self._lock:
            server, self._server = self._server, None
            conns, self._conns = self._conns, []
        if server is not None:
            _shutdown(server)
        for conn in conns:
            _shutdown(conn)
        self.hung_up.set()

    def stop(self) -> None:
        self.hang_up()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(5)
            assert not thread.is_alive(), f"{thread.name} did not stop"


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    parts = []
    while size:
        part = conn.recv(size)
        if not part:
            raise ConnectionError("peer closed")
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


def _shutdown(sock: socket.socket) -> None:
    # shutdown() wakes a thread blocked in accept() or recv() on Linux; close() alone does not.
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


@pytest.fixture
def inbox() -> Inbox:
    return Inbox()


@pytest.fixture
def receiver(inbox: Inbox) -> Iterator[dwcp.MultiStreamReceiver]:
    receiver = dwcp.MultiStreamReceiver(("127.0.0.1", 0), on_message=inbox)
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture
def raw_peers() -> Iterator[Callable[..., RawPeer]]:
    made: list[RawPeer] = []

    def make(mode: Literal["stall", "hangup"], partial: int = 0) -> RawPeer:
        peer = RawPeer(mode, partial)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.stop()


def managed(
    make_manager: MakeManager,
    port: int,
    *,
    streams: int = 2,
    send_timeout: float = 1.0,
    acknowledged: bool = True,
    keepalive_interval: float | None = 5.0,
    **options: object,
) -> tuple[dwcp.Manager, dwcp.MultiStreamTCPTransport, Events]:
    """A manager over a MultiStreamTCPTransport to 127.0.0.1:``port``, with an event log."""
    transport = dwcp.MultiStreamTCPTransport(
        ("127.0.0.1", port),
        streams=streams,
        chunk_size=64 * 1024,
        connect_timeout=1.0,
        send_timeout=send_timeout,
        acknowledged=acknowledged,
        keepalive_interval=keepalive_interval,
    )
    manager = make_manager(transport, **{**FAST, **options})
    events = Events()
    manager.add_listener(events)
    return manager, transport, events


def transport_status(manager: dwcp.Manager) -> str:
    return manager.health().components["transport"].status


def broken(transport: dwcp.MultiStreamTCPTransport) -> bool:
    """Whether the transport's own health check fails (before the monitor looks)."""
    try:
        transport.health_check()
    except dwcp.TransportError:
        return True
    return False


def send_until_rejected(ledger: Ledger, first: int, limit: int = 200) -> int:
    """Send fresh messages until the breaker rejects one; return the next unused id."""
    for ident in range(first, first + limit):
        if ledger.send(ident) == "rejected":
            return ident + 1
    raise AssertionError("the breaker never opened")


# -- 1. the peer refuses connections -----------------------------------------------------------


def test_fail_fast_start_against_a_refusing_peer_raises_transport_error(
    make_manager: MakeManager, receiver: dwcp.MultiStreamReceiver
) -> None:
    port = receiver.address[1]
    receiver.stop()
    manager, _, _ = managed(make_manager, port, fail_fast=True)
    with pytest.raises(dwcp.TransportError, match="Connection refused"):
        manager.start()
    assert not manager.is_started
    assert not manager.monitor_alive


def test_start_against_a_refusing_peer_starts_degraded_and_connects_when_it_returns(
    make_manager: MakeManager, receiver: dwcp.MultiStreamReceiver, inbox: Inbox
) -> None:
    port = receiver.address[1]
    receiver.stop()
    manager, _, events = managed(make_manager, port, max_retries=100)
    manager.start()  # the peer is down: no exception, recovery takes over
    assert manager.is_started and manager.monitor_alive
    assert transport_status(manager) == "recovering"
    with pytest.raises(dwcp.DWCPError):  # sends fail fast meanwhile
        manager.send_with_circuit_breaker(b"too early")
    receiver.start()
    events.wait_for(events.recovered, timeout=10)
    assert transport_status(manager) == "healthy"
    manager.send_with_circuit_breaker(message(7, 100))
    assert receiver.wait_delivered(1, 5.0)
    assert dict(inbox.counts) == {7: 1} and not inbox.corrupt


def test_peer_refusing_while_running_fails_recovery_and_opens_the_breaker(
    make_manager: MakeManager, receiver: dwcp.MultiStreamReceiver, inbox: Inbox
) -> None:
    # A backoff long enough that the sends below fail on the broken session, before the
    # first recovery attempt closes the transport (a closed transport's NOT_STARTED does not
    # count against the breaker).
    manager, transport, events = managed(make_manager, receiver.address[1], initial_backoff=0.05)
    manager.start()
    ledger = Ledger(manager)
    for ident in range(20):
        assert ledger.send(ident) == "ok"
    transport.flush()  # all 20 acknowledged: this receiver does not come back to get them

    receiver.stop()
    wait_until(lambda: broken(transport))
    next_id = send_until_rejected(ledger, 20)
    assert ledger.count("failed") == 5  # max_failures, then the breaker opened
    assert all(ledger.errors[i].code == "TRANSPORT_ERROR" for i in ledger.ids("failed"))
    assert manager.circuit_breaker_state == "open"
    events.wait_for(lambda: events.breaker_path()[:1] == [("closed", "open")])

    events.wait_for(lambda: events.of(dwcp.RecoveryFailed), timeout=5)
    failed = events.of(dwcp.RecoveryFailed)[0]
    assert failed.component == "transport" and failed.attempts == 3
    assert "Connection refused" in (failed.error or "")
    backoffs = [e.backoff for e in events.of(dwcp.RecoveryAttempt)[:3]]
    assert backoffs == pytest.approx([0.05, 0.1, 0.2])
    health = manager.health().components["transport"]
    assert health.status in ("failed", "recovering")  # a later tick may start a new cycle
    assert ledger.send(next_id) == "rejected"  # the open breaker never touches the network

    manager.stop()
    receiver.stop()
    assert_delivery_invariant(ledger, inbox)
    assert set(inbox.counts) == set(range(20))


# -- 2. the peer closes mid-message ----------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "partial"),
    [
        # One frame: the peer reads the header and half the payload.
        (4096, wire.DATA_HEADER.size + 2048),
        # Chunked (64 KiB chunks over 2 streams): the peer reads part of the first chunk.
        (300_000, wire.DATA_HEADER.size + 10_000),
    ],
    ids=["single-frame", "chunked"],
)
def test_peer_closing_mid_message_then_recovery_resends_it(
    make_manager: MakeManager,
    raw_peers: Callable[..., RawPeer],
    inbox: Inbox,
    size: int,
    partial: int,
) -> None:
    peer = raw_peers("hangup", partial)
    manager, transport, events = managed(make_manager, peer.port)
    manager.start()
    ledger = Ledger(manager, size)

    started = time.monotonic()
    # In the window once sent: the peer hanging up mid-message loses nothing.
    assert ledger.send(0) == "ok"
    # Within send_timeout (1 s) and a busy machine's scheduling: twice it still excludes a
    # send that waited it out more than once (once per stream), or hung.
    assert time.monotonic() - started < 2 * 1.0
    assert peer.hung_up.wait(5)
    wait_until(lambda: broken(transport) or not transport.started)

    # A real receiver takes over the port; recovery reconnects to it.
    receiver = dwcp.MultiStreamReceiver(("127.0.0.1", peer.port), on_message=inbox)
    receiver.start()
    try:
        events.wait_for(events.recovered, timeout=5)
        unhealthy = events.of(dwcp.ComponentUnhealthy)
        assert unhealthy and unhealthy[0].component == "transport"
        for ident in range(1, 21):
            assert ledger.send(ident) == "ok"
        assert manager.circuit_breaker_state == "closed"
    finally:
        manager.stop()
        receiver.stop()
    assert_delivery_invariant(ledger, inbox)
    assert dict(inbox.counts) == {ident: 1 for ident in range(21)}  # 0 resent, once


# -- 3. the peer stalls ------------------------------------------------------------------------


def test_stalled_peer_times_out_a_large_send_and_recovery_kicks_in(
    make_manager: MakeManager, raw_peers: Callable[..., RawPeer]
) -> None:
    peer = raw_peers("stall")
    # Unacknowledged: the send owns its failure (an acknowledged one would keep the message
    # for the next session instead, see the next test).
    # Without a keepalive, a write stalled for send_timeout is the fault (with one, the peer's
    # silence must also last keepalive_interval + keepalive_timeout: a slow consumer's does not).
    send_timeout = 2.0
    manager, _, events = managed(
        make_manager,
        peer.port,
        send_timeout=send_timeout,
        acknowledged=False,
        keepalive_interval=None,
    )
    manager.start()
    ledger = Ledger(manager)

    started = time.monotonic()
    # 16 MiB over 2 streams: far more than the socket buffers between us and a silent peer.
    assert ledger.send(0, size=16 * 1024 * 1024) == "failed"
    elapsed = time.monotonic() - started
    # The stall is waited out; the upper bound leaves room for a busy machine and still
    # excludes waiting send_timeout more than once (once per stream: 2 of them, or per chunk).
    assert 0.9 * send_timeout <= elapsed < 2 * send_timeout, elapsed
    assert "stall" in str(ledger.errors[0])

    events.wait_for(lambda: events.of(dwcp.ComponentUnhealthy), timeout=5)
    flagged = events.of(dwcp.ComponentUnhealthy)[0]
    assert flagged.component == "transport"
    assert "stalled" in flagged.error
    # The stalled peer still accepts and handshakes, so the reconnect itself succeeds.
    events.wait_for(lambda: events.of(dwcp.RecoveryStarted), timeout=5)
    events.wait_for(events.recovered, timeout=5)
    assert transport_status(manager) == "healthy"


def test_stalled_peer_never_acknowledging_breaks_the_transport_and_keeps_the_message(
    make_manager: MakeManager, raw_peers: Callable[..., RawPeer]
) -> None:
    peer = raw_peers("stall")
    # A silent peer and no keepalive: nothing but the missing ACK tells it is gone. (With a
    # keepalive, the break waits until no PONG came for its bound either.)
    manager, transport, events = managed(
        make_manager, peer.port, send_timeout=0.5, keepalive_interval=None
    )
    manager.start()
    ledger = Ledger(manager)
    started = time.monotonic()
    assert ledger.send(0) == "ok"  # in the window at once; no acknowledgement comes back
    events.wait_for(lambda: events.of(dwcp.ComponentUnhealthy), timeout=5)
    flagged = events.of(dwcp.ComponentUnhealthy)[0]
    assert "acknowledgement" in flagged.error
    # send_timeout at least; the upper bound only catches a hang on a busy machine.
    assert 0.45 <= time.monotonic() - started < 10.0
    events.wait_for(events.recovered, timeout=5)
    assert transport.unacknowledged == 1  # resent to the (stalled) peer, still unconfirmed


# -- 4. the peer restarts ----------------------------------------------------------------------


def test_peer_restart_breaker_opens_half_opens_and_closes(
    make_manager: MakeManager, receiver: dwcp.MultiStreamReceiver, inbox: Inbox
) -> None:
    manager, transport, events = managed(make_manager, receiver.address[1], initial_backoff=0.05)
    manager.start()
    ledger = Ledger(manager)
    for ident in range(20):
        assert ledger.send(ident) == "ok"

    receiver.stop()
    wait_until(lambda: broken(transport))
    next_id = send_until_rejected(ledger, 20)
    assert manager.circuit_breaker_state == "open"

    receiver.start()  # the same port
    events.wait_for(events.recovered, timeout=5)
    events.wait_for(lambda: ("open", "half-open") in events.breaker_path())
    assert manager.circuit_breaker_state == "half-open"

    assert ledger.send(next_id) == "ok"  # the trial
    assert manager.circuit_breaker_state == "closed"
    for ident in range(next_id + 1, next_id + 21):
        assert ledger.send(ident) == "ok"
    events.wait_for(lambda: ("half-open", "closed") in events.breaker_path())
    assert events.breaker_path() == [
        ("closed", "open"),
        ("open", "half-open"),
        ("half-open", "closed"),
    ]
    manager.stop()
    receiver.stop()
    assert_delivery_invariant(ledger, inbox)
    assert ledger.count("ok") == 41
    assert ledger.count("failed") == 5


def test_four_senders_through_a_peer_restart_lose_nothing(
    make_manager: MakeManager, receiver: dwcp.MultiStreamReceiver, inbox: Inbox
) -> None:
    manager, _, events = managed(make_manager, receiver.address[1], streams=4)
    manager.start()
    ledger = Ledger(manager, size=2048)
    stop = threading.Event()
    oks = [0] * 4
    crashed: list[BaseException] = []

    def sender(index: int) -> None:
        try:
            for seq in range(1_000_000):
                if stop.is_set():
                    return
                if ledger.send(index * 1_000_000 + seq) == "ok":
                    oks[index] += 1
                else:
                    stop.wait(0.002)  # back off a failing sender instead of spinning on the GIL
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            crashed.append(exc)

    threads = [
        threading.Thread(target=sender, args=(i,), name=f"test-sender-{i}") for i in range(4)
    ]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: min(oks) >= 20)
        receiver.stop()
        wait_until(lambda: ledger.count("rejected") > 0)
        receiver.start()
        events.wait_for(events.recovered, timeout=10)
        after = list(oks)
        wait_until(lambda: all(n >= a + 20 for n, a in zip(oks, after)), timeout=10)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert crashed == []
    assert manager.circuit_breaker_state == "closed"
    manager.stop()
    receiver.stop()
    assert_delivery_invariant(ledger, inbox)
    assert ledger.count("failed") >= 1
    # Only the sends that raised may be missing.
    assert set(ledger.outcomes) - set(inbox.counts) <= ledger.ids("failed") | ledger.ids("rejected")


# -- a transport left closed by a failed recovery ---------------------------------------------


def test_sends_while_recovery_holds_the_transport_closed_fail_fast_and_do_not_count(
    make_manager: MakeManager, receiver: dwcp.MultiStreamReceiver
) -> None:
    """A transport that recovery left closed fails every send at once with NOT_STARTED,
    counted as a send error; "not started" never counts against the breaker (the spec): this
    process not having reconnected is no evidence about the peer, and with a shared breaker
    it would re-trip every other process (issue 21)."""
    manager, _, events = managed(make_manager, receiver.address[1], initial_backoff=0.01)
    manager.start()
    receiver.stop()
    events.wait_for(lambda: events.of(dwcp.RecoveryFailed))  # the transport is left closed
    before = manager.metrics().send_errors
    ledger = Ledger(manager)
    for ident in range(10):
        assert ledger.send(ident) == "failed"
    assert {e.code for e in ledger.errors.values()} == {"NOT_STARTED"}
    assert manager.metrics().send_errors == before + 10
    assert manager.circuit_breaker_state == "closed"
