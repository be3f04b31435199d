"""The kernel's view of a TCP connection's progress, for liveness that follows it."""

from __future__ import annotations

import socket
import struct
import sys

if sys.platform.startswith("linux"):
    import fcntl

__all__ = ["peer_finished", "tcp_progress"]

# Linux only: TCP_INFO's tcpi_bytes_acked (a u64 at offset 120 of struct tcp_info, since
# Linux 4.1) and SIOCOUTQ (= TIOCOUTQ, 0x5411: bytes written but not yet acknowledged).
_TCP_INFO = getattr(socket, "TCP_INFO", None) if sys.platform.startswith("linux") else None
_BYTES_ACKED = struct.Struct("=Q")
_BYTES_ACKED_AT = 120
_INFO_SIZE = _BYTES_ACKED_AT + _BYTES_ACKED.size
_SIOCOUTQ = 0x5411
_INT = struct.Struct("=i")


def tcp_progress(sock: socket.socket) -> tuple[int, int] | None:
    """``(acknowledged, outstanding)``: bytes the peer has acknowledged over the connection's
    life, and bytes written to ``sock`` that it has not acknowledged yet (sent or still
    queued); None where the kernel cannot tell (not Linux, a closed socket)."""
    if _TCP_INFO is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _INFO_SIZE)
        if len(info) < _INFO_SIZE:
            return None
        (outstanding,) = _INT.unpack(fcntl.ioctl(sock.fileno(), _SIOCOUTQ, bytes(_INT.size)))
    except OSError:
        return None
    (acknowledged,) = _BYTES_ACKED.unpack_from(info, _BYTES_ACKED_AT)
    return acknowledged, outstanding


_CLOSE_WAIT = 8  # tcpi_state (the first byte of struct tcp_info): the peer's FIN arrived


def peer_finished(sock: socket.socket) -> bool:
    """Whether the peer's FIN has reached ``sock`` (TCP state CLOSE_WAIT), even while bytes
    it sent before are still unread: the peer writes no more and may have closed, so a
    write to it may be answered with a reset, which discards what we have not read. False
    where the kernel cannot tell (not Linux, a closed socket)."""
    if _TCP_INFO is None:
        return False
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)
    except OSError:
        return False
    return len(info) == 1 and info[0] == _CLOSE_WAIT
