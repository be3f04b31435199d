"""The cross-process test tools themselves: payloads, the fault proxy, child lifetimes.

No dwcp transport here: the proxy is checked against a plain socket peer, so a failure in
``test_cross_process`` can be blamed on the transport, not on its tools.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faultproxy import FaultProxy, fault_proxy_fixture  # noqa: F401 - "fault_proxy"
from tests.payload import ANONYMOUS, HEADER, ID_SIZE, PayloadError, make_payload, verify_payload
from tests.procs import (  # noqa: F401 - receiver_process_fixture: "receiver_process"
    ReceiverProcess,
    receiver_process_fixture,
)

ProxyFactory = Callable[..., FaultProxy]

# -- payloads ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [*range(40), 1023, 1024, 1025, 65537, (4 << 20) + 65537, 9 << 20])
def test_payload_round_trip(size: int) -> None:
    payload = make_payload(7, 1234, size)
    assert len(payload) == size
    assert payload == make_payload(7, 1234, size)  # deterministic
    expected = (7, 1234) if size >= ID_SIZE else (ANONYMOUS, ANONYMOUS)
    assert verify_payload(payload) == expected
    assert verify_payload(memoryview(payload)) == expected


def test_payloads_differ_between_messages() -> None:
    bodies = {make_payload(w, s, 4096)[HEADER.size :] for w in range(3) for s in range(20)}
    assert len(bodies) == 60


@pytest.mark.parametrize("size", [11, 15, 16, 17, 100])
def test_every_single_bit_flip_is_detected(size: int) -> None:
    payload = make_payload(3, 99, size)
    for bit in range(size * 8):
        corrupted = bytearray(payload)
        corrupted[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(PayloadError):
            verify_payload(corrupted)


def test_truncated_or_extended_payload_is_detected() -> None:
    payload = make_payload(1, 2, 5000)
    for wrong in (
        payload[:-1],
        payload + b"x",
        payload[: HEADER.size] + payload[HEADER.size + 1 :],
    ):
        with pytest.raises(PayloadError):
            verify_payload(wrong)


# -- the fault proxy against a plain socket peer -------------------------------------------


class Peer:
    """A plain TCP server on loopback: keeps what each connection sent, can send back."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.create_server((host, 0), family=family)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.connections: list[socket.socket] = []
        self.accepted = threading.Condition()
        self._thread = threading.Thread(target=self._accept, name="harness-peer", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.accepted:
                self.connections.append(conn)
                self.accepted.notify_all()

    def connection(self, index: int, timeout: float = 5.0) -> socket.socket:
        with self.accepted:
            assert self.accepted.wait_for(lambda: len(self.connections) > index, timeout)
            conn = self.connections[index]
        conn.settimeout(timeout)
        return conn

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._thread.join(5.0)
        for conn in self.connections:
            conn.close()


@pytest.fixture
def peer() -> Iterator[Peer]:
    server = Peer()
    yield server
    server.close()


def read_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def read_to_eof(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


DATA = bytes(range(256)) * 400  # 102400 bytes


def test_proxy_passes_both_directions(
    fault_proxy: ProxyFactory, peer: Peer, raw_connections: Callable[..., socket.socket]
) -> None:
    proxy = fault_proxy(peer.address)
    client = raw_connections(proxy.address)
    client.sendall(DATA)
    server = peer.connection(0)
    assert read_exactly(server, len(DATA)) == DATA
    server.sendall(DATA[::-1])
    assert read_exactly(client, len(DATA)) == DATA[::-1]
    client.shutdown(socket.SHUT_WR)  # half-closes are passed on
    assert server.recv(1) == b""
    stats = proxy.wait_for(lambda s: s["bytes_up"] == len(DATA), 5)
    assert stats["bytes_down"] == len(DATA) and stats["accepted"] == 1


@pytest.mark.parametrize(("after", "bit"), [(0, 0), (1, 7), (70_000, 3)])
def test_proxy_flips_exactly_one_bit(
    fault_proxy: ProxyFactory,
    peer: Peer,
    raw_connections: Callable[..., socket.socket],
    after: int,
    bit: int,
) -> None:
    proxy = fault_proxy(peer.address)
    client = raw_connections(proxy.address)
    server = peer.connection(0)
    proxy.corrupt(after, bit=bit)
    client.sendall(DATA)
    got = read_exactly(server, len(DATA))
    diff = [i for i in range(len(DATA)) if got[i] != DATA[i]]
    assert diff == [after] and got[after] ^ DATA[after] == 1 << bit
    assert proxy.stats()["mode"] == "pass"  # one-shot


@pytest.mark.parametrize("fault", ["close", "rst"])
def test_proxy_cuts_after_exactly_n_bytes(
    fault_proxy: ProxyFactory,
    peer: Peer,
    raw_connections: Callable[..., socket.socket],
    fault: str,
) -> None:
    proxy = fault_proxy(peer.address)
    client = raw_connections(proxy.address)
    server = peer.connection(0)
    if fault == "close":
        proxy.close_after(12_345)
    else:
        proxy.reset(12_345)
    client.sendall(DATA[:20_000])
    if fault == "close":
        assert read_to_eof(server) == DATA[:12_345]
        assert read_to_eof(client) == b""
    else:
        got = bytearray()
        with pytest.raises(ConnectionResetError):
            while chunk := server.recv(65536):
                got += chunk
        assert bytes(got) == DATA[: len(got)] and len(got) <= 12_345
        with pytest.raises(ConnectionResetError):
            read_to_eof(client)
    assert len(proxy.stats()["fired"]) == 1


def test_proxy_reset_now_and_refuse(
    fault_proxy: ProxyFactory, peer: Peer, raw_connections: Callable[..., socket.socket]
) -> None:
    proxy = fault_proxy(peer.address)
    first = raw_connections(proxy.address)
    peer.connection(0)
    proxy.reset()  # after=0: every current connection, at once
    with pytest.raises(ConnectionResetError):
        read_to_eof(first)
    proxy.refuse()
    refused = raw_connections(proxy.address)
    assert read_to_eof(refused) == b""
    assert proxy.stats()["refused"] == 1
    proxy.passthrough()
    again = raw_connections(proxy.address)
    again.sendall(b"hello")
    assert read_exactly(peer.connection(1), 5) == b"hello"


def test_proxy_partial_writes_keep_the_bytes(
    fault_proxy: ProxyFactory, peer: Peer, raw_connections: Callable[..., socket.socket]
) -> None:
    proxy = fault_proxy(peer.address)
    proxy.partial(max_piece=7, delay=0.0005, every=8)
    client = raw_connections(proxy.address)
    server = peer.connection(0)
    data = DATA[:20_000]
    client.sendall(data)
    got = bytearray()
    reads = 0
    while len(got) < len(data):
        chunk = server.recv(65536)
        assert chunk
        got += chunk
        reads += 1
    assert bytes(got) == data
    assert reads > 100  # it really arrived in pieces


def test_proxy_stall_holds_bytes_until_resumed(
    fault_proxy: ProxyFactory, peer: Peer, raw_connections: Callable[..., socket.socket]
) -> None:
    proxy = fault_proxy(peer.address)
    client = raw_connections(proxy.address)
    server = peer.connection(0)
    proxy.stall()
    client.sendall(b"held")
    server.settimeout(0.3)
    with pytest.raises(TimeoutError):  # nothing may arrive while stalled
        server.recv(10)
    proxy.passthrough()
    server.settimeout(5.0)
    assert read_exactly(server, 4) == b"held"


def test_proxy_rate_limit(
    fault_proxy: ProxyFactory, peer: Peer, raw_connections: Callable[..., socket.socket]
) -> None:
    proxy = fault_proxy(peer.address)
    proxy.rate(200_000)
    client = raw_connections(proxy.address)
    server = peer.connection(0)
    started = time.monotonic()
    client.sendall(DATA)
    assert read_exactly(server, len(DATA)) == DATA
    assert time.monotonic() - started >= 0.8 * len(DATA) / 200_000


def test_proxy_listens_on_ipv6_loopback(
    fault_proxy: ProxyFactory, peer: Peer, raw_connections: Callable[..., socket.socket]
) -> None:
    proxy = fault_proxy(peer.address, host="::1")
    client = raw_connections(proxy.address)
    client.sendall(b"six")
    assert read_exactly(peer.connection(0), 3) == b"six"


# -- child process lifetimes -----------------------------------------------------------------


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_receiver_child_kill_restart_close_leave_no_process(tmp_path: Path) -> None:
    receiver = ReceiverProcess(log_path=tmp_path / "r.log")
    try:
        first, address = receiver.pid, receiver.address
        assert receiver.stats()["delivered"] == 0
        assert receiver.kill() == -signal.SIGKILL
        assert _gone(first)
        receiver.restart()
        assert receiver.address == address and receiver.pid != first
        second = receiver.pid
        receiver.kill(signal.SIGSTOP)  # close() must cope with a frozen child too
        started = time.monotonic()
    finally:
        receiver.close()
    assert time.monotonic() - started < 10
    assert _gone(second)
    assert "Receiver started" in receiver.log_tail()


def test_child_that_fails_to_start_is_reaped(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="failed to start"):
            ReceiverProcess(port=port, bind_timeout=0.2, log_path=tmp_path / "r.log")
