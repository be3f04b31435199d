"""End to end over real loopback TCP: a plain socket peer that dies and comes back."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

import dwcp
from tests.conftest import wait_until

MakeManager = Callable[..., dwcp.Manager]


class Peer:
    """A plain TCP server on 127.0.0.1 that counts bytes; stop() and start() keep the port."""

    def __init__(self) -> None:
        self.port = 0
        self.received = 0
        self._lock = threading.Lock()
        self._server: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []

    def start(self) -> None:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen()
        self.port = server.getsockname()[1]
        self._server = server
        thread = threading.Thread(target=self._accept, args=(server,), name="test-peer-accept")
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            # shutdown() wakes the blocked accept(); close() alone does not on Linux.
            try:
                server.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            server.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(5)

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
            reader = threading.Thread(target=self._read, args=(conn,), name="test-peer-read")
            reader.start()
            self._threads.append(reader)

    def _read(self, conn: socket.socket) -> None:
        while True:
            try:
                chunk = conn.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            with self._lock:
                self.received += len(chunk)


class SocketTransport:
    """The simplest honest transport: one TCP connection, sendall, and a liveness probe."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._sock: socket.socket | None = None

    def start(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
        # Blocking mode, so the MSG_DONTWAIT probe in health_check() returns at once.
        sock.settimeout(None)
        self._sock = sock

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def send(self, data: bytes | bytearray | memoryview) -> None:
        sock = self._sock
        if sock is None:
            raise dwcp.TransportError("not connected")
        sock.sendall(data)

    def health_check(self) -> None:
        sock = self._sock
        if sock is None:
            raise dwcp.TransportError("not connected")
        try:
            data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return  # nothing to read and no EOF: the connection is alive
        if not data:
            raise dwcp.TransportError("peer closed the connection")


@pytest.fixture
def peer() -> Iterator[Peer]:
    server = Peer()
    server.start()
    yield server
    server.stop()


def send_until_rejected(manager: dwcp.Manager, limit: int = 1000) -> int:
    """Send until the breaker rejects; returns how many transport errors were raised."""
    errors = 0
    for _ in range(limit):
        try:
            manager.send_with_circuit_breaker(b"x" * 1024)
        except dwcp.CircuitOpenError:
            return errors
        except dwcp.TransportError:
            errors += 1
    raise AssertionError("the breaker never opened")


def test_peer_restart_full_recovery_cycle(make_manager: MakeManager, peer: Peer) -> None:
    transport = SocketTransport(peer.port)
    manager = make_manager(
        transport,
        health_interval=0.02,
        initial_backoff=0.05,
        max_retries=3,
        max_failures=3,
        reset_timeout=3600,
    )
    manager.start()
    for _ in range(10):
        manager.send_with_circuit_breaker(b"y" * 1000)
    wait_until(lambda: peer.received == 10_000)

    peer.stop()
    assert send_until_rejected(manager) == 3
    assert manager.circuit_breaker_state == "open"
    wait_until(lambda: manager.health().components["transport"].status in ("recovering", "failed"))

    peer.start()  # same port
    wait_until(lambda: manager.health().components["transport"].healthy, timeout=10)
    assert manager.circuit_breaker_state == "half-open"
    before = peer.received
    manager.send_with_circuit_breaker(b"z" * 500)
    assert manager.circuit_breaker_state == "closed"
    wait_until(lambda: peer.received == before + 500)
    metrics = manager.metrics()
    assert metrics.recoveries_succeeded >= 1
    assert metrics.downtime_seconds["transport"] > 0


def test_peer_refusing_connections_fails_recovery(make_manager: MakeManager, peer: Peer) -> None:
    transport = SocketTransport(peer.port)
    manager = make_manager(transport, initial_backoff=0.01)
    manager.start()
    peer.stop()
    assert not manager.attempt_component_recovery("transport")
    health = manager.health().components["transport"]
    assert health.status == "failed"
    assert "ConnectionRefusedError" in (health.last_error or "")


def test_recovery_under_load(make_manager: MakeManager, peer: Peer) -> None:
    """Four threads keep sending while the peer dies and returns; nobody deadlocks."""
    transport = SocketTransport(peer.port)
    manager = make_manager(
        transport, health_interval=0.02, initial_backoff=0.02, max_failures=3, reset_timeout=0.2
    )
    manager.start()
    stop = threading.Event()
    outcomes = {"ok": 0, "error": 0, "rejected": 0}
    lock = threading.Lock()

    def sender() -> None:
        for _ in range(100_000):
            if stop.is_set():
                return
            try:
                manager.send_with_circuit_breaker(b"w" * 256)
                kind = "ok"
            except dwcp.CircuitOpenError:
                kind = "rejected"
            except dwcp.TransportError:
                kind = "error"
            with lock:
                outcomes[kind] += 1
            if kind != "ok":
                stop.wait(0.001)  # back off a failing sender instead of spinning on the GIL

    threads = [threading.Thread(target=sender, name=f"test-sender-{i}") for i in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: outcomes["ok"] > 100)
        peer.stop()
        wait_until(lambda: outcomes["rejected"] > 0, timeout=10)
        peer.start()
        wait_until(lambda: manager.health().components["transport"].healthy, timeout=10)
        ok_before = outcomes["ok"]
        wait_until(lambda: outcomes["ok"] > ok_before + 100, timeout=10)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert manager.circuit_breaker_state == "closed"
    assert manager.metrics().breaker_rejections == outcomes["rejected"]
