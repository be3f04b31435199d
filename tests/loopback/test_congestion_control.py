"""``MultiStreamTCPTransport(congestion_control=...)``: every stream runs the algorithm asked for.

Linux only (``TCP_CONGESTION``); the algorithm is read back from each stream's socket.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dwcp.transport import MultiStreamTCPTransport
from tests.conftest import ReceiverFactory, TransportFactory, wait_until

pytestmark = pytest.mark.skipif(
    not hasattr(socket, "TCP_CONGESTION"), reason="TCP_CONGESTION is Linux-only"
)

_PROC = "/proc/sys/net/ipv4/"


def _proc(name: str) -> list[str]:
    """The names in a /proc/sys/net/ipv4 file; none where there is no such file (not Linux:
    the module is skipped, but its parameters are built at import)."""
    try:
        with open(_PROC + name, encoding="ascii") as file:
            return file.read().split()
    except FileNotFoundError:
        return []


def _algorithms(transport: MultiStreamTCPTransport) -> list[str]:
    """What each stream's socket reports as its congestion control."""
    session = transport._session
    assert session is not None
    return [
        stream.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
        .rstrip(b"\0")
        .decode("ascii")
        for stream in session.streams
    ]


def test_every_stream_runs_the_algorithm_asked_for(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    # reno is built into every kernel and allowed to every process; it is never the
    # default here, so reading it back shows the option was set, not inherited.
    default = _proc("tcp_congestion_control")[0]
    if default == "reno":
        pytest.skip("this kernel's default is reno: the read-back would prove nothing")
    receiver, inbox = receiver_factory()
    transport = transport_factory(receiver.address, streams=3, congestion_control="reno")
    transport.start()
    assert _algorithms(transport) == ["reno"] * 3
    transport.send(b"x" * 5000)
    wait_until(lambda: inbox.messages == [b"x" * 5000])


@pytest.mark.skipif(os.geteuid() != 0, reason="any available algorithm needs CAP_NET_ADMIN")
@pytest.mark.parametrize("algorithm", _proc("tcp_available_congestion_control"))
def test_each_available_algorithm_reads_back(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory, algorithm: str
) -> None:
    receiver, _ = receiver_factory()
    transport = transport_factory(receiver.address, streams=2, congestion_control=algorithm)
    transport.start()
    assert _algorithms(transport) == [algorithm, algorithm]


def test_none_leaves_the_kernel_default(
    receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    receiver, _ = receiver_factory()
    transport = transport_factory(receiver.address, streams=2)
    transport.start()
    default = _proc("tcp_congestion_control")[0]
    assert _algorithms(transport) == [default, default]


@pytest.mark.parametrize("name", ["no-such-algorithm", "cubic\0", "x" * 16, "bbr " + "é"])
def test_an_unknown_name_is_refused_listing_the_available_ones(name: str) -> None:
    with pytest.raises(ValueError, match="congestion_control") as info:
        MultiStreamTCPTransport(("127.0.0.1", 9), congestion_control=name)
    message = str(info.value)
    assert "not available" in message
    for available in _proc("tcp_available_congestion_control"):
        assert available in message


@pytest.mark.parametrize("value", [b"bbr", 1, ""])
def test_a_name_that_is_not_a_string_is_refused(value: object) -> None:
    error = ValueError if value == "" else TypeError
    with pytest.raises(error, match="congestion_control must be"):
        MultiStreamTCPTransport(("127.0.0.1", 9), congestion_control=value)  # type: ignore[arg-type]


def _restricted() -> list[str]:
    allowed = set(_proc("tcp_allowed_congestion_control"))
    return [name for name in _proc("tcp_available_congestion_control") if name not in allowed]


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1) (util-linux)")
@pytest.mark.skipif(not _restricted(), reason="every available algorithm is allowed here")
def test_an_algorithm_not_allowed_to_this_process_is_refused_naming_the_allowed_ones() -> None:
    # A child in a user namespace of its own has no CAP_NET_ADMIN over this network
    # namespace: the kernel's rule for the algorithms outside the allowed list applies.
    algorithm = _restricted()[0]
    code = (
        "from dwcp.transport import MultiStreamTCPTransport\n"
        "try:\n"
        f"    MultiStreamTCPTransport(('127.0.0.1', 9), congestion_control={algorithm!r})\n"
        "except ValueError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        ["unshare", "--user", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    if "unshare failed" in done.stderr:  # user namespaces disabled on this host
        pytest.skip(done.stderr.strip())
    assert "not allowed for this process" in done.stdout, done.stdout + done.stderr
    for allowed in _proc("tcp_allowed_congestion_control"):
        assert allowed in done.stdout
