"""Shared fakes and helpers: fakes are real objects with switches, never mocks of our own code."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import dwcp
from dwcp import TransportError
from dwcp.testing import FakeTransport
from dwcp.transport import MultiStreamReceiver, MultiStreamTCPTransport, wire


def wait_until(
    condition: Callable[[], object], timeout: float = 5.0, interval: float = 0.002
) -> None:
    """Poll ``condition`` until it is truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        # A short poll interval, bounded by the deadline above, not a guess at thread timing.
        threading.Event().wait(interval)


def healthy(transport: MultiStreamTCPTransport) -> bool:
    """Whether ``transport.health_check()`` passes."""
    try:
        transport.health_check()
    except TransportError:
        return False
    return True


def stays(condition: Callable[[], object], seconds: float) -> bool:
    """Whether ``condition`` holds at every check for ``seconds`` (what is tested is time)."""
    deadline = time.monotonic() + seconds
    tick = threading.Event()
    while time.monotonic() < deadline:
        if not condition():
            return False
        tick.wait(0.02)
    return bool(condition())


def closed_by_peer(sock: socket.socket, timeout: float = 10.0) -> bool:
    """Read and discard until the peer closes the connection (True) or ``timeout``."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


@pytest.fixture
def transport() -> FakeTransport:
    return FakeTransport()


@pytest.fixture
def make_manager() -> Iterator[Callable[..., dwcp.Manager]]:
    """Build managers with fast timings; every one is stopped at teardown."""
    made: list[dwcp.Manager] = []

    def make(transport: object = None, **kwargs: object) -> dwcp.Manager:
        options: dict[str, object] = {
            "health_interval": 3600.0,  # ticks are driven by the test unless it asks otherwise
            "health_check_timeout": 1.0,
            "initial_backoff": 0.001,
            "reset_timeout": 30.0,
        }
        options.update(kwargs)
        manager = dwcp.Manager(transport, **options)  # type: ignore[arg-type]
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.stop()


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """Every test must leave no dwcp thread behind (tests release what they hang)."""
    yield

    def leaked() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("dwcp-")]

    try:
        wait_until(lambda: not leaked(), timeout=5.0)
    except AssertionError:
        raise AssertionError(f"threads left running: {leaked()}") from None


# -- transport fixtures (real loopback sockets) -----------------------------------------------


class Inbox:
    """Collects delivered messages; ``on_message`` is called serially per session."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def __call__(self, data: bytes) -> None:
        self.messages.append(data)


ReceiverFactory = Callable[..., tuple[MultiStreamReceiver, Inbox]]
TransportFactory = Callable[..., MultiStreamTCPTransport]


@pytest.fixture
def receiver_factory() -> Iterator[ReceiverFactory]:
    """Start receivers collecting into an Inbox on 127.0.0.1; stop them all afterwards."""
    started: list[MultiStreamReceiver] = []

    def make(**kwargs: Any) -> tuple[MultiStreamReceiver, Inbox]:
        inbox = Inbox()
        receiver = MultiStreamReceiver(on_message=kwargs.pop("on_message", inbox), **kwargs)
        receiver.start()
        started.append(receiver)
        return receiver, inbox

    yield make
    for receiver in started:
        receiver.stop()


@pytest.fixture
def transport_factory() -> Iterator[TransportFactory]:
    """Build (not start) transports with 1 KiB chunks; close them all afterwards."""
    made: list[MultiStreamTCPTransport] = []

    def make(address: tuple[str, int], **kwargs: Any) -> MultiStreamTCPTransport:
        kwargs.setdefault("chunk_size", 1024)
        kwargs.setdefault("connect_timeout", 5.0)
        kwargs.setdefault("send_timeout", 5.0)
        transport = MultiStreamTCPTransport(address, **kwargs)
        made.append(transport)
        return transport

    yield make
    for transport in made:
        transport.close()


@pytest.fixture
def raw_connections() -> Iterator[Callable[[tuple[str, int]], socket.socket]]:
    """Open raw client sockets; all closed afterwards."""
    opened: list[socket.socket] = []

    def connect(address: tuple[str, int]) -> socket.socket:
        sock = socket.create_connection(address, timeout=5.0)
        opened.append(sock)
        return sock

    yield connect
    for sock in opened:
        sock.close()


def pytest_configure(config: pytest.Config) -> None:
    # Heavy cross-process tests (tests/ops/test_cross_process.py); deselect with -m "not slow".
    config.addinivalue_line("markers", "slow: a heavy test (many MiB or seconds of traffic)")


# -- hand-rolled peers ------------------------------------------------------------------------


class RawPeer:
    """A hand-rolled server that answers handshakes, then misbehaves as told.

    ``mode``: "stall" never reads; "reset" reads ``read_bytes`` of data then resets the
    connection; "drain" reads everything and never acknowledges.
    """

    def __init__(self, mode: str, *, read_bytes: int = 0) -> None:
        self.mode = mode
        self.read_bytes = read_bytes
        self.listener = socket.create_server(("127.0.0.1", 0))
        # Small buffers make a non-reading peer push back after little data.
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.connections: list[socket.socket] = []
        self.done = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._accept_loop, name="raw-peer-accept")
        self._accept.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), name="raw-peer-conn")
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.recv(wire.HANDSHAKE.size, socket.MSG_WAITALL)
            conn.sendall(wire.pack_welcome(wire.STATUS_ACCEPTED))
            if self.mode == "stall":
                self.done.wait()
            elif self.mode == "reset":
                got = 0
                while got < self.read_bytes:
                    got += len(conn.recv(self.read_bytes - got)) or self.read_bytes
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
            elif self.mode == "drain":
                while conn.recv(65536):
                    pass

    def close(self) -> None:
        self.done.set()
        self.listener.close()
        # Closing a listening socket does not wake accept() everywhere; a connection does.
        with contextlib.suppress(OSError):
            socket.create_connection(self.address, timeout=1).close()
        self._accept.join()
        for conn in self.connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join()
        for conn in self.connections:
            conn.close()


@pytest.fixture
def raw_peer() -> Iterator[Callable[..., RawPeer]]:
    peers: list[RawPeer] = []

    def make(mode: str, **kwargs: int) -> RawPeer:
        peer = RawPeer(mode, **kwargs)
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.close()
